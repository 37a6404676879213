// Package sim replays a scenario in simulated time under a planning
// strategy: pods arrive, wait for slices, run and finish; every plan's
// changes take the scenario's reconfiguration delay before the new slices
// can be used. It measures what a platform team would: pods served, wait,
// slice utilization and churn.
package sim

import (
	"fmt"
	"math"
	"sort"

	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/pkg/scenario"
)

// Result is one strategy's outcome on a scenario.
type Result struct {
	Strategy        string `json:"strategy"`
	PodsTotal       int    `json:"podsTotal"`
	PodsServed      int    `json:"podsServed"`
	PodsNeverServed int    `json:"podsNeverServed"`
	// Wait is from arrival to bound; a pod never served counts the time
	// from its arrival to the end of the run.
	MeanWaitSeconds  float64 `json:"meanWaitSeconds"`
	P95WaitSeconds   float64 `json:"p95WaitSeconds"`
	SliceUtilization float64 `json:"sliceUtilization"` // allocated compute slices × time / available
	Reconfigurations int     `json:"reconfigurations"` // GPU layout changes
	SlicesCreated    int     `json:"slicesCreated"`
	SlicesDestroyed  int     `json:"slicesDestroyed"`
}

// Run replays the scenario with the named strategy. For "static" it first
// picks, per GPU model, the fixed layout that serves the most pods over the
// whole scenario, then the least mean wait (hindsight an admin does not
// have), lays it out on every empty GPU at time 0 without counting it as
// churn, and never changes it.
func Run(sc *scenario.Scenario, strategy string) (*Result, error) {
	st, err := planner.StrategyByName(strategy)
	if err != nil {
		return nil, err
	}
	if _, ok := st.(planner.Static); !ok {
		return run(sc, st, nil)
	}
	var runErr error
	layouts := planner.BestStatic(sc.Snapshot(), func(l map[string][]mig.Slice) int {
		r, err := run(sc, planner.Static{Layouts: l}, l)
		if err != nil {
			runErr = err
			return -1
		}
		return r.PodsServed*staticWaitWeight - int(math.Min(r.MeanWaitSeconds, staticWaitWeight-1))
	})
	if runErr != nil {
		return nil, runErr
	}
	return run(sc, planner.Static{Layouts: layouts}, layouts)
}

// staticWaitWeight makes one more pod served outweigh any mean wait.
const staticWaitWeight = 1 << 30

type simSlice struct {
	mig.Slice
	pod     int     // -1 when free; -2 for a workload outside the scenario
	readyAt float64 // when the slice can be used
}

type simGPU struct {
	model  *mig.Model
	slices []simSlice
}

type podState int

const (
	pending podState = iota
	waiting          // assigned slices not ready yet
	running
	finished
)

type simPod struct {
	state      podState
	bindAt     float64
	endAt      float64 // +Inf for pods that run forever
	node       int
	gpuSlices  [][2]int // (gpu, start) on node
	computeAll int
}

type simulator struct {
	sc       *scenario.Scenario
	st       planner.Strategy
	nodes    [][]*simGPU
	pods     []simPod
	teardown bool // destroy a pod's slices when it ends
	res      Result
	now      float64
}

func run(sc *scenario.Scenario, st planner.Strategy, static map[string][]mig.Slice) (*Result, error) {
	s := &simulator{sc: sc, st: st, teardown: st.Name() == "firstfit",
		res: Result{Strategy: st.Name(), PodsTotal: len(sc.Pods)}}
	for i, n := range sc.Nodes {
		var gpus []*simGPU
		for _, m := range sc.Models(i) {
			gpus = append(gpus, &simGPU{model: m})
		}
		for _, sl := range n.Slices {
			pod := -1
			if sl.Used {
				pod = -2
			}
			gpus[sl.GPU].slices = append(gpus[sl.GPU].slices, simSlice{Slice: mig.Slice{Profile: mig.MustParseProfile(sl.Profile), Start: sl.Start}, pod: pod})
		}
		for _, g := range gpus {
			if l, ok := static[g.model.Name]; ok && len(g.slices) == 0 {
				for _, ms := range l {
					g.slices = append(g.slices, simSlice{Slice: ms, pod: -1})
				}
			}
		}
		s.nodes = append(s.nodes, gpus)
	}
	s.pods = make([]simPod, len(sc.Pods))
	for i := range s.pods {
		s.pods[i].node = -1
		for p, n := range sc.Demand(i) {
			s.pods[i].computeAll += p.Compute * n
		}
	}
	if err := s.loop(); err != nil {
		return nil, err
	}
	return &s.res, nil
}

// loop advances from event to event: arrivals, slices becoming ready,
// pods finishing. After each it plans for the pods still pending.
func (s *simulator) loop() error {
	order := make([]int, len(s.pods))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return s.sc.Pods[order[a]].Arrival < s.sc.Pods[order[b]].Arrival })
	next := 0 // next arrival in order
	for {
		t := math.Inf(1)
		if next < len(order) {
			t = s.sc.Pods[order[next]].Arrival
		}
		for i := range s.pods {
			switch p := &s.pods[i]; p.state {
			case waiting:
				t = math.Min(t, p.bindAt)
			case running:
				t = math.Min(t, p.endAt)
			}
		}
		if math.IsInf(t, 1) {
			break
		}
		s.now = t
		for i := range s.pods {
			p := &s.pods[i]
			if p.state == running && p.endAt <= t {
				s.finish(i)
			}
			if p.state == waiting && p.bindAt <= t {
				s.start(i)
			}
		}
		for next < len(order) && s.sc.Pods[order[next]].Arrival <= t {
			next++
		}
		if err := s.plan(order[:next]); err != nil {
			return err
		}
	}
	s.summarise()
	return nil
}

