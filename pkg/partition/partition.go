// Package partition is the one conversion between the NodePartition API
// (dynamig.io/v1alpha1) and dynamig's domain types: layouts as []mig.Slice,
// offered profiles as []mig.Profile, a GPU's model as *mig.Model. The
// scheduler decodes each NodePartition once per resourceVersion (Decode);
// the scheduler encodes layouts into the spec (SetLayouts) and the node
// agent encodes what it observed into the status (EncodeGPU).
//
// A decoded example: a NodePartition whose status reports an A100-80GB at
// index 0 with 3g.40gb@4 held by a pod, and whose spec (plan p-7, not yet
// observed) wants [1g.10gb@0 1g.10gb@1 3g.40gb@4], decodes to InFlight, GPU
// 0 with Slices [3g.40gb@4 used] and Desired [1g.10gb@0 1g.10gb@1
// 3g.40gb@4]; planning starts from Desired (GPU.Start).
package partition

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
)

// PlanTimeAnnotation records on a NodePartition when the scheduler
// published its spec (RFC 3339, UTC): the start of the plan's clock.
const PlanTimeAnnotation = "dynamig.io/plan-time"

// KeepsAnnotation lists, comma-separated, earlier plans whose slices the
// spec's plan all keeps ("p-1,p-2"): each slice of their spec layouts,
// and each slice the status reported when the plan was made (Keeps). The
// plan only adds slices to them.
const KeepsAnnotation = "dynamig.io/keeps-plans"

// maxKept bounds KeepsAnnotation: the latest plans of a chain of plans
// that only add slices.
const maxKept = 4

// Node is a NodePartition decoded: what the scheduler reads of it in
// Filter, in its requeue decisions and when it plans.
type Node struct {
	// Object is the API object decoded, shared with the informer: never
	// modify it.
	Object *v1alpha1.NodePartition
	// PlanID is spec.planID; InFlight is true while the agent has not
	// observed it yet; PlanTime is when it was published (zero if unknown).
	PlanID   string
	InFlight bool
	PlanTime time.Time
	// Restarting is true while the agent restarts the node's device plugin,
	// or while the node's kubelet restarts (condition
	// DevicePluginRestarting), a plan in flight or not. RestartEnded is
	// when that condition last turned False: the agent had confirmed
	// through PodResources what kubelet can allocate (zero if unknown).
	Restarting   bool
	RestartEnded time.Time
	// AgentAdvertises is true when the agent is the node's device plugin
	// (status.devicePlugin agent). Advertised counts, per resource name,
	// the slices the kubelet can allocate, in either mode: what binding
	// may count on before the kubelet's next node-status update shows them.
	AgentAdvertises bool
	Advertised      map[string]int64
	// Applying is true while every slice kubelet can allocate on a node in
	// agent mode is one the in-flight plan keeps or creates: the agent
	// applies the plan with its destroys withdrawn from kubelet
	// (status.applyingPlanID); or the plan keeps all of a plan in Keeps
	// that the agent applies so (applyingPlanID), or applied in full and
	// is done with (observedPlanID, Applied=True, nothing applying).
	Applying bool
	// Keeps are the earlier plans the spec's plan keeps (KeepsAnnotation).
	Keeps []string
	// GPUs are the GPUs the status reports, in index order.
	GPUs []GPU
	// Used counts the slices a container holds.
	Used int
	// Err says why the node cannot be planned with: a malformed status or
	// spec, an invalid layout, or no GPU with MIG enabled and a known model.
	Err error
}

// GPU is one GPU of a NodePartition, status and spec together.
type GPU struct {
	Index   int
	UUID    string
	MIGMode v1alpha1.MIGMode
	// Model is the GPU's model (mig.ResolveModel of the status's model
	// name and discovered profiles); nil if nobody can plan for it.
	Model *mig.Model
	// Slices exist on the GPU.
	Slices []Slice
	// Desired is the spec's complete layout of the GPU; Listed is false
	// when the spec does not list the GPU (it keeps its slices).
	Desired []mig.Slice
	Listed  bool
}

