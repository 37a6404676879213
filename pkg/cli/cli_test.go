package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = Run(args, &out, &errOut)
	return out.String(), errOut.String(), code
}

func TestPlanJSONContract(t *testing.T) {
	out, stderr, code := run(t, "plan", "../../examples/mixed.yaml", "-o", "json")
	require.Equal(t, 0, code, stderr)
	var got struct {
		Strategy   string `json:"strategy"`
		PodsServed int    `json:"podsServed"`
		Pods       []map[string]any
		Nodes      []struct {
			Name string
			GPUs []struct {
				Index  int
				Model  string
				Slices []struct {
					Profile string
					Start   int
					Used    bool
				}
			}
		}
	}
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	assert.Equal(t, "dynamig", got.Strategy)
	assert.Equal(t, 4, got.PodsServed, "pods arriving at 0")
	require.Len(t, got.Pods, 4)
	for _, p := range got.Pods {
		for _, k := range []string{"name", "node", "gpu", "profile", "start"} {
			assert.Contains(t, p, k)
		}
	}
	require.Len(t, got.Nodes, 2)
	first := got.Nodes[0].GPUs[0]
	assert.Equal(t, "A100-80GB", first.Model)
	assert.Equal(t, "3g.40gb", first.Slices[0].Profile)
	assert.True(t, first.Slices[0].Used, "used slices are part of the complete layout")
}

func TestPlanUnservedHasReason(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "s.yaml")
	require.NoError(t, os.WriteFile(f, []byte("nodes:\n- name: a\n  gpus: [A30]\npods:\n- {name: big, requests: {nvidia.com/mig-7g.80gb: 1}}\n"), 0o600))
	out, _, code := run(t, "plan", "-o", "json", f)
	require.Equal(t, 0, code)
	assert.Contains(t, out, `"reason": "no GPU on the 1 eligible node(s) offers profile 7g.80gb"`)
}

func TestSimJSONFields(t *testing.T) {
	out, stderr, code := run(t, "sim", "../../examples/seed.yaml", "--strategy", "all", "-o", "json")
	require.Equal(t, 0, code, stderr)
	var got []map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	require.Len(t, got, 5, "all strategies, optimal included for a small scenario")
	for _, r := range got {
		for _, k := range []string{"strategy", "podsTotal", "podsServed", "podsNeverServed", "meanWaitSeconds", "p95WaitSeconds",
			"sliceUtilization", "reconfigurations", "slicesCreated", "slicesDestroyed"} {
			assert.Contains(t, r, k)
		}
	}
	table, _, code := run(t, "sim", "../../examples/seed.yaml")
	require.Equal(t, 0, code)
	assert.Contains(t, table, "MEAN WAIT s")
	assert.Contains(t, table, "dynamig")
}

func TestGenIsReproducibleAndLoadable(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	for _, f := range []string{a, b} {
		_, stderr, code := run(t, "gen", "--seed", "7", "--mix", "diurnal", "--nodes", "2", "--gpus-per-node", "2", "--models", "A100-80GB,A30", "--pods", "30", "-o", f)
		require.Equal(t, 0, code, stderr)
	}
	da, err := os.ReadFile(a)
	require.NoError(t, err)
	db, err := os.ReadFile(b)
	require.NoError(t, err)
	assert.Equal(t, string(da), string(db), "same seed, same file")
	assert.Contains(t, string(da), "# dynamig gen --seed 7 --mix diurnal")
	out, stderr, code := run(t, "sim", a, "--strategy", "all")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, out, "static")
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("nodes:\n- name: a\n  gpus: [A100-80GB]\npods:\n- {name: p, arrival: -5, requests: {nvidia.com/mig-1g.10gb: 1}}\n"), 0o600))
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"plan", bad}, 1, "line 5: pod \"p\": arrival: must not be negative"},
		{[]string{"plan", "missing.yaml"}, 1, "reading scenario"},
		{[]string{"plan"}, 2, "want exactly one scenario FILE"},
		{[]string{"plan", "../../examples/seed.yaml", "--strategy", "magic"}, 2, `unknown strategy "magic"`},
		{[]string{"sim", "../../examples/seed.yaml", "-o", "xml"}, 2, "-o must be table or json"},
		{[]string{"gen", "--mix", "huge"}, 2, `unknown mix "huge"`},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{nil, 2, "Usage:"},
	}
	for _, tt := range tests {
		_, stderr, code := run(t, tt.args...)
		assert.Equal(t, tt.code, code, "%v", tt.args)
		assert.Contains(t, stderr, tt.want, "%v", tt.args)
	}
}
