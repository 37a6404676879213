package planner

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/dynamig/dynamig/pkg/mig"
)

// world is the mutable planning state built from a snapshot. Strategies
// place pods into it; plan() turns it into a Plan. Everything is indexed by
// position so that iteration order, and with it every decision, is fixed.
type world struct {
	snap   *Snapshot
	profs  []mig.ProfileName       // global profile id → name
	profID map[mig.ProfileName]int // name → global profile id
	nodes  []*nodeState
	pods   []*podState
	all    []int // every node index: the eligible list of pods without one
	models map[*mig.Model]modelLocal
	// demanded holds the profiles pods ask for.
	demanded map[mig.ProfileName]bool

	// For pods that may use any node: per global profile id, the nodes by
	// their best option (built on first use); stale entries carry an old
	// version of their node.
	heaps   []*nodeHeap
	version []uint32
}

type podState struct {
	index    int // position in world.pods and Snapshot.Pods
	pod      *Pod
	demand   []demandItem // most compute first
	slices   int          // total slices requested
	compute  int          // total compute slices requested
	eligible []int        // node indices, ascending
	node     int          // -1 while unserved
	refs     []SliceRef
}

type demandItem struct{ prof, count int }

type nodeState struct {
	name     string
	profiles int // global profile ids
	gpus     []*gpuState
	best     []option // per global profile id, computed on demand
	have     []bool   // per global profile id: best is current
	busy     bool     // Node.Busy
}

type gpuState struct {
	index   int
	model   *mig.Model
	mi      *modelInfo
	local   []int  // global profile id → model profile index, -1 if absent
	cached  []int8 // model profile index → its place in best, -1 if not cached (modelLocal)
	ncached int
	pinned  []slot // used, or kept for bound pods: never touched
	free    []slot // existing free slices, then the slices this plan creates
	occ     mig.Occupancy
	avail   uint16 // memory slices not held by pinned, assigned or created slices
	best    []option
	have    uint16 // bit c: best[c] is current
}

// slot is a slice inside the planner: model profile index, start, state.
type slot struct {
	prof, start int
	used        bool // a container holds it (pinned slots only)
	fresh       bool // this plan creates it
	state       slotState
}

type slotState uint8

const (
	slotKept      slotState = iota // exists and stays; free for later pods
	slotAssigned                   // exists (or is created) and serves a pending pod
	slotDestroyed                  // exists and the plan destroys it
)

// option is one way to get a slice of a profile on a GPU.
type option struct {
	ok    bool
	gpu   int // position in nodeState.gpus
	reuse int // position in gpuState.free, or -1 to create
	start int
	cost  int  // slices destroyed and created
	loss  int  // compute slices stranded by the placement
	after int  // placeable compute left on the GPU (less first: fill fuller GPUs)
	big   int  // largest single profile still placeable (more first)
	busy  bool // on a node still applying a plan (Node.Busy); set where nodes are compared
}

// better orders options: churn, stranding, best fit, large regions kept,
// a node not busy applying a plan, then GPU index and highest start for
// determinism.
func (a option) better(b option) bool {
	switch {
	case !b.ok:
		return a.ok
	case !a.ok:
		return false
	case a.cost != b.cost:
		return a.cost < b.cost
	case a.loss != b.loss:
		return a.loss < b.loss
	case a.after != b.after:
		return a.after < b.after
	case a.big != b.big:
		return a.big > b.big
	case a.busy != b.busy:
		return !a.busy
	case a.gpu != b.gpu:
		return a.gpu < b.gpu
	}
	return a.start > b.start
}

// modelInfo holds per-model tables: every valid layout, and for every set
// of available memory slices the most compute placeable in it and the
// largest single profile.
type modelInfo struct {
	layouts    [][]mig.Slice
	maxCompute []int8
	largest    []int8
}

var modelInfos sync.Map // *mig.Model → *modelInfo

