package planner

import (
	"strconv"
	"strings"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Exact per-node planning: the least churn with which a node's GPUs can be
// laid out to provide a demand vector, searched over every valid layout of
// each GPU. The optimal strategy is built on it, and dynamig uses it to
// repair what its greedy passes leave unserved.

// dims maps each profile that some pod requests (global profile id) to a
// dimension of the demand vectors.
type dims struct {
	of map[int]int
	n  int
}

func (w *world) demandDims() dims {
	d := dims{of: map[int]int{}}
	for _, ps := range w.pods {
		for _, it := range ps.demand {
			if _, ok := d.of[it.prof]; !ok {
				d.of[it.prof] = d.n
				d.n++
			}
		}
	}
	return d
}

// vector is a pod's demand in these dimensions.
func (d dims) vector(ps *podState) []int {
	v := make([]int, d.n)
	for _, it := range ps.demand {
		v[d.of[it.prof]] += it.count
	}
	return v
}

// gpuOption is one way to lay out a GPU: what it provides to the pending
// pods (count per dimension) and its churn.
type gpuOption struct {
	provided []int
	churn    int
	layout   []mig.Slice
}

type nodeSolution struct {
	churn    int
	choice   int // option taken on the GPU; -1: this and later GPUs stay as they are
	feasible bool
}

// nodeSolver answers minChurn queries for one node in its initial state.
type nodeSolver struct {
	gpus [][]gpuOption
	memo map[string]nodeSolution
}

func newNodeSolver(w *world, ni int, d dims) *nodeSolver {
	s := &nodeSolver{memo: map[string]nodeSolution{}}
	for _, g := range w.buildNode(ni).gpus {
		s.gpus = append(s.gpus, gpuOptions(w, g, d))
	}
	return s
}

// gpuOptions lists, per distinct provided vector, the cheapest layout of
// the GPU that keeps its pinned slices, without dominated entries.
func gpuOptions(w *world, g *gpuState, d dims) []gpuOption {
	m := g.model
	byKey := map[string]gpuOption{}
	var keys []string
	for _, l := range infoFor(m).layouts {
		pinnedKept, kept := 0, 0
		provided := make([]int, d.n)
		for _, s := range l {
			q, _ := m.ProfileIndex(s.Profile)
			if pinnedAt(g.pinned, q, s.Start) {
				pinnedKept++
				continue
			}
			if freeAt(g.free, q, s.Start) {
				kept++
			}
			if k, ok := d.of[w.profID[s.Profile]]; ok {
				provided[k]++
			}
		}
		if pinnedKept != len(g.pinned) {
			continue
		}
		churn := (len(g.free) - kept) + (len(l) - pinnedKept - kept)
		key := intsKey(provided)
		if prev, ok := byKey[key]; !ok || churn < prev.churn {
			if !ok {
				keys = append(keys, key)
			}
			byKey[key] = gpuOption{provided: provided, churn: churn, layout: l}
		}
	}
	var out []gpuOption
	for _, k := range keys {
		a := byKey[k]
		dominated := false
		for _, k2 := range keys {
			b := byKey[k2]
			if k != k2 && dominates(b.provided, a.provided) && b.churn <= a.churn {
				dominated = true
				break
			}
		}
		if !dominated {
			out = append(out, a)
		}
	}
	return out
}

func freeAt(free []slot, q, start int) bool {
	for _, s := range free {
		if s.prof == q && s.start == start {
			return true
		}
	}
	return false
}

func intsKey(xs []int) string {
	var b strings.Builder
	for _, x := range xs {
		b.WriteString(strconv.Itoa(x))
		b.WriteByte(',')
	}
	return b.String()
}

// minChurn is the least churn with which GPUs gi.. of the node provide d.
func (n *nodeSolver) minChurn(gi int, d []int) nodeSolution {
	satisfied := true
	for _, x := range d {
		if x > 0 {
			satisfied = false
		}
	}
	if satisfied {
		return nodeSolution{feasible: true, choice: -1}
	}
	if gi == len(n.gpus) {
		return nodeSolution{}
	}
	key := strconv.Itoa(gi) + ":" + intsKey(d)
	if sol, ok := n.memo[key]; ok {
		return sol
	}
	best := nodeSolution{}
	rest := make([]int, len(d))
	for ci, opt := range n.gpus[gi] {
		for i := range d {
			rest[i] = max(d[i]-opt.provided[i], 0)
		}
		sub := n.minChurn(gi+1, rest)
		if sub.feasible && (!best.feasible || opt.churn+sub.churn < best.churn) {
			best = nodeSolution{feasible: true, churn: opt.churn + sub.churn, choice: ci}
		}
	}
	n.memo[key] = best
	return best
}

// relayout resets node ni to its initial state, lays its GPUs out as the
// solver's cheapest solution for demand d, and serves pods from it. The
// caller has checked that the solution is feasible and that d is the sum
// of the pods' demands.
func (w *world) relayout(ni int, solver *nodeSolver, d []int, pods []*podState) {
	n := w.buildNode(ni)
	rest := append([]int(nil), d...)
	for gi, g := range n.gpus {
		sol := solver.minChurn(gi, rest)
		if sol.choice < 0 {
			break
		}
		opt := solver.gpus[gi][sol.choice]
		g.setLayout(opt.layout)
		for k := range rest {
			rest[k] = max(rest[k]-opt.provided[k], 0)
		}
	}
	w.nodes[ni] = n
	w.touch(ni)
	for _, ps := range pods {
		ps.node, ps.refs = -1, nil
	}
	for _, ps := range pods {
		if !w.firstFit(ps, ni, false) {
			panic("planner: relayout provides less than its demand")
		}
	}
}

// setLayout makes the GPU's layout l: free slices not in l are destroyed,
// slices of l that do not exist are created, all left free.
func (g *gpuState) setLayout(l []mig.Slice) {
	inLayout := func(q, start int) bool {
		for _, s := range l {
			if s.Start == start && s.Profile == g.model.Profiles[q].Name {
				return true
			}
		}
		return false
	}
	for i := range g.free {
		if !inLayout(g.free[i].prof, g.free[i].start) {
			g.free[i].state = slotDestroyed
			g.model.Remove(&g.occ, g.free[i].prof, g.free[i].start)
		}
	}
	for _, s := range l {
		q, _ := g.model.ProfileIndex(s.Profile)
		if pinnedAt(g.pinned, q, s.Start) || freeAt(g.free, q, s.Start) {
			continue
		}
		g.model.Add(&g.occ, q, s.Start)
		g.free = append(g.free, slot{prof: q, start: s.Start, fresh: true})
	}
	g.have = 0
}
