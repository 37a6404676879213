package agent

import (
	"fmt"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/guard"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
)

// Observed is one GPU as the agent saw it. With MIG on: the profiles NVML
// offers, the model they make (or why none could be had: ModelErr), and
// NVML's slices, each with the pod kubelet says holds it. With MIG off,
// only the GPU.
type Observed struct {
	GPU      gpu.GPU
	Profiles []mig.Profile
	Model    *mig.Model
	ModelErr error
	Slices   []ObservedSlice
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
			sl := s.Slice.Slice
			if wanted[sl] {
				if s.CI >= 0 {
					have[sl] = true
				}
				continue
			}
			switch {
			case !verified:
				reason = ReasonKubeletUnreachable
				blocked = append(blocked, fmt.Sprintf("%s (%s) may be in use: kubelet could not be asked", sl, s.UUID))
			case s.Holder != "":
				blocked = append(blocked, fmt.Sprintf("%s (%s) is used by pod %s", sl, s.UUID, s.Holder))
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

// decision is what the agent will do about a spec: the steps, in order,
// and the parts of the spec it will not apply, with why; or nothing,
// because it refused this plan already or must wait.
type decision struct {
	steps     []Step
	conflicts []Conflict
	// refused: the spec's plan was refused in an earlier sync; it is never
	// pursued later (the scheduler plans again from the status).
	refused bool
	// wait says why nothing may be done yet: a slice to destroy is of a
	// profile that a pod bound to the node, not yet admitted, asks for.
	wait string
}

// decide is the spec's layouts against what was observed, without side
// effects. A GPU whose layout names a malformed profile or does not fit
// its model is left out with an InvalidSpec conflict, in the spec's order
// (for instance "gpu 0: the plan's layout is not valid here: invalid MIG
// layout: 3g.40gb does not exist on A100-40GB (…)"); Diff turns the rest
// into steps and conflicts, destroying only when kubelet answered.
func decide(np *v1alpha1.NodePartition, obs observation) decision {
	if Refused(np) && !guard.Off(guard.Refused) {
		return decision{refused: true}
	}
	layouts, specErrs := partition.DesiredLayouts(np)
	var d decision
	for _, g := range np.Spec.GPUs {
		i := int(g.Index)
		bad := specErrs[i]
		if bad == nil {
			bad = validate(i, layouts[i], obs.gpus)
		}
		if bad != nil {
			d.conflicts = append(d.conflicts, Conflict{GPU: i, Reason: ReasonInvalidSpec,
				Message: fmt.Sprintf("gpu %d: the plan's layout is not valid here: %s", i, bad)})
			delete(layouts, i)
		}
	}
	steps, conflicts := Diff(obs.gpus, layouts, obs.kubeletErr == nil)
	d.steps, d.conflicts = steps, append(d.conflicts, conflicts...)
	for _, st := range d.steps {
		if pods := obs.waiting[st.Slice.Profile]; st.Kind == Destroy && len(pods) > 0 && !guard.Off(guard.Admission) {
			return decision{wait: fmt.Sprintf("%s before destroying %s on gpu %d: kubelet may give it that slice", notAdmitted(pods), st.Slice, st.GPU)}
		}
	}
	return d
}

// notAdmitted says which bound pods kubelet has not admitted yet.
func notAdmitted(pods []string) string {
	return fmt.Sprintf("pod %s, bound to the node, is not admitted by kubelet yet; waiting for it", strings.Join(pods, ", "))
}

// Refused reports whether the spec's plan is one the agent refused:
// observed, with Failed true for a reason only a new plan can fix. The
// agent never pursues such a plan (guard refused-plan).
func Refused(np *v1alpha1.NodePartition) bool {
	if np.Spec.PlanID == "" || np.Status.ObservedPlanID != np.Spec.PlanID {
		return false
	}
	c := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionFailed)
	return c != nil && c.Status == metav1.ConditionTrue && c.ObservedGeneration == np.Generation && refusal[c.Reason]
}

// refusal holds the reasons for which the agent refuses a plan for good.
var refusal = map[string]bool{ReasonSliceInUse: true, ReasonKubeletUnreachable: true, ReasonMIGDisabled: true, ReasonNoSuchGPU: true, ReasonInvalidSpec: true}

// validate checks a layout against the observed model of the GPU with MIG
// on at index; nil if there is none (Diff reports a GPU that is missing or
// has MIG off).
func validate(index int, layout []mig.Slice, observed []Observed) error {
	for _, o := range observed {
		if o.GPU.Index != index || !o.GPU.MIG.Current {
			continue
		}
		if o.ModelErr != nil {
			return o.ModelErr
		}
		return o.Model.Validate(layout)
	}
	return nil
}