func infoFor(m *mig.Model) *modelInfo {
	if mi, ok := modelInfos.Load(m); ok {
		return mi.(*modelInfo)
	}
	n := 1 << m.MemorySlices
	mi := &modelInfo{layouts: m.Layouts(nil), maxCompute: make([]int8, n), largest: make([]int8, n)}
	type shape struct {
		mask    uint16
		compute int8
	}
	var shapes []shape
	for _, l := range mi.layouts {
		var s shape
		for _, sl := range l {
			i, _ := m.ProfileIndex(sl.Profile)
			s.mask |= m.Mask(i, sl.Start)
			s.compute += int8(m.Profiles[i].ComputeSlices)
		}
		shapes = append(shapes, s)
	}
	for avail := 0; avail < n; avail++ {
		for _, s := range shapes {
			if s.mask&^uint16(avail) == 0 && s.compute > mi.maxCompute[avail] {
				mi.maxCompute[avail] = s.compute
			}
		}
		for i, p := range m.Profiles {
			for _, st := range p.Starts {
				if m.Mask(i, st)&^uint16(avail) == 0 && int8(p.ComputeSlices) > mi.largest[avail] {
					mi.largest[avail] = int8(p.ComputeSlices)
				}
			}
		}
	}
	actual, _ := modelInfos.LoadOrStore(m, mi)
	return actual.(*modelInfo)
}

// newWorld builds the planning state. The snapshot must be valid.
func newWorld(s *Snapshot) *world {
	w := &world{snap: s, profID: map[mig.ProfileName]int{}}
	intern := func(p mig.ProfileName) int {
		id, ok := w.profID[p]
		if !ok {
			id = len(w.profs)
			w.profID[p] = id
			w.profs = append(w.profs, p)
		}
		return id
	}
	for _, n := range s.Nodes {
		for _, g := range n.GPUs {
			for _, p := range g.Model.Profiles {
				intern(p.Name)
			}
		}
	}
	w.demanded = map[mig.ProfileName]bool{}
	for _, p := range s.Pods {
		for _, prof := range sortedProfiles(p.Requests) {
			intern(prof)
			w.demanded[prof] = true
		}
	}
	w.models = map[*mig.Model]modelLocal{}
	nodeIndex := make(map[string]int, len(s.Nodes))
	w.all = make([]int, len(s.Nodes))
	w.nodes = make([]*nodeState, 0, len(s.Nodes))
	for ni := range s.Nodes {
		nodeIndex[s.Nodes[ni].Name] = ni
		w.all[ni] = ni
		w.nodes = append(w.nodes, w.buildNode(ni))
	}
	w.version = make([]uint32, len(w.nodes))
	w.heaps = make([]*nodeHeap, len(w.profs))
	for pi := range s.Pods {
		p := &s.Pods[pi]
		ps := &podState{index: pi, pod: p, node: -1}
		for _, prof := range sortedProfiles(p.Requests) {
			ps.demand = append(ps.demand, demandItem{prof: w.profID[prof], count: p.Requests[prof]})
			ps.slices += p.Requests[prof]
			ps.compute += p.Requests[prof] * prof.Compute
		}
		if p.Nodes == nil {
			ps.eligible = w.all
		} else {
			for _, name := range p.Nodes {
				ps.eligible = append(ps.eligible, nodeIndex[name])
			}
			sort.Ints(ps.eligible)
		}
		w.pods = append(w.pods, ps)
	}
	return w
}

// modelLocal is what a world keeps per model: its tables, and its profile
// index for each global profile id (-1 if the model lacks the profile).
type modelLocal struct {
	mi    *modelInfo
	local []int
	// cached is, per model profile index, where a GPU caches its option
	// (gpuState.best), or -1 for a profile no pod asks for (never
	// cached): a GPU's cache holds only the profiles pods ask for.
	cached  []int8
	ncached int
}

