package local

import (
	"strings"
	"testing"
	"time"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
)

func TestPursuedRefusedPlans(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 3, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	w := &planWatch{log: map[string][]planRecord{"n": {
		{at: at(0), plan: "p-1"},
		{at: at(1), plan: "p-1", refused: true},
		{at: at(10), plan: "p-2"},
	}}}
	op := func(s float64) gpu.Op {
		return gpu.Op{Time: at(s), Kind: "destroy-ci", Slice: mig.Slice{Profile: mig.MustParseProfile("1g.10gb"), Start: 1}}
	}
	cases := []struct {
		name string
		ops  []gpu.Op
		want string
	}{
		{"a change while applying, before the refusal", []gpu.Op{op(0.5)}, ""},
		{"a change for the refused plan", []gpu.Op{op(5), op(6)}, "plan p-1, which its agent had refused"},
		{"a change for the next plan, seen by the agent first", []gpu.Op{op(9.5)}, ""},
		{"a change for the next plan", []gpu.Op{op(11)}, ""},
	}
	for _, c := range cases {
		got := w.pursued("n", c.ops, t0)
		switch {
		case c.want == "" && len(got) > 0:
			t.Errorf("%s: %v, want nothing", c.name, got)
		case c.want != "" && (len(got) != 1 || !strings.Contains(got[0], c.want)):
			t.Errorf("%s: %v, want one line with %q", c.name, got, c.want)
		}
	}
	if got := w.pursued("n", []gpu.Op{op(5)}, at(7)); len(got) > 0 {
		t.Errorf("a change before the run: %v, want nothing", got)
	}
}
