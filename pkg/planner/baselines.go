package planner

import (
	"sort"
	"strings"
	"sync"

	"github.com/dynamig/dynamig/pkg/mig"
)

// The baselines model how other systems decide, in the same harness, so
// that "better than the others" is measured rather than claimed.

// FirstFit places each pod in arrival order on the first node that fits,
// each slice at the first free legal placement: an existing free slice of
// the profile, else the lowest start in unoccupied memory. It never
// destroys a slice to make room. This is how OpenShift's DAS and NVIDIA's
// DRA driver decide: one pod at a time.
type FirstFit struct{}

// Name implements Strategy.
func (FirstFit) Name() string { return "firstfit" }

// Plan implements Strategy.
func (FirstFit) Plan(s *Snapshot) *Plan {
	w := newWorld(s)
	for _, ps := range w.ordered(oldestFirst) {
		for _, ni := range ps.eligible {
			if w.firstFit(ps, ni, true) {
				break
			}
		}
	}
	return w.plan("firstfit")
}

// firstFit serves a pod on node ni with first-fit slices: existing free
// slices first, then, if create, new slices at the lowest free start.
func (w *world) firstFit(ps *podState, ni int, create bool) bool {
	n := w.nodes[ni].clone()
	var refs []SliceRef
	for _, d := range ps.demand {
		for k := 0; k < d.count; k++ {
			placed := false
			for _, g := range n.gpus {
				q := g.local[d.prof]
				if q < 0 {
					continue
				}
				if o, ok := g.firstFit(q, create); ok {
					g.apply(o, q)
					refs = append(refs, SliceRef{GPU: g.index, Slice: mig.Slice{Profile: g.model.Profiles[q].Name, Start: o.start}})
					placed = true
					break
				}
			}
			if !placed {
				return false
			}
		}
	}
	w.nodes[ni] = n
	w.touch(ni)
	ps.node, ps.refs = ni, refs
	return true
}

// firstFit returns the first kept free slice of profile q on the GPU, else
// (if create) the lowest start that overlaps no slice at all.
func (g *gpuState) firstFit(q int, create bool) (option, bool) {
	for i, s := range g.free {
		if s.state == slotKept && s.prof == q {
			return option{ok: true, reuse: i, start: s.start}, true
		}
	}
	if !create {
		return option{}, false
	}
	for _, start := range g.model.Profiles[q].Starts {
		if g.model.Mask(q, start)&g.occ.Mask == 0 && g.model.CanAdd(&g.occ, q, start) {
			return option{ok: true, reuse: -1, start: start, cost: 1}, true
		}
	}
	return option{}, false
}

// ordered returns the pods sorted by less.
func (w *world) ordered(less func(a, b *podState) bool) []*podState {
	order := append([]*podState(nil), w.pods...)
	sort.SliceStable(order, func(i, j int) bool { return less(order[i], order[j]) })
	return order
}

// assignExisting serves pods in arrival order from existing free slices
// only, first fit: what the default scheduler does once layouts are fixed.
func (w *world) assignExisting() {
	for _, ps := range w.ordered(oldestFirst) {
		for _, ni := range ps.eligible {
			if w.firstFit(ps, ni, false) {
				break
			}
		}
	}
}

// Nos is nebuly-ai/nos's greedy: nodes in name order; on each GPU pick, from
// a fixed list of whole-GPU geometries, the one that supplies the most
// missing profiles without going below the used count of any profile. It
// ignores placements and churn: a repartitioned GPU loses all its free
// slices and gets the geometry created anew. Pods then take free slices
// first fit. The list is the model's maximal multisets of its classic
// profiles (for the A100 family: 1g, 2g, 3g, 4g, 7g — 12 geometries; nos's
// own hand-written list had 10 of them).
type Nos struct{}

// Name implements Strategy.
func (Nos) Name() string { return "nos" }

