package scenario

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strings"

	"github.com/dynamig/dynamig/pkg/mig"
)

// GenOptions shapes a random scenario. The same options give the same file.
type GenOptions struct {
	Seed        uint64
	Mix         string   // small, large, bimodal or diurnal
	Nodes       int      // nodes
	GPUsPerNode int      // GPUs per node
	Models      []string // catalog models, given to nodes in turn
	Pods        int      // pods over the whole scenario
	Hours       float64  // arrival window
	// Load is the offered load: requested compute slices × run time over
	// the cluster's compute slices × the window. Durations are scaled to it.
	Load               float64
	ReconfigureSeconds float64
}

// Mixes are the workload mixes Generate knows, each a weight per size
// class: 1g, 1g with two memory slices, 2g, 3g, 4g, 7g (the whole GPU).
var Mixes = map[string][6]float64{
	"small":   {6, 2, 2, 0, 0, 0},
	"large":   {0, 0, 1, 4, 3, 2},
	"bimodal": {7, 0, 0, 0, 0, 3},
	"diurnal": {4, 1, 2, 2, 1, 1},
}

// MixNames lists the mixes in a fixed order.
func MixNames() []string {
	var names []string
	for n := range Mixes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Generate writes a random scenario. Arrivals are Poisson over the window;
// the diurnal mix varies the arrival rate over it like a working day.
// Durations are exponential, scaled so that the offered load is o.Load.
// One pod in ten has priority 100; one in twenty asks for two slices.
func Generate(o GenOptions) (*Scenario, error) {
	weights, ok := Mixes[o.Mix]
	switch {
	case !ok:
		return nil, fmt.Errorf("unknown mix %q (known: %s)", o.Mix, strings.Join(MixNames(), ", "))
	case o.Nodes <= 0 || o.GPUsPerNode <= 0 || o.Pods <= 0:
		return nil, fmt.Errorf("nodes, GPUs per node and pods must be positive")
	case o.Hours <= 0 || o.Load <= 0:
		return nil, fmt.Errorf("hours and load must be positive")
	case len(o.Models) == 0:
		return nil, fmt.Errorf("at least one GPU model is needed")
	}
	models := make([]*mig.Model, len(o.Models))
	for i, name := range o.Models {
		m, err := mig.ModelByName(name)
		if err != nil {
			return nil, err
		}
		models[i] = m
	}
	r := rand.New(rand.NewPCG(o.Seed, 0x5eed))
	s := &Scenario{ReconfigureSeconds: o.ReconfigureSeconds}
	capacity := 0
	var gpuModels []*mig.Model // one entry per GPU, to draw a pod's model
	for i := 0; i < o.Nodes; i++ {
		m := models[i%len(models)]
		n := Node{Name: fmt.Sprintf("node-%02d", i), Labels: map[string]string{"nvidia.com/gpu.product": productLabel(m)}}
		for g := 0; g < o.GPUsPerNode; g++ {
			n.GPUs = append(n.GPUs, m.Name)
			gpuModels = append(gpuModels, m)
			capacity += m.ComputeSlices
		}
		s.Nodes = append(s.Nodes, n)
	}
	window := o.Hours * 3600
	arrivals := make([]float64, o.Pods)
	for i := range arrivals {
		arrivals[i] = arrival(r, o.Mix, window)
	}
	sort.Float64s(arrivals)
	totalCompute := 0
	for i := 0; i < o.Pods; i++ {
		m := gpuModels[r.IntN(len(gpuModels))]
		p := Pod{
			Name:     fmt.Sprintf("pod-%04d", i),
			Arrival:  math.Round(arrivals[i]),
			Duration: r.ExpFloat64(), // scaled below
			Requests: map[string]int{},
		}
		if r.IntN(10) == 0 {
			p.Priority = 100
		}
		slices := 1
		if r.IntN(20) == 0 {
			slices = 2
		}
		for k := 0; k < slices; k++ {
			prof := pickProfile(r, m, weights)
			p.Requests[prof.Name.ResourceName()]++
			totalCompute += prof.ComputeSlices
		}
		s.Pods = append(s.Pods, p)
	}
	// Scale durations: sum(compute × duration) = load × capacity × window.
	weighted := 0.0
	for _, p := range s.Pods {
		weighted += float64(computeOf(p)) * p.Duration
	}
	scale := o.Load * float64(capacity) * window / weighted
	for i := range s.Pods {
		s.Pods[i].Duration = math.Max(60, math.Round(s.Pods[i].Duration*scale))
	}
	data, err := s.Marshal()
	if err != nil {
		return nil, err
	}
	return Parse(data) // validates and resolves
}

func computeOf(p Pod) int {
	total := 0
	for r, n := range p.Requests {
		prof, _ := mig.ParseResourceName(r)
		total += prof.Compute * n
	}
	return total
}

// arrival draws an arrival time in the window; diurnal arrivals follow
// 1 − cos over the window (quiet at the ends, busy in the middle).
func arrival(r *rand.Rand, mix string, window float64) float64 {
	if mix != "diurnal" {
		return r.Float64() * window
	}
	for {
		x := r.Float64()
		if r.Float64()*2 < 1-math.Cos(2*math.Pi*x) {
			return x * window
		}
	}
}

// pickProfile draws a plain profile of the model by size class; a class the
// model lacks (7g on an A30) falls to the largest it has.
func pickProfile(r *rand.Rand, m *mig.Model, weights [6]float64) mig.Profile {
	total := 0.0
	for _, w := range weights {
		total += w
	}
	x := r.Float64() * total
	class := 0
	for ; class < len(weights)-1; class++ {
		x -= weights[class]
		if x < 0 {
			break
		}
	}
	want := [6]struct{ compute, memory int }{{1, 1}, {1, 2}, {2, 2}, {3, 4}, {4, 4}, {m.ComputeSlices, m.MemorySlices}}[class]
	var best mig.Profile
	for _, p := range m.Profiles {
		if p.Name.Variant != mig.VariantNone {
			continue
		}
		if p.ComputeSlices == want.compute && p.MemorySlices == want.memory {
			return p
		}
		if p.ComputeSlices <= want.compute && p.ComputeSlices > best.ComputeSlices {
			best = p
		}
	}
	return best
}

// productLabel is the GPU Feature Discovery product label of a model's
// first NVML name: "NVIDIA A100-SXM4-80GB" → "NVIDIA-A100-SXM4-80GB".
func productLabel(m *mig.Model) string {
	return strings.ReplaceAll(m.NVMLNames[0], " ", "-")
}