// buildNode builds node ni's planning state as the snapshot has it. Its
// GPUs' states and slots share one allocation each (every plan builds
// thousands); a GPU's pinned and free slots are windows of the slots
// clipped to their length, so that appending to one copies it.
func (w *world) buildNode(ni int) *nodeState {
	n := &w.snap.Nodes[ni]
	ns := &nodeState{name: n.Name, profiles: len(w.profs), gpus: make([]*gpuState, len(n.GPUs)), busy: n.Busy}
	states := make([]gpuState, len(n.GPUs))
	total := 0
	for _, g := range n.GPUs {
		total += len(g.Slices)
	}
	slots := make([]slot, 0, total)
	for gi, g := range n.GPUs {
		ml, ok := w.models[g.Model]
		if !ok {
			ml = modelLocal{mi: infoFor(g.Model), local: make([]int, len(w.profs)), cached: make([]int8, len(g.Model.Profiles))}
			for id, p := range w.profs {
				ml.local[id] = -1
				if i, ok := g.Model.ProfileIndex(p); ok {
					ml.local[id] = i
				}
			}
			for q, p := range g.Model.Profiles {
				ml.cached[q] = -1
				if w.demanded[p.Name] {
					ml.cached[q] = int8(ml.ncached)
					ml.ncached++
				}
			}
			w.models[g.Model] = ml
		}
		gs := &states[gi]
		*gs = gpuState{index: g.Index, model: g.Model, mi: ml.mi, local: ml.local, cached: ml.cached, ncached: ml.ncached, avail: g.Model.FullMask()}
		first := len(slots)
		for _, sl := range g.Slices {
			i, _ := g.Model.ProfileIndex(sl.Profile)
			g.Model.Add(&gs.occ, i, sl.Start)
			if sl.Used {
				slots = append(slots, slot{prof: i, start: sl.Start, used: true})
				gs.avail &^= g.Model.Mask(i, sl.Start)
			}
		}
		gs.pinned = slots[first:len(slots):len(slots)]
		first = len(slots)
		for _, sl := range g.Slices {
			if !sl.Used {
				i, _ := g.Model.ProfileIndex(sl.Profile)
				slots = append(slots, slot{prof: i, start: sl.Start})
			}
		}
		gs.free = slots[first:len(slots):len(slots)]
		slices.SortStableFunc(gs.free, func(a, b slot) int { return a.start - b.start })
		ns.gpus[gi] = gs
	}
	w.pinBound(ns, n.Bound)
	return ns
}

// pinBound keeps, per profile, enough free slices for the pods bound to the
// node whose devices kubelet has not allocated yet (invariant 2): the first
// ones in GPU and start order are pinned.
func (w *world) pinBound(ns *nodeState, bound map[mig.ProfileName]int) {
	for _, prof := range sortedProfiles(bound) {
		need := bound[prof]
		for _, g := range ns.gpus {
			for _, s := range g.pinned {
				if g.model.Profiles[s.prof].Name == prof {
					need--
				}
			}
		}
		for _, g := range ns.gpus {
			kept := g.free[:0]
			for _, s := range g.free {
				if need > 0 && g.model.Profiles[s.prof].Name == prof {
					need--
					g.pinned = append(g.pinned, s)
					g.avail &^= g.model.Mask(s.prof, s.start)
					continue
				}
				kept = append(kept, s)
			}
			g.free = kept
		}
	}
}

// held is the memory a new slice must not overlap: pinned, assigned and
// created slices. Kept free slices may be destroyed to make room.
func (g *gpuState) held() uint16 { return g.model.FullMask() &^ g.avail }

// options returns the best way to get one slice of model profile q, from
// the cache.
func (g *gpuState) option(q int) option {
	c := g.cached[q]
	if c < 0 {
		return g.computeOption(q)
	}
	if g.have&(1<<c) == 0 {
		if g.best == nil {
			g.best = make([]option, g.ncached)
		}
		g.best[c] = g.computeOption(q)
		g.have |= 1 << c
	}
	return g.best[c]
}

func (g *gpuState) score(o *option, q int, mask uint16) {
	before := int(g.mi.maxCompute[g.avail])
	after := g.avail &^ mask
	o.after = int(g.mi.maxCompute[after])
	o.loss = before - o.after - g.model.Profiles[q].ComputeSlices
	o.big = int(g.mi.largest[after])
	o.ok = true
}