// Plan implements Strategy.
func (Nos) Plan(s *Snapshot) *Plan {
	w := newWorld(s)
	missing := make([]int, len(w.profs))
	for _, ps := range w.pods {
		for _, d := range ps.demand {
			missing[d.prof] += d.count
		}
	}
	for _, n := range w.nodes {
		for _, g := range n.gpus {
			for _, s := range g.free {
				if id, ok := w.profID[g.model.Profiles[s.prof].Name]; ok {
					missing[id]--
				}
			}
		}
	}
	byName := make([]int, len(w.nodes))
	for i := range byName {
		byName[i] = i
	}
	sort.SliceStable(byName, func(a, b int) bool { return w.nodes[byName[a]].name < w.nodes[byName[b]].name })
	for _, ni := range byName {
		for _, g := range w.nodes[ni].gpus {
			w.nosRepartition(g, missing)
		}
	}
	w.assignExisting()
	return w.plan("nos")
}

// nosRepartition applies nos's geometry choice to one GPU.
func (w *world) nosRepartition(g *gpuState, missing []int) {
	m := g.model
	// What would be missing if this GPU's free slices went away.
	need := append([]int(nil), missing...)
	freeCount := make([]int, len(m.Profiles))
	for _, s := range g.free {
		freeCount[s.prof]++
	}
	usedCount := make([]int, len(m.Profiles))
	for _, s := range g.pinned {
		usedCount[s.prof]++
	}
	supply := func(counts []int) int {
		total := 0
		for id, q := range g.local {
			if q >= 0 && need[id] > 0 {
				total += min(counts[q], need[id])
			}
		}
		return total
	}
	for id, q := range g.local {
		if q >= 0 {
			need[id] += freeCount[q]
		}
	}
	current := supply(freeCount)
	var best []mig.Slice
	bestSupply := current
	for _, geo := range classicGeometries(m) {
		extra := make([]int, len(m.Profiles))
		ok := true
		for q := range m.Profiles {
			extra[q] = geo.counts[q] - usedCount[q]
			if extra[q] < 0 {
				ok = false
			}
		}
		if !ok {
			continue
		}
		if sup := supply(extra); sup > bestSupply {
			if l := realize(m, geo.counts, g); l != nil {
				best, bestSupply = l, sup
			}
		}
	}
	if best != nil {
		g.setLayout(best)
		for i := range freeCount {
			freeCount[i] = 0
		}
		for _, s := range g.free {
			if s.state != slotDestroyed {
				freeCount[s.prof]++
			}
		}
	}
	for id, q := range g.local {
		if q >= 0 {
			missing[id] = need[id] - freeCount[q]
		}
	}
}

func pinnedAt(pinned []slot, q, start int) bool {
	for _, s := range pinned {
		if s.prof == q && s.start == start {
			return true
		}
	}
	return false
}

// geometry is a profile multiset of one model: count per profile index.
type geometry struct{ counts []int }

var geometryCache sync.Map // *mig.Model → []geometry

// classic reports whether a profile is one of a model's classic profiles:
// no media-engine or graphics variant, and as many memory as compute slices
// except for the 3g (which NVIDIA gives 4 memory slices).
func classic(m *mig.Model, p mig.ProfileName) bool {
	i, _ := m.ProfileIndex(p)
	prof := m.Profiles[i]
	return p.Variant == mig.VariantNone && !(prof.ComputeSlices == 1 && prof.MemorySlices > 1)
}

// classicGeometries returns the maximal multisets of the model's classic
// profiles, in a fixed order.
func classicGeometries(m *mig.Model) []geometry {
	if g, ok := geometryCache.Load(m); ok {
		return g.([]geometry)
	}
	keys := map[string][]int{}
	for _, l := range m.Layouts(func(p mig.ProfileName) bool { return classic(m, p) }) {
		counts := make([]int, len(m.Profiles))
		for _, s := range l {
			q, _ := m.ProfileIndex(s.Profile)
			counts[q]++
		}
		keys[countsKey(counts)] = counts
	}
	var out []geometry
	for k, c := range keys {
		maximal := true
		for k2, c2 := range keys {
			if k != k2 && dominates(c2, c) {
				maximal = false
				break
			}
		}
		if maximal {
			out = append(out, geometry{counts: c})
		}
	}
	sort.Slice(out, func(i, j int) bool { return countsKey(out[i].counts) < countsKey(out[j].counts) })
	actual, _ := geometryCache.LoadOrStore(m, out)
	return actual.([]geometry)
}

