package planner

import (
	"fmt"
	"sort"
	"strings"
)

// Strategy is a way to plan. Plan must not modify the snapshot, which must
// be valid (Snapshot.Validate).
type Strategy interface {
	Name() string
	Plan(s *Snapshot) *Plan
}

// Strategies returns every strategy by name, dynamig first.
func Strategies() []Strategy {
	return []Strategy{Dynamig{}, FirstFit{}, Nos{}, Static{}, Optimal{}}
}

// StrategyByName finds a strategy: dynamig, firstfit, nos, static or optimal.
func StrategyByName(name string) (Strategy, error) {
	var names []string
	for _, s := range Strategies() {
		if s.Name() == name {
			return s, nil
		}
		names = append(names, s.Name())
	}
	return nil, fmt.Errorf("unknown strategy %q (known: %s)", name, strings.Join(names, ", "))
}

// Dynamig is the joint, placement- and churn-aware planner. It places pods
// in priority order, each slice at the option that destroys and creates the
// fewest slices, strands the least compute and fills fuller GPUs first, so
// that whole GPUs and large regions stay free. Within a priority it tries
// largest pods first (best packing); if that leaves pods unserved it also
// tries smallest first (most pods) and oldest first, and keeps the best plan
// by the objective.
type Dynamig struct{}

// Name implements Strategy.
func (Dynamig) Name() string { return "dynamig" }

// dynamigPasses bounds the greedy passes per plan. Passes after the first
// run only while pods stay unserved.
const dynamigPasses = 6

// Plan implements Strategy.
func (Dynamig) Plan(s *Snapshot) *Plan {
	var best *world
	var bestScore objective
	rep := &repairer{solvers: map[int]*nodeSolver{}, budget: repairSolvers}
	try := func(order []*podState) {
		w := newWorld(s)
		if order == nil {
			order = w.ordered(largestFirst)
		}
		w.greedy(order)
		rep.repair(w)
		if sc := w.objective(); best == nil || sc.better(bestScore) {
			best, bestScore = w, sc
		}
	}
	try(nil)
	if bestScore.unserved > 0 {
		try(best.ordered(smallestFirst))
	}
	// Squeaky wheel: the pods the best plan left out go to the front of
	// their priority, and the passes go on while they improve the plan.
	for pass := 2; pass < dynamigPasses && bestScore.unserved > 0; pass++ {
		prev := best
		try(prev.ordered(func(a, b *podState) bool {
			if a.pod.Priority != b.pod.Priority {
				return a.pod.Priority > b.pod.Priority
			}
			if (a.node < 0) != (b.node < 0) {
				return a.node < 0
			}
			return largestFirst(a, b)
		}))
		if best == prev {
			break
		}
	}
	return best.plan("dynamig")
}

// Repair bounds: unserved pods tried per pass, nodes tried per pod, and
// exact node solvers built per plan (each walks every layout of each GPU).
const (
	repairPods    = 64
	repairNodes   = 4
	repairSolvers = 48
)

// repairer serves pods that a greedy pass left out by re-laying-out one
// node exactly for the pods it already serves plus the new one. Its
// solvers depend only on the snapshot, so they serve every pass.
type repairer struct {
	dims    *dims
	solvers map[int]*nodeSolver
	budget  int
}

func (r *repairer) repair(w *world) {
	if r.dims == nil {
		d := w.demandDims()
		r.dims = &d
	}
	tried := 0
	for _, ps := range w.ordered(largestFirst) {
		if ps.node >= 0 {
			continue
		}
		if tried == repairPods {
			return
		}
		tried++
		for _, ni := range w.roomiest(ps, repairNodes) {
			solver, ok := r.solvers[ni]
			if !ok {
				if r.budget == 0 {
					return
				}
				r.budget--
				solver = newNodeSolver(w, ni, *r.dims)
				r.solvers[ni] = solver
			}
			d := r.dims.vector(ps)
			pods := []*podState{ps}
			for _, other := range w.pods {
				if other.node == ni {
					pods = append(pods, other)
					for k, x := range r.dims.vector(other) {
						d[k] += x
					}
				}
			}
			if solver.minChurn(0, d).feasible {
				w.relayout(ni, solver, d, pods)
				break
			}
		}
	}
}

// roomiest returns up to k eligible nodes that offer every profile the pod
// asks for and have at least its compute slices neither pinned nor serving
// other pods, the most such slack first.
func (w *world) roomiest(ps *podState, k int) []int {
	type cand struct{ ni, slack int }
	var cands []cand
	for _, ni := range ps.eligible {
		slack := 0
		for _, g := range w.nodes[ni].gpus {
			slack += g.model.ComputeSlices
			for _, s := range g.pinned {
				slack -= g.model.Profiles[s.prof].ComputeSlices
			}
		}
		offered := true
		for _, d := range ps.demand {
			found := false
			for _, g := range w.nodes[ni].gpus {
				found = found || g.local[d.prof] >= 0
			}
			offered = offered && found
		}
		if offered {
			cands = append(cands, cand{ni, slack})
		}
	}
	load := make([]int, len(w.nodes))
	for _, other := range w.pods {
		if other.node >= 0 {
			load[other.node] += other.compute
		}
	}
	for i := range cands {
		cands[i].slack -= load[cands[i].ni]
	}
	var out []int
	sort.SliceStable(cands, func(i, j int) bool { return cands[i].slack > cands[j].slack })
	for _, c := range cands {
		if len(out) == k || c.slack < ps.compute {
			break
		}
		out = append(out, c.ni)
	}
	return out
}