func (g *gpuState) computeOption(q int) option {
	best := option{}
	for i, s := range g.free {
		if s.state != slotKept || s.prof != q {
			continue
		}
		o := option{reuse: i, start: s.start}
		g.score(&o, q, g.model.Mask(q, s.start))
		if o.better(best) {
			best = o
		}
	}
	if best.ok {
		return best // reusing costs nothing; creating cannot beat it
	}
	held := g.held()
	for _, start := range g.model.Profiles[q].Starts {
		mask := g.model.Mask(q, start)
		if mask&held != 0 {
			continue
		}
		occ := g.occ
		cost := 1
		for _, s := range g.free {
			if s.state == slotKept && g.model.Mask(s.prof, s.start)&mask != 0 {
				g.model.Remove(&occ, s.prof, s.start)
				cost++
			}
		}
		if !g.model.CanAdd(&occ, q, start) {
			continue
		}
		o := option{reuse: -1, start: start, cost: cost}
		g.score(&o, q, mask)
		if o.better(best) {
			best = o
		}
	}
	return best
}

// apply takes an option on the GPU and returns the slice it yields.
func (g *gpuState) apply(o option, q int) {
	mask := g.model.Mask(q, o.start)
	if o.reuse >= 0 {
		g.free[o.reuse].state = slotAssigned
	} else {
		for i := range g.free {
			s := &g.free[i]
			if s.state == slotKept && g.model.Mask(s.prof, s.start)&mask != 0 {
				s.state = slotDestroyed
				g.model.Remove(&g.occ, s.prof, s.start)
			}
		}
		g.model.Add(&g.occ, q, o.start)
		g.free = append(g.free, slot{prof: q, start: o.start, fresh: true, state: slotAssigned})
	}
	g.avail &^= mask
	g.have = 0
}

// bestOn returns the best option for global profile id on a node.
func (n *nodeState) bestOn(id int) option {
	if n.have == nil {
		n.best = make([]option, n.profiles)
		n.have = make([]bool, n.profiles)
	}
	if !n.have[id] {
		best := option{}
		for gi, g := range n.gpus {
			if q := g.local[id]; q >= 0 {
				o := g.option(q)
				o.gpu = gi
				if o.better(best) {
					best = o
				}
			}
		}
		n.best[id], n.have[id] = best, true
	}
	return n.best[id]
}

// changed drops the node's cached options after one of its GPUs changed.
func (n *nodeState) changed() {
	for i := range n.have {
		n.have[i] = false
	}
}

// place puts one slice of global profile id on the node's best option and
// returns it; ok is false if the node has no room.
func (n *nodeState) place(id int) (SliceRef, option, bool) {
	o := n.bestOn(id)
	if !o.ok {
		return SliceRef{}, o, false
	}
	g := n.gpus[o.gpu]
	q := g.local[id]
	g.apply(o, q)
	n.changed()
	return SliceRef{GPU: g.index, Slice: mig.Slice{Profile: g.model.Profiles[q].Name, Start: o.start}}, o, true
}

// clone copies a node's mutable state so that a placement can be tried.
func (n *nodeState) clone() *nodeState {
	c := &nodeState{name: n.name, profiles: n.profiles, gpus: make([]*gpuState, len(n.gpus)), busy: n.busy}
	states := make([]gpuState, len(n.gpus))
	for i, g := range n.gpus {
		cg := &states[i]
		*cg = *g
		cg.pinned = g.pinned // never mutated
		cg.free = slices.Clip(slices.Clone(g.free))
		cg.best, cg.have = nil, 0
		c.gpus[i] = cg
	}
	return c
}

// cost evaluates serving a pod on node ni without changing the world: the
// summed options of its slices, or ok=false if the node has no room.
func (w *world) cost(ps *podState, ni int) (option, bool) {
	if ps.slices == 1 {
		o := w.nodes[ni].bestOn(ps.demand[0].prof)
		return o, o.ok
	}
	total, _, ok := w.nodes[ni].clone().placeAll(ps)
	return total, ok
}

