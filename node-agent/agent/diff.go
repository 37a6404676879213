package agent

import (
	"fmt"
	"sort"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Observed is one GPU as the agent saw it: NVML's slices, each with the
// pod kubelet says holds it.
type Observed struct {
	GPU    gpu.GPU
	Slices []ObservedSlice
}

// ObservedSlice is a slice and its holder, "namespace/name" or "".
type ObservedSlice struct {
	gpu.Slice
	Holder string
}

// StepKind is what a step does.
type StepKind string

// Step kinds, in the order a plan runs them.
const (
	Destroy StepKind = "destroy"
	Create  StepKind = "create"
)

// Step is one named, idempotent change to one GPU: running it again after
// it succeeded changes nothing.
type Step struct {
	Kind  StepKind
	GPU   int
	Slice mig.Slice
}

func (s Step) String() string { return fmt.Sprintf("%s %s on gpu %d", s.Kind, s.Slice, s.GPU) }

// Conflict is why a GPU of the spec cannot be changed now.
type Conflict struct {
	GPU     int
	Reason  string // a condition reason: ReasonSliceInUse, ReasonMIGDisabled, …
	Message string
}

// Diff turns the desired layouts into steps: for each GPU the spec lists,
// destroy the slices it does not want, then create the ones missing (or
// missing their compute instance). A GPU on which a slice to destroy is
// held by a pod — or may be, when kubelet could not be asked (verified is
// false) — gets no steps at all, and a conflict instead: the agent never
// destroys what it cannot prove is free. Destroys of every GPU come before
// any create; within a kind, steps go by GPU, then start.
func Diff(observed []Observed, spec map[int][]mig.Slice, verified bool) ([]Step, []Conflict) {
	var destroys, creates []Step
	var conflicts []Conflict
	seen := map[int]bool{}
	for _, o := range observed {
		want, ok := spec[o.GPU.Index]
		seen[o.GPU.Index] = true
		if !ok {
			continue // a GPU the spec does not list keeps its slices
		}
		if !o.GPU.MIG.Current {
			conflicts = append(conflicts, Conflict{GPU: o.GPU.Index, Reason: ReasonMIGDisabled, Message: migDisabled(o.GPU)})
			continue
		}
		wanted := map[mig.Slice]bool{}
		for _, s := range want {
			wanted[s] = true
		}
		var gd, gc []Step
		var blocked []string
		reason := ReasonSliceInUse
		have := map[mig.Slice]bool{}
		for _, s := range o.Slices {
			sl := mig.Slice{Profile: s.Profile, Start: s.Start}
			if wanted[sl] {
				if s.CI >= 0 {
					have[sl] = true
				}
				continue
			}
			switch {
			case s.Holder != "":
				blocked = append(blocked, fmt.Sprintf("%s (%s) is used by pod %s", sl, s.UUID, s.Holder))
			case !verified:
				reason = ReasonKubeletUnreachable
				blocked = append(blocked, fmt.Sprintf("%s (%s) may be in use: kubelet could not be asked", sl, s.UUID))
			default:
				gd = append(gd, Step{Kind: Destroy, GPU: o.GPU.Index, Slice: sl})
			}
		}
		if len(blocked) > 0 {
			conflicts = append(conflicts, Conflict{GPU: o.GPU.Index, Reason: reason, Message: fmt.Sprintf("gpu %d: not changed: %s", o.GPU.Index, joinSorted(blocked))})
			continue
		}
		for _, s := range want {
			if !have[s] {
				gc = append(gc, Step{Kind: Create, GPU: o.GPU.Index, Slice: s})
			}
		}
		destroys = append(destroys, gd...)
		creates = append(creates, gc...)
	}
	for i := range spec {
		if !seen[i] {
			conflicts = append(conflicts, Conflict{GPU: i, Reason: ReasonNoSuchGPU, Message: fmt.Sprintf("gpu %d: no MIG-capable GPU with this index on the node", i)})
		}
	}
	sort.Slice(conflicts, func(i, j int) bool { return conflicts[i].GPU < conflicts[j].GPU })
	sortSteps(destroys)
	sortSteps(creates)
	return append(destroys, creates...), conflicts
}

func sortSteps(steps []Step) {
	sort.Slice(steps, func(i, j int) bool {
		if steps[i].GPU != steps[j].GPU {
			return steps[i].GPU < steps[j].GPU
		}
		if steps[i].Slice.Start != steps[j].Slice.Start {
			return steps[i].Slice.Start < steps[j].Slice.Start
		}
		return steps[i].Slice.Profile.String() < steps[j].Slice.Profile.String()
	})
}

func joinSorted(xs []string) string {
	sort.Strings(xs)
	out := ""
	for i, x := range xs {
		if i > 0 {
			out += "; "
		}
		out += x
	}
	return out
}

// migDisabled says how to enable MIG mode on a GPU.
func migDisabled(g gpu.GPU) string {
	if g.MIG.Pending {
		return fmt.Sprintf("gpu %d: MIG mode is enabled but pending a GPU reset or reboot: drain the node, then run `nvidia-smi -i %d -r` or reboot it", g.Index, g.Index)
	}
	return fmt.Sprintf("gpu %d: MIG mode is disabled: drain the node, run `nvidia-smi -i %d -mig 1` (then reset the GPU or reboot if it says so); dynamig never changes MIG mode itself", g.Index, g.Index)
}
