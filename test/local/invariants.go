package local

import (
	"fmt"
	"slices"
	"time"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/test/nodesim"
)

// Violations checks dynamig's promises against a simulated node's own
// records — the GPU simulator's log of destroyed devices and the stand-in
// kubelet's record of which pod held which device under which resource,
// and of every pod or container failure a MIG device caused:
//   - no device is destroyed while a pod holds it;
//   - no device is held by two pods at once, nor by one pod under two
//     resource names;
//   - no pod fails admission or container start because of a MIG device
//     (pods named in expected, "namespace/name", are let off: a test that
//     provokes a failure on purpose).
//
// Each violation is one line naming the node, the device, the pods and
// the times.
func Violations(name string, sim *gpu.Simulator, n Node, expected ...string) []string {
	return violations(name, sim, n, func(f nodesim.Failure) bool { return slices.Contains(expected, f.Pod) })
}

// violations is Violations with the failures letOff says are expected.
func violations(name string, sim *gpu.Simulator, n Node, letOff func(nodesim.Failure) bool) []string {
	var out []string
	holds := n.Holds()
	for _, op := range sim.Ops() {
		if op.Kind != "destroy-ci" {
			continue
		}
		for _, h := range holds {
			if h.Device == op.UUID && held(h, op.Time) {
				out = append(out, fmt.Sprintf("node %s: %s (%s) destroyed at %s while pod %s held it", name, op.Slice, op.UUID, stamp(op.Time), h.Pod))
			}
		}
	}
	for i, a := range holds {
		for _, b := range holds[i+1:] {
			if a.Device != b.Device || !overlap(a, b) {
				continue
			}
			if a.Pod != b.Pod || a.Resource != b.Resource {
				out = append(out, fmt.Sprintf("node %s: device %s held by %s as %s from %s and by %s as %s from %s", name, a.Device, a.Pod, a.Resource, stamp(a.From), b.Pod, b.Resource, stamp(b.From)))
			}
		}
	}
	for _, f := range n.Failures() {
		if f.Kind != nodesim.FailureNoDevice && !letOff(f) {
			out = append(out, fmt.Sprintf("node %s: %s", name, f))
		}
	}
	return out
}

// held reports whether a hold covers t.
func held(h nodesim.Hold, t time.Time) bool {
	return !t.Before(h.From) && (h.To.IsZero() || t.Before(h.To))
}

// overlap reports whether two holds share a moment.
func overlap(a, b nodesim.Hold) bool {
	return (b.To.IsZero() || a.From.Before(b.To)) && (a.To.IsZero() || b.From.Before(a.To))
}

func stamp(t time.Time) string { return t.Format(time.StampMilli) }