// Slice is a slice that exists: a profile at a start, its MIG device
// UUID, whether a container holds it and whether the kubelet can allocate
// it.
type Slice struct {
	mig.Slice
	UUID       string
	Used       bool
	Advertised bool
}

// Plannable reports whether the planner may change the GPU: MIG enabled
// and a model known.
func (g *GPU) Plannable() bool { return g.MIGMode == v1alpha1.MIGEnabled && g.Model != nil }

// Start is the layout planning starts from: the spec's, when its plan is
// in flight and lists the GPU (the agent is creating it), else what
// exists; a slice is used if the status says so.
func (g *GPU) Start(inFlight bool) []Slice {
	if !inFlight || !g.Listed {
		return g.Slices
	}
	used := map[mig.Slice]bool{}
	for _, s := range g.Slices {
		used[s.Slice] = s.Used
	}
	out := make([]Slice, len(g.Desired))
	for i, s := range g.Desired {
		out[i] = Slice{Slice: s, Used: used[s]}
	}
	return out
}

// Decode converts a NodePartition for the scheduler. It never fails: what
// cannot be decoded or planned with is in Err. (The agent reads the spec
// with DesiredLayouts, which reports a malformed GPU layout per GPU.)
func Decode(np *v1alpha1.NodePartition) *Node {
	n := &Node{Object: np, PlanID: np.Spec.PlanID}
	n.InFlight = np.Spec.PlanID != "" && np.Spec.PlanID != np.Status.ObservedPlanID
	if c := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionRestarting); c != nil {
		n.Restarting = c.Status == metav1.ConditionTrue
		if c.Status == metav1.ConditionFalse {
			n.RestartEnded = c.LastTransitionTime.Time
		}
	}
	n.AgentAdvertises = np.Status.DevicePlugin == v1alpha1.DevicePluginAgent
	if v := np.Annotations[KeepsAnnotation]; v != "" {
		n.Keeps = strings.Split(v, ",")
	}
	n.Applying = n.InFlight && n.AgentAdvertises && (np.Status.ApplyingPlanID == np.Spec.PlanID || slices.ContainsFunc(n.Keeps, func(plan string) bool {
		st := &np.Status
		return st.ApplyingPlanID == plan || st.ApplyingPlanID == "" && st.ObservedPlanID == plan && meta.IsStatusConditionTrue(st.Conditions, v1alpha1.ConditionApplied)
	}))
	n.Advertised = map[string]int64{}
	if t, err := time.Parse(time.RFC3339Nano, np.Annotations[PlanTimeAnnotation]); err == nil {
		n.PlanTime = t
	}
	desired, specErrs := DesiredLayouts(np)
	shared := make(map[string][]v1alpha1.ProfileStatus, len(np.Status.Models))
	for _, m := range np.Status.Models {
		shared[m.Name] = m.Profiles
	}
	var errs []error
	for _, gs := range np.Status.GPUs {
		g, err := decodeGPU(gs, shared[gs.Model])
		if err != nil {
			errs = append(errs, fmt.Errorf("gpu %d: %w", gs.Index, err))
		}
		g.Desired, g.Listed = desired[g.Index]
		if err := specErrs[g.Index]; err != nil && n.InFlight {
			errs = append(errs, fmt.Errorf("gpu %d: spec: %w", g.Index, err))
		}
		for _, s := range g.Slices {
			if s.Used {
				n.Used++
			}
			if s.Advertised {
				n.Advertised[s.Profile.ResourceName()]++
			}
		}
		if g.Plannable() {
			if err := g.Model.Validate(mig.LayoutOf(g.Start(n.InFlight))); err != nil {
				errs = append(errs, fmt.Errorf("gpu %d: %w", g.Index, err))
			}
		}
		n.GPUs = append(n.GPUs, g)
	}
	sort.Slice(n.GPUs, func(i, j int) bool { return n.GPUs[i].Index < n.GPUs[j].Index })
	n.Err = errors.Join(errs...)
	if n.Err == nil && !n.plannable() {
		n.Err = errors.New("no GPU with MIG enabled and a known model")
	}
	return n
}