func countsKey(c []int) string {
	var b strings.Builder
	for _, n := range c {
		b.WriteByte(byte('a' + n))
	}
	return b.String()
}

func dominates(big, small []int) bool {
	for i := range small {
		if big[i] < small[i] {
			return false
		}
	}
	return true
}

// realize finds a valid layout with exactly the given profile counts that
// keeps every pinned slice at its place and, among those, as many of the
// GPU's free slices as possible (nos deletes and creates only the
// difference in counts); nil if there is none.
func realize(m *mig.Model, counts []int, g *gpuState) []mig.Slice {
	var best []mig.Slice
	bestKept := -1
	for _, l := range infoFor(m).layouts {
		c := make([]int, len(m.Profiles))
		pinned, kept := 0, 0
		for _, s := range l {
			q, _ := m.ProfileIndex(s.Profile)
			c[q]++
			switch {
			case pinnedAt(g.pinned, q, s.Start):
				pinned++
			case freeAt(g.free, q, s.Start):
				kept++
			}
		}
		if pinned == len(g.pinned) && kept > bestKept && countsKey(c) == countsKey(counts) {
			best, bestKept = l, kept
		}
	}
	return best
}

// Static is what a GPU Operator admin does: one fixed layout per GPU model,
// applied to every unpartitioned GPU of that model and never changed. Pods
// take free slices first fit. Layouts maps a model name to its layout; if
// nil, each model gets the best layout for the snapshot, chosen with
// hindsight from the model's maximal layouts of plain profiles (see
// StaticCandidates). Laying out an empty GPU counts as creating its slices.
type Static struct {
	Layouts map[string][]mig.Slice
}

// Name implements Strategy.
func (Static) Name() string { return "static" }

// Plan implements Strategy.
func (st Static) Plan(s *Snapshot) *Plan {
	layouts := st.Layouts
	if layouts == nil {
		layouts = BestStatic(s, func(l map[string][]mig.Slice) int { return staticPlan(s, l).Served })
	}
	return staticPlan(s, layouts)
}

// staticPlan gives every GPU without slices its model's layout, then
// serves pods from free slices.
func staticPlan(s *Snapshot, layouts map[string][]mig.Slice) *Plan {
	w := newWorld(s)
	for _, n := range w.nodes {
		for _, g := range n.gpus {
			if l, ok := layouts[g.model.Name]; ok && len(g.pinned) == 0 && len(g.free) == 0 {
				g.setLayout(l)
			}
		}
	}
	w.assignExisting()
	return w.plan("static")
}

// StaticCandidates returns the layouts a static admin would choose from:
// the model's maximal placement layouts of plain (no +me, -me, +gfx)
// profiles, in enumeration order.
func StaticCandidates(m *mig.Model) [][]mig.Slice {
	plain := func(p mig.ProfileName) bool { return p.Variant == mig.VariantNone }
	var out [][]mig.Slice
	for _, l := range m.Layouts(plain) {
		if len(l) > 0 && !m.CanExtend(l, plain) {
			out = append(out, l)
		}
	}
	return out
}

// BestStatic chooses one layout per model of the snapshot, model by model
// in name order, keeping for each the candidate that maximises score (the
// first one on ties) with the models before it fixed.
func BestStatic(s *Snapshot, score func(map[string][]mig.Slice) int) map[string][]mig.Slice {
	models := map[string]*mig.Model{}
	for _, n := range s.Nodes {
		for _, g := range n.GPUs {
			models[g.Model.Name] = g.Model
		}
	}
	names := make([]string, 0, len(models))
	for name := range models {
		names = append(names, name)
	}
	sort.Strings(names)
	chosen := map[string][]mig.Slice{}
	for _, name := range names {
		bestScore, best := -1, []mig.Slice(nil)
		for _, cand := range StaticCandidates(models[name]) {
			chosen[name] = cand
			if sc := score(chosen); sc > bestScore {
				bestScore, best = sc, cand
			}
		}
		chosen[name] = best
	}
	return chosen
}
