package scenario

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

func TestLoadExamples(t *testing.T) {
	files, err := filepath.Glob("../../examples/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, f := range files {
		s, err := Load(f)
		require.NoError(t, err, f)
		snap := s.Snapshot()
		require.NoError(t, snap.Validate(), f)
	}
}

func TestParseResolves(t *testing.T) {
	s, err := Parse([]byte(`
nodes:
- name: a
  gpus: [A100-80GB, A30]
  labels: {zone: x}
  slices:
  - {gpu: 1, profile: 2g.12gb, start: 2, used: true}
- name: b
  gpus: [H100-80GB]
reconfigureSeconds: 5
pods:
- {name: p, arrival: 0, duration: 10, priority: 3, requests: {nvidia.com/mig-1g.10gb: 2, nvidia.com/mig-1g.10gb.me: 1}, nodeSelector: {zone: x}}
- {name: q, arrival: 30, duration: 0, requests: {nvidia.com/mig-4g.24gb: 1}}
`))
	require.NoError(t, err)
	assert.Equal(t, "A30", s.Models(0)[1].Name)
	assert.Equal(t, map[mig.ProfileName]int{mig.MustParseProfile("1g.10gb"): 2, mig.MustParseProfile("1g.10gb+me"): 1}, s.Demand(0))
	assert.Equal(t, []string{"a"}, s.Eligible(0))
	assert.Nil(t, s.Eligible(1))
	snap := s.Snapshot()
	require.Len(t, snap.Pods, 1, "only pods arriving at 0 are pending at 0")
	assert.True(t, snap.Nodes[0].GPUs[1].Slices[0].Used)
	assert.Equal(t, int32(3), snap.Pods[0].Priority)
}

func TestParseErrorsNameLineAndField(t *testing.T) {
	tests := []struct{ name, yaml, want string }{
		{"empty", ``, "empty scenario"},
		{"unknown field", "nodes:\n- name: a\n  gpu: [A100-80GB]\n", "line 3: field gpu not found"},
		{"unknown model", "nodes:\n- name: a\n  gpus: [A200]\npods: []\n", `line 3: node "a": gpus[0]: unknown GPU model "A200"`},
		{"bad profile", "nodes:\n- name: a\n  gpus: [A100-80GB]\n  slices:\n  - {gpu: 0, profile: 9g.99gb, start: 0}\n", "line 5: node \"a\": slices[0].profile: invalid MIG profile \"9g.99gb\""},
		{"profile not on model", "nodes:\n- name: a\n  gpus: [A30]\n  slices:\n  - {gpu: 0, profile: 1g.10gb, start: 0}\n", "1g.10gb does not exist on A30"},
		{"overlap", "nodes:\n- name: a\n  gpus: [A100-80GB]\n  slices:\n  - {gpu: 0, profile: 3g.40gb, start: 0}\n  - {gpu: 0, profile: 4g.40gb, start: 0}\n", "line 6: node \"a\" gpu 0: slices[1]: invalid MIG layout: 4g.40gb@0: 4g.40gb@0 overlaps"},
		{"bad gpu index", "nodes:\n- name: a\n  gpus: [A100-80GB]\n  slices:\n  - {gpu: 1, profile: 3g.40gb, start: 0}\n", "slices[0].gpu: 1 is not a GPU of the node"},
		{"dup node", "nodes:\n- name: a\n  gpus: [A30]\n- name: a\n  gpus: [A30]\n", "line 4: nodes[1].name: node \"a\" appears twice"},
		{"negative arrival", "nodes:\n- name: a\n  gpus: [A30]\npods:\n- name: p\n  arrival: -1\n  requests: {nvidia.com/mig-1g.6gb: 1}\n", "line 6: pod \"p\": arrival: must not be negative"},
		{"negative duration", "nodes:\n- name: a\n  gpus: [A30]\npods:\n- {name: p, duration: -5, requests: {nvidia.com/mig-1g.6gb: 1}}\n", "pod \"p\": duration: must not be negative"},
		{"bad resource", "nodes:\n- name: a\n  gpus: [A30]\npods:\n- name: p\n  requests:\n    nvidia.com/mig-1g: 1\n", "line 7: pod \"p\": requests: resource \"nvidia.com/mig-1g\""},
		{"zero count", "nodes:\n- name: a\n  gpus: [A30]\npods:\n- {name: p, requests: {nvidia.com/mig-1g.6gb: 0}}\n", "must be positive, got 0"},
		{"no requests", "nodes:\n- name: a\n  gpus: [A30]\npods:\n- {name: p}\n", "requests: at least one"},
		{"negative reconfigure", "nodes:\n- name: a\n  gpus: [A30]\nreconfigureSeconds: -1\n", "line 4: reconfigureSeconds: must not be negative"},
		{"not yaml", "nodes: [", "parsing YAML"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	data, err := os.ReadFile("../../examples/mixed.yaml")
	require.NoError(t, err)
	s, err := Parse(data)
	require.NoError(t, err)
	out, err := s.Marshal()
	require.NoError(t, err)
	again, err := Parse(out)
	require.NoError(t, err)
	if diff := cmp.Diff(s, again, cmpopts.IgnoreUnexported(Node{}, Pod{})); diff != "" {
		t.Fatalf("round trip changed the scenario (-before +after):\n%s", diff)
	}
}

// FuzzParse: any input either fails with an error or yields a scenario
// that survives a write and a re-read, whose snapshot is valid, and whose
// plans keep the hard rules under every strategy.
func FuzzParse(f *testing.F) {
	for _, name := range []string{"seed.yaml", "mixed.yaml"} {
		data, err := os.ReadFile(filepath.Join("../../examples", name))
		require.NoError(f, err)
		f.Add(data)
	}
	f.Add([]byte("nodes:\n- name: a\n  gpus: [A30]\npods:\n- {name: p, requests: {nvidia.com/mig-1g.6gb: 1}}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse(data)
		if err != nil {
			return
		}
		snap := s.Snapshot()
		if err := snap.Validate(); err != nil {
			t.Fatalf("parsed scenario gives an invalid snapshot: %v", err)
		}
		if len(snap.Pods) <= 20 && len(snap.Nodes) <= 8 {
			for _, st := range planner.Strategies() {
				if err := planner.Check(snap, st.Plan(snap)); err != nil {
					t.Fatalf("%s: %v", st.Name(), err)
				}
			}
		}
		out, err := s.Marshal()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		if _, err := Parse(out); err != nil {
			t.Fatalf("re-parse of marshalled scenario: %v\n%s", err, out)
		}
	})
}