// commit serves a pod on node ni: all of its slices, or nothing.
func (w *world) commit(ps *podState, ni int) bool {
	n := w.nodes[ni]
	if ps.slices > 1 {
		n = n.clone()
	}
	_, refs, ok := n.placeAll(ps)
	if !ok {
		return false
	}
	w.nodes[ni] = n
	w.touch(ni)
	ps.node = ni
	ps.refs = refs
	return true
}

// placeAll places every slice a pod requests on the node, each at the
// node's best option at that moment, and sums the options.
func (n *nodeState) placeAll(ps *podState) (option, []SliceRef, bool) {
	total := option{ok: true}
	refs := make([]SliceRef, 0, ps.slices)
	for _, d := range ps.demand {
		for k := 0; k < d.count; k++ {
			ref, o, ok := n.place(d.prof)
			if !ok {
				return option{}, nil, false
			}
			total.cost += o.cost
			total.loss += o.loss
			total.after += o.after
			total.big += o.big
			refs = append(refs, ref)
		}
	}
	return total, refs, true
}

// stranded counts, over all GPUs, the compute slices that no new slice can
// use: not held, yet unplaceable.
func (w *world) stranded() int {
	total := 0
	for _, n := range w.nodes {
		for _, g := range n.gpus {
			heldCompute := 0
			for _, s := range g.pinned {
				heldCompute += g.model.Profiles[s.prof].ComputeSlices
			}
			for _, s := range g.free {
				if s.state == slotAssigned {
					heldCompute += g.model.Profiles[s.prof].ComputeSlices
				}
			}
			total += g.model.ComputeSlices - heldCompute - int(g.mi.maxCompute[g.avail])
		}
	}
	return total
}

// plan renders the world as a Plan.
func (w *world) plan(strategy string) *Plan {
	p := &Plan{Strategy: strategy, Nodes: make([]NodeLayout, 0, len(w.nodes)), Pods: make([]Assignment, 0, len(w.pods))}
	for _, n := range w.nodes {
		nl := NodeLayout{Name: n.name, GPUs: make([]GPULayout, 0, len(n.gpus))}
		for _, g := range n.gpus {
			gl := GPULayout{Index: g.index, Model: g.model.Name, Slices: make([]Slice, 0, len(g.pinned)+len(g.free))}
			add := func(s slot) {
				gl.Slices = append(gl.Slices, Slice{Slice: mig.Slice{Profile: g.model.Profiles[s.prof].Name, Start: s.start}, Used: s.used})
			}
			for _, s := range g.pinned {
				add(s)
			}
			for _, s := range g.free {
				switch {
				case s.state == slotDestroyed:
					p.Destroyed++
					continue
				case s.fresh:
					p.Created++
				}
				add(s)
			}
			slices.SortFunc(gl.Slices, func(a, b Slice) int { return a.Start - b.Start })
			nl.GPUs = append(nl.GPUs, gl)
		}
		p.Nodes = append(p.Nodes, nl)
	}
	for _, ps := range w.pods {
		a := Assignment{Pod: ps.pod.Name}
		if ps.node >= 0 {
			a.Node = w.nodes[ps.node].name
			a.Slices = ps.refs
			p.Served++
		} else {
			a.Reason = w.reason(ps)
		}
		p.Pods = append(p.Pods, a)
	}
	return p
}

// reason explains why a pod is not served.
func (w *world) reason(ps *podState) string {
	if len(ps.eligible) == 0 {
		return "no eligible node (node selectors, taints or other filters exclude every MIG node)"
	}
	var missing []string
	for _, d := range ps.demand {
		offered := false
		for _, ni := range ps.eligible {
			for _, g := range w.nodes[ni].gpus {
				if g.local[d.prof] >= 0 {
					offered = true
				}
			}
		}
		if !offered {
			missing = append(missing, w.profs[d.prof].String())
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("no GPU on the %d eligible node(s) offers profile %s", len(ps.eligible), strings.Join(missing, ", "))
	}
	var want []string
	for _, d := range ps.demand {
		want = append(want, fmt.Sprintf("%s×%d", w.profs[d.prof], d.count))
	}
	return fmt.Sprintf("no room for %s on the %d eligible node(s) without removing slices in use", strings.Join(want, " + "), len(ps.eligible))
}
