package planner

import (
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/dynamig/dynamig/pkg/mig"
)

// RandomOptions shapes a random snapshot, for tests, benchmarks and the
// quality comparison.
type RandomOptions struct {
	Nodes       int
	GPUsPerNode int
	Models      []*mig.Model // a node's GPUs share a model, picked at random
	Pods        int
	// Partitioned is the probability that a GPU already has a layout; each
	// of its slices is used with probability Used.
	Partitioned float64
	Used        float64
	// MultiSlice is the probability that a pod asks for two slices.
	MultiSlice float64
	// Priorities is the number of priority levels (1 = all equal).
	Priorities int
	// Selective is the probability that a pod may use only half the nodes.
	Selective float64
	// Bound is the probability that a free slice is requested by a pod
	// already bound to the node whose device kubelet has not allocated yet.
	Bound float64
}

// Random builds a valid random snapshot from the seeded generator.
func Random(r *rand.Rand, o RandomOptions) *Snapshot {
	s := &Snapshot{}
	for i := 0; i < o.Nodes; i++ {
		m := o.Models[r.IntN(len(o.Models))]
		n := Node{Name: fmt.Sprintf("node-%04d", i)}
		layouts := StaticCandidates(m)
		for gi := 0; gi < o.GPUsPerNode; gi++ {
			g := GPU{Index: gi, Model: m}
			if r.Float64() < o.Partitioned {
				for _, sl := range layouts[r.IntN(len(layouts))] {
					if r.Float64() < 0.25 {
						continue // leave a gap
					}
					used := r.Float64() < o.Used
					if used || r.Float64() < o.Bound {
						if n.Bound == nil {
							n.Bound = map[mig.ProfileName]int{}
						}
						n.Bound[sl.Profile]++
					}
					g.Slices = append(g.Slices, Slice{Slice: sl, Used: used})
				}
			}
			n.GPUs = append(n.GPUs, g)
		}
		s.Nodes = append(s.Nodes, n)
	}
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < o.Pods; i++ {
		m := o.Models[r.IntN(len(o.Models))]
		p := Pod{
			Name:     fmt.Sprintf("pod-%05d", i),
			Requests: map[mig.ProfileName]int{},
			Created:  base.Add(time.Duration(i) * time.Second),
		}
		if o.Priorities > 1 {
			p.Priority = int32(r.IntN(o.Priorities))
		}
		p.Requests[randomProfile(r, m)]++
		if r.Float64() < o.MultiSlice {
			p.Requests[randomProfile(r, m)]++
		}
		if r.Float64() < o.Selective && len(s.Nodes) > 1 {
			for _, n := range s.Nodes {
				if r.IntN(2) == 0 {
					p.Nodes = append(p.Nodes, n.Name)
				}
			}
			if p.Nodes == nil {
				p.Nodes = []string{s.Nodes[0].Name}
			}
		}
		s.Pods = append(s.Pods, p)
	}
	return s
}

// randomProfile draws a plain profile of the model, small ones more often:
// weight 1/compute.
func randomProfile(r *rand.Rand, m *mig.Model) mig.ProfileName {
	var plain []mig.Profile
	total := 0.0
	for _, p := range m.Profiles {
		if p.Name.Variant == mig.VariantNone {
			plain = append(plain, p)
			total += 1 / float64(p.ComputeSlices)
		}
	}
	x := r.Float64() * total
	for _, p := range plain {
		x -= 1 / float64(p.ComputeSlices)
		if x < 0 {
			return p.Name
		}
	}
	return plain[len(plain)-1].Name
}

// RandomSmall draws one of the small snapshots on which strategies are
// compared with the exact optimum: 1–3 nodes of 1–2 GPUs (A100-80GB,
// H100-80GB, A30), 3–10 pods, half the GPUs partitioned and half their
// slices used, a fifth of the free ones requested by bound pods.
// priorities is the number of priority levels.
func RandomSmall(seed uint64, priorities int) *Snapshot {
	r := rand.New(rand.NewPCG(seed, 42))
	var models []*mig.Model
	for _, n := range []string{"A100-80GB", "H100-80GB", "A30"} {
		m, _ := mig.ModelByName(n)
		models = append(models, m)
	}
	return Random(r, RandomOptions{
		Nodes: 1 + r.IntN(3), GPUsPerNode: 1 + r.IntN(2), Models: models[:1+r.IntN(3)],
		Pods: 3 + r.IntN(8), Partitioned: 0.5, Used: 0.5, MultiSlice: 0.15, Priorities: priorities, Selective: 0.2, Bound: 0.2,
	})
}
