package planner

import (
	"fmt"
	"sort"
)

// Optimal limits: the exhaustive search is a yardstick for small snapshots.
const (
	OptimalMaxGPUs = 8
	OptimalMaxPods = 14
)

// Optimal is the exact reference: branch and bound over which pods go to
// which node, with each node's GPUs set to the layouts that serve the
// node's pods with the fewest slices destroyed and created. It maximises
// pods served (priority first), then minimises churn; it does not weigh
// stranded capacity. Snapshots over OptimalMaxGPUs GPUs or OptimalMaxPods
// pods are not planned: every pod gets a reason saying so.
type Optimal struct{}

// Name implements Strategy.
func (Optimal) Name() string { return "optimal" }

// Plan implements Strategy.
func (Optimal) Plan(s *Snapshot) *Plan {
	w := newWorld(s)
	gpus := 0
	for _, n := range w.nodes {
		gpus += len(n.gpus)
	}
	if gpus > OptimalMaxGPUs || len(w.pods) > OptimalMaxPods {
		p := w.plan("optimal")
		for i := range p.Pods {
			p.Pods[i].Reason = fmt.Sprintf("optimal: snapshot too large (%d GPUs, %d pods; limits %d and %d)", gpus, len(w.pods), OptimalMaxGPUs, OptimalMaxPods)
		}
		return p
	}
	o := newOptimizer(w)
	o.search(0, 0, 0)
	o.apply()
	return w.plan("optimal")
}

type optimizer struct {
	w      *world
	dims   dims
	nodes  []*nodeSolver
	pods   []*podState // search order
	weight []int64     // per pod in search order
	rest   []int64     // weight of pods from i on
	demand [][]int     // per pod in search order: count per dim

	cur      []int   // node per pod, -1 unserved
	curD     [][]int // demand per node
	curChurn []int   // min churn per node for curD

	bestW     int64
	bestChurn int
	best      []int
}

func newOptimizer(w *world) *optimizer {
	o := &optimizer{w: w, dims: w.demandDims(), bestW: -1}
	for ni := range w.nodes {
		o.nodes = append(o.nodes, newNodeSolver(w, ni, o.dims))
	}
	// Priority levels weigh lexicographically: one pod of a level is worth
	// more than all pods of the levels below.
	prios := map[int32]bool{}
	for _, ps := range w.pods {
		prios[ps.pod.Priority] = true
	}
	var levels []int32
	for p := range prios {
		levels = append(levels, p)
	}
	sort.Slice(levels, func(i, j int) bool { return levels[i] < levels[j] })
	o.pods = w.ordered(largestFirst)
	o.rest = make([]int64, len(o.pods)+1)
	for _, ps := range o.pods {
		wt := int64(1)
		for _, l := range levels {
			if l < ps.pod.Priority {
				wt *= int64(len(w.pods) + 1)
			}
		}
		o.weight = append(o.weight, wt)
		o.demand = append(o.demand, o.dims.vector(ps))
	}
	for i := len(o.pods) - 1; i >= 0; i-- {
		o.rest[i] = o.rest[i+1] + o.weight[i]
	}
	o.cur = make([]int, len(o.pods))
	o.curD = make([][]int, len(w.nodes))
	for i := range o.curD {
		o.curD[i] = make([]int, o.dims.n)
	}
	o.curChurn = make([]int, len(w.nodes))
	return o
}

func (o *optimizer) search(i int, weight int64, churn int) {
	if i == len(o.pods) {
		if weight > o.bestW || (weight == o.bestW && churn < o.bestChurn) {
			o.bestW, o.bestChurn = weight, churn
			o.best = append(o.best[:0], o.cur...)
		}
		return
	}
	upper := weight + o.rest[i]
	if upper < o.bestW || (upper == o.bestW && churn >= o.bestChurn) {
		return
	}
	ps := o.pods[i]
	for _, ni := range ps.eligible {
		d := o.curD[ni]
		for k, x := range o.demand[i] {
			d[k] += x
		}
		if sol := o.nodes[ni].minChurn(0, d); sol.feasible {
			old := o.curChurn[ni]
			o.curChurn[ni] = sol.churn
			o.cur[i] = ni
			o.search(i+1, weight+o.weight[i], churn-old+sol.churn)
			o.curChurn[ni] = old
		}
		for k, x := range o.demand[i] {
			d[k] -= x
		}
	}
	o.cur[i] = -1
	o.search(i+1, weight, churn)
}

// apply writes the best solution into the world, node by node.
func (o *optimizer) apply() {
	for ni, solver := range o.nodes {
		d := make([]int, o.dims.n)
		var pods []*podState
		for i, at := range o.best {
			if at == ni {
				pods = append(pods, o.pods[i])
				for k, x := range o.demand[i] {
					d[k] += x
				}
			}
		}
		if len(pods) > 0 {
			o.w.relayout(ni, solver, d, pods)
		}
	}
}