func (n *Node) plannable() bool {
	for i := range n.GPUs {
		if n.GPUs[i].Plannable() {
			return true
		}
	}
	return false
}

// decodeGPU decodes a GPU's status; its profiles are its own, if it lists
// any, else its model's (status.models).
func decodeGPU(gs v1alpha1.GPUStatus, modelProfiles []v1alpha1.ProfileStatus) (GPU, error) {
	g := GPU{Index: int(gs.Index), UUID: gs.UUID, MIGMode: gs.MIGMode}
	ps := gs.Profiles
	if len(ps) == 0 {
		ps = modelProfiles
	}
	profiles, err := Profiles(ps)
	if err != nil {
		return g, err
	}
	if g.Model, err = mig.ResolveModel(gs.Model, 0, profiles); err != nil {
		return g, err
	}
	for _, s := range gs.Slices {
		p, err := mig.ParseProfile(s.Profile)
		if err != nil {
			return g, err
		}
		g.Slices = append(g.Slices, Slice{Slice: mig.Slice{Profile: p, Start: int(s.Start)}, UUID: s.UUID, Used: s.Used, Advertised: s.Advertised})
	}
	return g, nil
}

// DesiredLayouts decodes the spec: the layout of each GPU it lists, and,
// for a GPU whose layout names a malformed profile, the error instead.
func DesiredLayouts(np *v1alpha1.NodePartition) (map[int][]mig.Slice, map[int]error) {
	layouts := map[int][]mig.Slice{}
	errs := map[int]error{}
	for _, g := range np.Spec.GPUs {
		layout := make([]mig.Slice, 0, len(g.Slices))
		for _, s := range g.Slices {
			p, err := mig.ParseProfile(s.Profile)
			if err != nil {
				errs[int(g.Index)] = err
				break
			}
			layout = append(layout, mig.Slice{Profile: p, Start: int(s.Start)})
		}
		if errs[int(g.Index)] == nil {
			layouts[int(g.Index)] = layout
		}
	}
	return layouts, errs
}

// Profiles decodes the profiles a GPU's status says NVML offers.
func Profiles(ps []v1alpha1.ProfileStatus) ([]mig.Profile, error) {
	out := make([]mig.Profile, len(ps))
	for i, p := range ps {
		name, err := mig.ParseProfile(p.Name)
		if err != nil {
			return nil, err
		}
		starts := make([]int, len(p.Starts))
		for j, st := range p.Starts {
			starts[j] = int(st)
		}
		out[i] = mig.Profile{Name: name, ComputeSlices: name.Compute, MemorySlices: int(p.MemorySlices), MaxCount: int(p.MaxCount), Starts: starts}
	}
	return out, nil
}

// Keeps reports whether layouts, a plan for n by GPU index, keep every
// slice n's spec lists and every slice its status reports, on each GPU
// the planner may change (a GPU layouts does not list keeps its slices).
func Keeps(n *Node, layouts map[int][]mig.Slice) bool {
	for i := range n.GPUs {
		g := &n.GPUs[i]
		want, ok := layouts[g.Index]
		if !ok {
			continue
		}
		for _, s := range g.Slices {
			if !slices.Contains(want, s.Slice) {
				return false
			}
		}
		for _, s := range g.Desired {
			if !slices.Contains(want, s) {
				return false
			}
		}
	}
	return true
}

// KeptBy is what a plan for n that keeps every slice of it (Keeps) keeps:
// n's plan, and the plans that one keeps, the latest maxKept.
func KeptBy(n *Node) []string {
	if n.PlanID == "" {
		return nil
	}
	kept := append(slices.Clone(n.Keeps), n.PlanID)
	return kept[max(0, len(kept)-maxKept):]
}