// candidatesPerPod bounds how many nodes are tried exactly for a pod that
// asks for several slices; nodes are ranked by the sum of their best
// single-slice options first.
const candidatesPerPod = 6

// greedy serves pods one by one in the given order, each on its best node.
// The order may hold the pods of another world of the same snapshot: only
// their indexes are used.
func (w *world) greedy(order []*podState) {
	for _, o := range order {
		ps := w.pods[o.index]
		if ni := w.bestNode(ps); ni >= 0 {
			w.commit(ps, ni)
		}
	}
}

// bestNode returns the eligible node where the pod costs least, or -1.
func (w *world) bestNode(ps *podState) int {
	bestNi, best := -1, option{}
	consider := func(ni int, o option) {
		o.gpu, o.start = 0, 0 // across nodes, ties go to the first node
		o.busy = w.nodes[ni].busy
		if o.better(best) {
			bestNi, best = ni, o
		}
	}
	if ps.slices == 1 && ps.pod.Nodes == nil {
		return w.bestAnywhere(ps.demand[0].prof)
	}
	if ps.slices == 1 {
		for _, ni := range ps.eligible {
			if o, ok := w.cost(ps, ni); ok {
				consider(ni, o)
			}
		}
		return bestNi
	}
	// Several slices: rank nodes by a cheap bound, then place exactly on
	// the best few.
	type cand struct {
		ni    int
		bound option
	}
	top := make([]cand, 0, candidatesPerPod+1)
	for _, ni := range ps.eligible {
		bound := option{ok: true}
		for _, d := range ps.demand {
			o := w.nodes[ni].bestOn(d.prof)
			if !o.ok {
				bound.ok = false
				break
			}
			bound.cost += o.cost * d.count
			bound.loss += o.loss * d.count
			bound.after += o.after
		}
		if !bound.ok || (len(top) == candidatesPerPod && !bound.better(top[len(top)-1].bound)) {
			continue
		}
		i := len(top)
		top = append(top, cand{ni, bound})
		for ; i > 0 && bound.better(top[i-1].bound); i-- {
			top[i] = top[i-1]
		}
		top[i] = cand{ni, bound}
		if len(top) > candidatesPerPod {
			top = top[:candidatesPerPod]
		}
	}
	for _, c := range top {
		if o, ok := w.cost(ps, c.ni); ok {
			consider(c.ni, o)
		}
	}
	return bestNi
}

// Pod orders. Each starts with priority, highest first, and ends with
// creation time and name so that it is total.
func largestFirst(a, b *podState) bool {
	if a.pod.Priority != b.pod.Priority {
		return a.pod.Priority > b.pod.Priority
	}
	if a.compute != b.compute {
		return a.compute > b.compute
	}
	return olderName(a, b)
}

func smallestFirst(a, b *podState) bool {
	if a.pod.Priority != b.pod.Priority {
		return a.pod.Priority > b.pod.Priority
	}
	if a.compute != b.compute {
		return a.compute < b.compute
	}
	return olderName(a, b)
}

func oldestFirst(a, b *podState) bool {
	if a.pod.Priority != b.pod.Priority {
		return a.pod.Priority > b.pod.Priority
	}
	return olderName(a, b)
}

func olderName(a, b *podState) bool {
	if !a.pod.Created.Equal(b.pod.Created) {
		return a.pod.Created.Before(b.pod.Created)
	}
	return a.pod.Name < b.pod.Name
}

// objective scores a finished world: pods served per priority (highest
// priority first), then churn, then stranded compute.
type objective struct {
	served   []served // by priority, descending
	unserved int
	churn    int
	stranded int
}

type served struct {
	priority int32
	count    int
}

func (w *world) objective() objective {
	var o objective
	byPrio := map[int32]int{}
	for _, ps := range w.pods {
		if ps.node >= 0 {
			byPrio[ps.pod.Priority]++
		} else {
			byPrio[ps.pod.Priority] += 0
			o.unserved++
		}
	}
	for p, n := range byPrio {
		o.served = append(o.served, served{p, n})
	}
	sort.Slice(o.served, func(i, j int) bool { return o.served[i].priority > o.served[j].priority })
	for _, n := range w.nodes {
		for _, g := range n.gpus {
			for _, s := range g.free {
				if s.fresh || s.state == slotDestroyed {
					o.churn++
				}
			}
		}
	}
	o.stranded = w.stranded()
	return o
}

// better compares two objectives of the same snapshot.
func (o objective) better(b objective) bool {
	for i := range o.served {
		if o.served[i].count != b.served[i].count {
			return o.served[i].count > b.served[i].count
		}
	}
	if o.churn != b.churn {
		return o.churn < b.churn
	}
	return o.stranded < b.stranded
}