func (s *simulator) start(i int) {
	p := &s.pods[i]
	p.state = running
	p.endAt = math.Inf(1)
	if d := s.sc.Pods[i].Duration; d > 0 {
		p.endAt = s.now + d
	}
}

func (s *simulator) finish(i int) {
	p := &s.pods[i]
	p.state = finished
	for _, gs := range p.gpuSlices {
		g := s.nodes[p.node][gs[0]]
		for j := range g.slices {
			if g.slices[j].Start == gs[1] && g.slices[j].pod == i {
				g.slices[j].pod = -1
			}
		}
		if s.teardown {
			kept := g.slices[:0]
			for _, sl := range g.slices {
				if sl.Start == gs[1] && sl.pod == -1 {
					s.res.SlicesDestroyed++
					continue
				}
				kept = append(kept, sl)
			}
			g.slices = kept
			s.res.Reconfigurations++
		}
	}
}

// plan asks the strategy for a plan for the pending pods among arrived and
// applies it.
func (s *simulator) plan(arrived []int) error {
	snap := &planner.Snapshot{}
	var podIndex []int
	for _, i := range arrived {
		if s.pods[i].state != pending {
			continue
		}
		p := s.sc.Pods[i]
		snap.Pods = append(snap.Pods, planner.Pod{Name: p.Name, Requests: s.sc.Demand(i), Priority: p.Priority,
			Created: scenario.At(p.Arrival), Nodes: s.sc.Eligible(i)})
		podIndex = append(podIndex, i)
	}
	if len(podIndex) == 0 {
		return nil
	}
	for ni, gpus := range s.nodes {
		n := planner.Node{Name: s.sc.Nodes[ni].Name}
		for gi, g := range gpus {
			pg := planner.GPU{Index: gi, Model: g.model}
			for _, sl := range g.slices {
				pg.Slices = append(pg.Slices, planner.Slice{Slice: sl.Slice, Used: sl.pod != -1})
			}
			n.GPUs = append(n.GPUs, pg)
		}
		snap.Nodes = append(snap.Nodes, n)
	}
	p := s.st.Plan(snap)
	if err := planner.Check(snap, p); err != nil {
		return fmt.Errorf("%s at t=%gs broke a hard rule: %w", s.st.Name(), s.now, err)
	}
	for ni, nl := range p.Nodes {
		for gi, gl := range nl.GPUs {
			s.relayout(s.nodes[ni][gi], gl.Slices)
		}
	}
	for k, a := range p.Pods {
		if !a.Served() {
			continue
		}
		i := podIndex[k]
		pod := &s.pods[i]
		pod.state, pod.bindAt, pod.node = waiting, s.now, snapNodeIndex(snap, a.Node)
		for _, ref := range a.Slices {
			g := s.nodes[pod.node][ref.GPU]
			for j := range g.slices {
				if sl := &g.slices[j]; sl.Slice == ref.Slice {
					sl.pod = i
					pod.bindAt = math.Max(pod.bindAt, sl.readyAt)
				}
			}
			pod.gpuSlices = append(pod.gpuSlices, [2]int{ref.GPU, ref.Start})
		}
		if pod.bindAt <= s.now {
			s.start(i)
		}
	}
	return nil
}

// relayout makes a GPU's slices the planned layout: slices that are gone
// are destroyed, new ones become ready after the reconfiguration delay.
func (s *simulator) relayout(g *simGPU, planned []planner.Slice) {
	want := map[mig.Slice]bool{}
	for _, sl := range planned {
		want[sl.Slice] = true
	}
	changed := false
	kept := g.slices[:0]
	have := map[mig.Slice]bool{}
	for _, sl := range g.slices {
		k := sl.Slice
		if !want[k] {
			s.res.SlicesDestroyed++
			changed = true
			continue
		}
		have[k] = true
		kept = append(kept, sl)
	}
	g.slices = kept
	for _, sl := range planned {
		if !have[sl.Slice] {
			g.slices = append(g.slices, simSlice{Slice: sl.Slice, pod: -1, readyAt: s.now + s.sc.ReconfigureSeconds})
			s.res.SlicesCreated++
			changed = true
		}
	}
	if changed {
		s.res.Reconfigurations++
	}
}

func snapNodeIndex(s *planner.Snapshot, name string) int {
	for i, n := range s.Nodes {
		if n.Name == name {
			return i
		}
	}
	return -1
}

// summarise computes the result once no event is left. The horizon is the
// last event; pods that run forever run until then.
func (s *simulator) summarise() {
	horizon := s.now
	for _, p := range s.sc.Pods {
		horizon = math.Max(horizon, p.Arrival)
	}
	var waits []float64
	used := 0.0
	for i, p := range s.pods {
		if p.state == pending {
			// A pod never served waited at least until the end.
			s.res.PodsNeverServed++
			waits = append(waits, horizon-s.sc.Pods[i].Arrival)
			continue
		}
		s.res.PodsServed++
		waits = append(waits, p.bindAt-s.sc.Pods[i].Arrival)
		if p.state != waiting {
			used += float64(p.computeAll) * (math.Min(p.endAt, horizon) - p.bindAt)
		}
	}
	if len(waits) > 0 {
		sort.Float64s(waits)
		sum := 0.0
		for _, w := range waits {
			sum += w
		}
		s.res.MeanWaitSeconds = sum / float64(len(waits))
		s.res.P95WaitSeconds = waits[int(math.Ceil(0.95*float64(len(waits))))-1]
	}
	capacity := 0
	for _, gpus := range s.nodes {
		for _, g := range gpus {
			capacity += g.model.ComputeSlices
		}
	}
	if horizon > 0 && capacity > 0 {
		s.res.SliceUtilization = used / (float64(capacity) * horizon)
	}
}