// SetLayouts writes a plan into a NodePartition's spec: its ID, when it was
// published, the complete layout of each GPU it lists, by index, and the
// earlier plans it keeps (KeepsAnnotation; none: nil).
func SetLayouts(np *v1alpha1.NodePartition, planID string, at time.Time, layouts map[int][]mig.Slice, keeps []string) {
	np.Spec.PlanID = planID
	np.Spec.GPUs = make([]v1alpha1.GPULayout, 0, len(layouts))
	for _, i := range slices.Sorted(maps.Keys(layouts)) {
		gl := v1alpha1.GPULayout{Index: int32(i), Slices: make([]v1alpha1.Slice, len(layouts[i]))}
		for j, s := range layouts[i] {
			gl.Slices[j] = apiSlice(s)
		}
		np.Spec.GPUs = append(np.Spec.GPUs, gl)
	}
	if np.Annotations == nil {
		np.Annotations = map[string]string{}
	}
	np.Annotations[PlanTimeAnnotation] = at.UTC().Format(time.RFC3339Nano)
	if len(keeps) > 0 {
		np.Annotations[KeepsAnnotation] = strings.Join(keeps, ",")
	} else {
		delete(np.Annotations, KeepsAnnotation)
	}
}

// EncodeGPU is a GPU's status from what the agent observed: its identity,
// MIG mode, the profiles NVML offers (nil with MIG off) and its slices.
func EncodeGPU(index int, uuid, model string, mode v1alpha1.MIGMode, profiles []mig.Profile, slices []Slice) v1alpha1.GPUStatus {
	g := v1alpha1.GPUStatus{Index: int32(index), UUID: uuid, Model: model, MIGMode: mode}
	for _, p := range profiles {
		ps := v1alpha1.ProfileStatus{Name: p.Name.String(), MemorySlices: int32(p.MemorySlices), MaxCount: int32(p.MaxCount)}
		for _, s := range p.Starts {
			ps.Starts = append(ps.Starts, int32(s))
		}
		g.Profiles = append(g.Profiles, ps)
	}
	for _, s := range slices {
		g.Slices = append(g.Slices, v1alpha1.SliceStatus{Slice: apiSlice(s.Slice), UUID: s.UUID, Used: s.Used, Advertised: s.Advertised})
	}
	return g
}

// ShareProfiles moves the GPUs' profiles (EncodeGPU) into the models it
// returns, once per model, the first GPU's of each; a GPU whose profiles
// differ from those keeps its own. It changes gpus.
func ShareProfiles(gpus []v1alpha1.GPUStatus) []v1alpha1.ModelStatus {
	var models []v1alpha1.ModelStatus
	for i := range gpus {
		g := &gpus[i]
		if len(g.Profiles) == 0 {
			continue
		}
		j := slices.IndexFunc(models, func(m v1alpha1.ModelStatus) bool { return m.Name == g.Model })
		if j < 0 {
			models = append(models, v1alpha1.ModelStatus{Name: g.Model, Profiles: g.Profiles})
		} else if !equality.Semantic.DeepEqual(models[j].Profiles, g.Profiles) {
			continue
		}
		g.Profiles = nil
	}
	return models
}

func apiSlice(s mig.Slice) v1alpha1.Slice {
	return v1alpha1.Slice{Profile: s.Profile.String(), Start: int32(s.Start)}
}

// Newer reports whether a is a later version of the same object than b.
// The API server's resourceVersions are opaque, but etcd's are integers
// that grow; anything else counts as newer, as a watch would deliver it.
func Newer(a, b metav1.ObjectMeta) bool {
	ra, errA := strconv.ParseUint(a.ResourceVersion, 10, 64)
	rb, errB := strconv.ParseUint(b.ResourceVersion, 10, 64)
	return errA != nil || errB != nil || ra > rb
}
