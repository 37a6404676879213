package planner

import (
	"fmt"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Check verifies that a plan keeps the hard rules for its snapshot: every
// GPU is planned with a valid layout; used slices stay where they are; no
// node has fewer slices of a profile than its bound pods request; each
// served pod gets exactly the slices it asks for, on one eligible node,
// none used or shared; every unserved pod has a reason; and the churn
// counts match the layouts.
func Check(s *Snapshot, p *Plan) error {
	if len(p.Nodes) != len(s.Nodes) {
		return fmt.Errorf("plan has %d nodes, snapshot %d", len(p.Nodes), len(s.Nodes))
	}
	type key struct {
		node, gpu, start int
	}
	planned := map[key]Slice{}
	created, destroyed := 0, 0
	nodeIndex := map[string]int{}
	for ni, n := range s.Nodes {
		nodeIndex[n.Name] = ni
		pn := p.Nodes[ni]
		if pn.Name != n.Name || len(pn.GPUs) != len(n.GPUs) {
			return fmt.Errorf("node %q: plan has node %q with %d GPUs, want %d", n.Name, pn.Name, len(pn.GPUs), len(n.GPUs))
		}
		count := map[mig.ProfileName]int{}
		for gi, g := range n.GPUs {
			pg := pn.GPUs[gi]
			if pg.Index != g.Index || pg.Model != g.Model.Name {
				return fmt.Errorf("node %q gpu %d: plan has gpu %d model %s", n.Name, g.Index, pg.Index, pg.Model)
			}
			if err := g.Model.Validate(mig.LayoutOf(pg.Slices)); err != nil {
				return fmt.Errorf("node %q gpu %d: %w", n.Name, g.Index, err)
			}
			after := map[mig.Slice]Slice{}
			for _, sl := range pg.Slices {
				after[sl.Slice] = sl
				planned[key{ni, g.Index, sl.Start}] = sl
				count[sl.Profile]++
			}
			before := map[mig.Slice]bool{}
			for _, sl := range g.Slices {
				ms := sl.Slice
				before[ms] = true
				got, kept := after[ms]
				if sl.Used && (!kept || !got.Used) {
					return fmt.Errorf("node %q gpu %d: used slice %s removed or moved", n.Name, g.Index, ms)
				}
				if !kept {
					destroyed++
				}
			}
			for ms := range after {
				if !before[ms] {
					created++
				}
			}
		}
		for prof, want := range n.Bound {
			if count[prof] < want {
				return fmt.Errorf("node %q: %d × %s planned, bound pods request %d", n.Name, count[prof], prof, want)
			}
		}
	}
	if created != p.Created || destroyed != p.Destroyed {
		return fmt.Errorf("plan says %d created and %d destroyed, layouts differ by %d and %d", p.Created, p.Destroyed, created, destroyed)
	}
	if len(p.Pods) != len(s.Pods) {
		return fmt.Errorf("plan has %d pods, snapshot %d", len(p.Pods), len(s.Pods))
	}
	taken := map[key]string{}
	served := 0
	for i, pod := range s.Pods {
		a := p.Pods[i]
		if a.Pod != pod.Name {
			return fmt.Errorf("pod %d: plan has %q, want %q", i, a.Pod, pod.Name)
		}
		if !a.Served() {
			if a.Reason == "" || len(a.Slices) > 0 {
				return fmt.Errorf("pod %q: unserved without a reason, or with slices", pod.Name)
			}
			continue
		}
		served++
		ni, ok := nodeIndex[a.Node]
		if !ok {
			return fmt.Errorf("pod %q: unknown node %q", pod.Name, a.Node)
		}
		if pod.Nodes != nil && !containsString(pod.Nodes, a.Node) {
			return fmt.Errorf("pod %q: node %q is not eligible", pod.Name, a.Node)
		}
		got := map[mig.ProfileName]int{}
		for _, ref := range a.Slices {
			k := key{ni, ref.GPU, ref.Start}
			sl, ok := planned[k]
			if !ok || sl.Profile != ref.Profile || sl.Used {
				return fmt.Errorf("pod %q: slice %s@%d on gpu %d is not a free planned slice", pod.Name, ref.Profile, ref.Start, ref.GPU)
			}
			if other, dup := taken[k]; dup {
				return fmt.Errorf("pod %q: slice %s@%d on gpu %d already serves %q", pod.Name, ref.Profile, ref.Start, ref.GPU, other)
			}
			taken[k] = pod.Name
			got[ref.Profile]++
		}
		if len(got) != len(pod.Requests) {
			return fmt.Errorf("pod %q: got %v, requests %v", pod.Name, got, pod.Requests)
		}
		for prof, n := range pod.Requests {
			if got[prof] != n {
				return fmt.Errorf("pod %q: got %d × %s, requests %d", pod.Name, got[prof], prof, n)
			}
		}
	}
	if served != p.Served {
		return fmt.Errorf("plan says %d served, assignments show %d", p.Served, served)
	}
	return nil
}

func containsString(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}
