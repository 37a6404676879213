package agent

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2/ktesting"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	dynamigfake "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/fake"
	"github.com/dynamig/dynamig/pkg/mig"
)

// a100 is an A100-SXM4-80GB at index with MIG on, as observed: its
// catalog model and profiles, and the slices.
func a100(t *testing.T, index int, slices ...ObservedSlice) Observed {
	t.Helper()
	m, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	o := obs(index, slices...)
	o.GPU.Name, o.GPU.PCIDeviceID, o.GPU.UUID = "NVIDIA A100-SXM4-80GB", 0x20B210DE, "GPU-a100"
	o.Model, o.Profiles = m, m.Profiles
	return o
}

// spec is a NodePartition whose spec is plan with the layouts, in order.
func spec(plan string, layouts ...v1alpha1.GPULayout) *v1alpha1.NodePartition {
	np := &v1alpha1.NodePartition{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "np-uid", Generation: 3}}
	np.Spec = v1alpha1.NodePartitionSpec{PlanID: plan, GPUs: layouts}
	return np
}

// layout is a GPU's layout in a spec, from "profile@start" strings.
func layout(index int32, slices ...string) v1alpha1.GPULayout {
	g := v1alpha1.GPULayout{Index: index, Slices: []v1alpha1.Slice{}}
	for _, s := range slices {
		p, start, _ := strings.Cut(s, "@")
		n, _ := strconv.Atoi(start)
		g.Slices = append(g.Slices, v1alpha1.Slice{Profile: p, Start: int32(n)})
	}
	return g
}

func TestDecide(t *testing.T) {
	off := a100(t, 1)
	off.GPU.MIG = gpu.MIGMode{}
	off.Model, off.Profiles = nil, nil
	noProfiles := a100(t, 1)
	noProfiles.Model, noProfiles.ModelErr = nil, errors.New("gpu 1: reading GPU-instance profile 0: Unknown Error")
	tests := []struct {
		name      string
		np        *v1alpha1.NodePartition
		observed  []Observed
		kubelet   error
		steps     []Step
		conflicts []Conflict
	}{{
		name:     "no plan: nothing to do",
		np:       spec(""),
		observed: []Observed{a100(t, 0, have("1g.10gb", 0, ""))},
	}, {
		name:     "a valid layout becomes steps",
		np:       spec("p-1", layout(0, "3g.40gb@4", "1g.10gb@0")),
		observed: []Observed{a100(t, 0, have("7g.80gb", 0, ""))},
		steps:    []Step{{Destroy, 0, sl("7g.80gb", 0)}, {Create, 0, sl("1g.10gb", 0)}, {Create, 0, sl("3g.40gb", 4)}},
	}, {
		name:     "a profile the GPU does not offer: refused, the other GPU proceeds",
		np:       spec("p-1", layout(0, "3g.20gb@0"), layout(1, "7g.80gb@0")),
		observed: []Observed{a100(t, 0), a100(t, 1)},
		steps:    []Step{{Create, 1, sl("7g.80gb", 0)}},
		conflicts: []Conflict{{0, ReasonInvalidSpec, "gpu 0: the plan's layout is not valid here: invalid MIG layout: " +
			"3g.20gb does not exist on A100-80GB (profiles: 1g.10gb, 1g.10gb+me, 1g.20gb, 2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb)"}},
	}, {
		name:     "overlapping slices: refused",
		np:       spec("p-1", layout(0, "4g.40gb@0", "3g.40gb@0")),
		observed: []Observed{a100(t, 0)},
		conflicts: []Conflict{{0, ReasonInvalidSpec, "gpu 0: the plan's layout is not valid here: invalid MIG layout: " +
			"3g.40gb@0: 3g.40gb@0 overlaps memory slices already occupied"}},
	}, {
		name:     "a malformed profile name: refused",
		np:       spec("p-1", layout(0, "3g.40@4")),
		observed: []Observed{a100(t, 0)},
		conflicts: []Conflict{{0, ReasonInvalidSpec, "gpu 0: the plan's layout is not valid here: " +
			`invalid MIG profile "3g.40": missing "gb" after the memory size (want <compute>g.<memory>gb[suffix], e.g. 1g.10gb or 1g.10gb+me)`}},
	}, {
		name:     "profiles NVML could not list: refused with NVML's error",
		np:       spec("p-1", layout(1, "7g.80gb@0")),
		observed: []Observed{noProfiles},
		conflicts: []Conflict{{1, ReasonInvalidSpec,
			"gpu 1: the plan's layout is not valid here: gpu 1: reading GPU-instance profile 0: Unknown Error"}},
	}, {
		name:     "MIG off: Diff's conflict, not a layout check",
		np:       spec("p-1", layout(1, "7g.80gb@0")),
		observed: []Observed{a100(t, 0), off},
		conflicts: []Conflict{{1, ReasonMIGDisabled, "gpu 1: MIG mode is disabled: drain the node, run `nvidia-smi -i 1 -mig 1` " +
			"(then reset the GPU or reboot if it says so); dynamig never changes MIG mode itself"}},
	}, {
		name:     "invalid layouts come first, in the spec's order, then Diff's conflicts",
		np:       spec("p-1", layout(1, "3g.20gb@0"), layout(0, "7g.80gb@0")),
		observed: []Observed{a100(t, 0, have("1g.10gb", 0, "team/a")), a100(t, 1)},
		conflicts: []Conflict{
			{1, ReasonInvalidSpec, "gpu 1: the plan's layout is not valid here: invalid MIG layout: " +
				"3g.20gb does not exist on A100-80GB (profiles: 1g.10gb, 1g.10gb+me, 1g.20gb, 2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb)"},
			{0, ReasonSliceInUse, "gpu 0: not changed: 1g.10gb@0 (MIG-1g.10gb) is used by pod team/a"},
		},
	}, {
		name:     "kubelet unreachable: nothing destroyed",
		np:       spec("p-1", layout(0, "7g.80gb@0")),
		observed: []Observed{a100(t, 0, have("1g.10gb", 0, ""))},
		kubelet:  errors.New("connection refused"),
		conflicts: []Conflict{{0, ReasonKubeletUnreachable,
			"gpu 0: not changed: 1g.10gb@0 (MIG-1g.10gb) may be in use: kubelet could not be asked"}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := decide(tt.np, observation{gpus: tt.observed, kubeletErr: tt.kubelet})
			opt := cmp.Comparer(func(a, b mig.ProfileName) bool { return a == b })
			if diff := cmp.Diff(tt.steps, d.steps, opt); diff != "" {
				t.Errorf("steps (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.conflicts, d.conflicts); diff != "" {
				t.Errorf("conflicts (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReport(t *testing.T) {
	earlier := metav1.NewTime(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC))
	now := metav1.NewTime(earlier.Add(time.Hour))
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "node-uid"}}
	npRef := &v1.ObjectReference{APIVersion: "dynamig.io/v1alpha1", Kind: "NodePartition", Name: "node-a", UID: "np-uid"}
	nodeRef := &v1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: "node-a", UID: "node-uid"}
	forgetFailed := event{once: v1alpha1.ConditionFailed, forget: true}

	// One GPU with MIG on offering one profile, one with MIG off.
	on := a100(t, 0, have("1g.10gb", 0, "team/a"), have("1g.10gb", 1, ""))
	on.Profiles = on.Profiles[:1]
	off := Observed{GPU: gpu.GPU{Index: 1, UUID: "GPU-off", Name: "NVIDIA A100-SXM4-80GB", PCIDeviceID: 0x20B210DE}}
	observed := &observation{gpus: []Observed{on, off}}
	models := []v1alpha1.ModelStatus{{Name: "A100-80GB", // once, though both GPUs are A100s
		Profiles: []v1alpha1.ProfileStatus{{Name: "1g.10gb", MemorySlices: 1, MaxCount: 7, Starts: []int32{0, 1, 2, 3, 4, 5, 6}}}}}
	gpus := []v1alpha1.GPUStatus{{
		Index: 0, UUID: "GPU-a100", Model: "A100-80GB", MIGMode: v1alpha1.MIGEnabled,
		Slices: []v1alpha1.SliceStatus{
			{Slice: v1alpha1.Slice{Profile: "1g.10gb", Start: 0}, UUID: "MIG-1g.10gb", Used: true},
			{Slice: v1alpha1.Slice{Profile: "1g.10gb", Start: 1}, UUID: "MIG-1g.10gb"},
		},
	}, {Index: 1, UUID: "GPU-off", Model: "A100-80GB", MIGMode: v1alpha1.MIGDisabled}}
	migOff := event{once: "mig/GPU-off", ref: nodeRef, kind: v1.EventTypeWarning, reason: ReasonMIGDisabled, message: migDisabled(off.GPU)}

	cond := func(kind string, status metav1.ConditionStatus, reason, msg string, at metav1.Time) metav1.Condition {
		return metav1.Condition{Type: kind, Status: status, Reason: reason, Message: msg, ObservedGeneration: 3, LastTransitionTime: at}
	}
	withStatus := func(np *v1alpha1.NodePartition, observedPlan string, conds ...metav1.Condition) *v1alpha1.NodePartition {
		np.Status = v1alpha1.NodePartitionStatus{ObservedPlanID: observedPlan, GPUs: gpus[:1], Models: models, Conditions: conds}
		return np
	}
	create := Step{Create, 0, sl("1g.10gb", 1)}
	inUse := Conflict{0, ReasonSliceInUse, "gpu 0: not changed: 1g.10gb@0 (MIG-1g.10gb) is used by pod team/a"}
	noGPU := Conflict{2, ReasonNoSuchGPU, "gpu 2: no MIG-capable GPU with this index on the node"}

	tests := []struct {
		name   string
		np     *v1alpha1.NodePartition
		obs    *observation
		out    outcome
		status v1alpha1.NodePartitionStatus
		events []event
	}{{
		name: "no plan: reports what exists; MIG off is a Node event",
		np:   spec(""),
		obs:  observed,
		status: v1alpha1.NodePartitionStatus{ObservedGeneration: 3, GPUs: gpus, Models: models, Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionApplied, metav1.ConditionTrue, ReasonNoPlan, "no plan yet; the status reports what exists", now),
			cond(v1alpha1.ConditionFailed, metav1.ConditionFalse, ReasonNoPlan, "", now),
		}},
		events: []event{migOff, forgetFailed},
	}, {
		name: "applied: observedPlanID moves, the steps in an Applied event",
		np: withStatus(spec("p-1", layout(0, "1g.10gb@0", "1g.10gb@1")), "p-0",
			cond(v1alpha1.ConditionApplied, metav1.ConditionTrue, ReasonApplied, "plan p-0: layout applied and advertised", earlier)),
		obs: &observation{gpus: []Observed{on}},
		out: outcome{steps: []Step{create}},
		status: v1alpha1.NodePartitionStatus{ObservedPlanID: "p-1", ObservedGeneration: 3, GPUs: gpus[:1], Models: models, Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionApplied, metav1.ConditionTrue, ReasonApplied, "plan p-1: layout applied and advertised", earlier),
			cond(v1alpha1.ConditionFailed, metav1.ConditionFalse, ReasonApplied, "", now),
		}},
		events: []event{forgetFailed, {ref: npRef, kind: v1.EventTypeNormal, reason: ReasonApplied,
			message: "plan p-1: create 1g.10gb@1 on gpu 0; the device plugin advertises the slices"}},
	}, {
		name: "conflicts: the plan is done with, not applied; the first conflict's reason",
		np:   withStatus(spec("p-2", layout(0, "7g.80gb@0")), "p-1"),
		obs:  &observation{gpus: []Observed{on}},
		out:  outcome{conflicts: []Conflict{inUse, noGPU}},
		status: v1alpha1.NodePartitionStatus{ObservedPlanID: "p-2", ObservedGeneration: 3, GPUs: gpus[:1], Models: models, Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionApplied, metav1.ConditionFalse, ReasonSliceInUse, "plan p-2 not fully applied: "+inUse.Message+"; "+noGPU.Message, now),
			cond(v1alpha1.ConditionFailed, metav1.ConditionTrue, ReasonSliceInUse, "plan p-2 not fully applied: "+inUse.Message+"; "+noGPU.Message, now),
		}},
		events: []event{{once: v1alpha1.ConditionFailed, ref: npRef, kind: v1.EventTypeWarning, reason: ReasonSliceInUse,
			message: "plan p-2 not fully applied: " + inUse.Message + "; " + noGPU.Message}},
	}, {
		name: "a failure to retry: observedPlanID stays, no Applied event for the steps done",
		np:   withStatus(spec("p-2", layout(0, "1g.10gb@0", "1g.10gb@1")), "p-1"),
		obs:  &observation{gpus: []Observed{on}},
		out:  outcome{steps: []Step{create}, err: errors.New("the device plugin did not re-advertise"), reason: ReasonDevicePluginTimeout},
		status: v1alpha1.NodePartitionStatus{ObservedPlanID: "p-1", ObservedGeneration: 3, GPUs: gpus[:1], Models: models, Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionApplied, metav1.ConditionFalse, ReasonApplying, "plan p-2: retrying after: the device plugin did not re-advertise", now),
			cond(v1alpha1.ConditionFailed, metav1.ConditionTrue, ReasonDevicePluginTimeout, "the device plugin did not re-advertise", now),
		}},
		events: []event{{once: v1alpha1.ConditionFailed, ref: npRef, kind: v1.EventTypeWarning, reason: ReasonDevicePluginTimeout,
			message: "the device plugin did not re-advertise"}},
	}, {
		name: "nothing observed (fail): the last reported GPUs are kept",
		np:   withStatus(spec(""), ""),
		out:  outcome{err: errors.New("reading the GPUs: NVML: unknown error"), reason: ReasonNVMLError},
		status: v1alpha1.NodePartitionStatus{ObservedGeneration: 3, GPUs: gpus[:1], Models: models, Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionApplied, metav1.ConditionFalse, ReasonApplying, "plan (none): retrying after: reading the GPUs: NVML: unknown error", now),
			cond(v1alpha1.ConditionFailed, metav1.ConditionTrue, ReasonNVMLError, "reading the GPUs: NVML: unknown error", now),
		}},
		events: []event{{once: v1alpha1.ConditionFailed, ref: npRef, kind: v1.EventTypeWarning, reason: ReasonNVMLError,
			message: "reading the GPUs: NVML: unknown error"}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.np.DeepCopy()
			st, events := report(tt.np, node, tt.obs, tt.out, now)
			want := tt.status // and, after every sync, no restart under way
			want.Conditions = append(want.Conditions, cond(v1alpha1.ConditionRestarting, metav1.ConditionFalse, ReasonNotRestarting, "", now))
			if d := cmp.Diff(want, st); d != "" {
				t.Errorf("status (-want +got):\n%s", d)
			}
			if d := cmp.Diff(tt.events, events, cmp.AllowUnexported(event{})); d != "" {
				t.Errorf("events (-want +got):\n%s", d)
			}
			assert.Equal(t, before, tt.np, "report modified the NodePartition")
		})
	}
}

// emit records an event under a key only when it says something new
// there, and again after the key was forgotten; other events always.
func TestEmit(t *testing.T) {
	rec := record.NewFakeRecorder(10)
	a := &Agent{recorder: rec, lastMsg: map[string]string{}}
	ref := &v1.ObjectReference{Kind: "NodePartition", Name: "node-a"}
	failed := func(msg string) event {
		return event{once: v1alpha1.ConditionFailed, ref: ref, kind: v1.EventTypeWarning, reason: ReasonNVMLError, message: msg}
	}
	applied := event{ref: ref, kind: v1.EventTypeNormal, reason: ReasonApplied, message: "plan p-1: done"}
	a.emit([]event{failed("a"), applied})
	a.emit([]event{failed("a"), applied})
	a.emit([]event{failed("b")})
	a.emit([]event{{once: v1alpha1.ConditionFailed, forget: true}, failed("b")})
	close(rec.Events)
	var got []string
	for e := range rec.Events {
		got = append(got, e)
	}
	assert.Equal(t, []string{
		"Warning NVMLError a", "Normal Applied plan p-1: done", "Normal Applied plan p-1: done",
		"Warning NVMLError b", "Warning NVMLError b",
	}, got)
}

// The rules that keep kubelet from handing out a slice the agent is about
// to destroy, and a refused plan from being applied later.
func TestDecideSafetyRules(t *testing.T) {
	plan := spec("p-1", layout(0, "7g.80gb@0"))
	free := []Observed{a100(t, 0, have("1g.10gb", 0, ""), have("3g.40gb", 4, ""))}

	waiting := observation{gpus: free, waiting: map[mig.ProfileName][]string{mig.MustParseProfile("3g.40gb"): {"team/late"}}}
	d := decide(plan, waiting)
	assert.Empty(t, d.steps, "no destroy while a pod that may get the slice is not admitted")
	assert.Equal(t, "pod team/late, bound to the node, is not admitted by kubelet yet; waiting for it before destroying 3g.40gb@4 on gpu 0: kubelet may give it that slice", d.wait,
		"1g.10gb@0 may go (team/late does not ask for it); 3g.40gb@4 may not")

	other := observation{gpus: free, waiting: map[mig.ProfileName][]string{mig.MustParseProfile("2g.20gb"): {"team/late"}}}
	assert.Len(t, decide(plan, other).steps, 3, "a pod waiting for another profile does not hold the destroys back")

	refused := plan.DeepCopy()
	refused.Status.ObservedPlanID = "p-1"
	refused.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionFailed, Status: metav1.ConditionTrue, Reason: ReasonSliceInUse, ObservedGeneration: refused.Generation}}
	d = decide(refused, observation{gpus: free})
	assert.True(t, d.refused)
	assert.Empty(t, d.steps, "a refused plan is never pursued, even once its slices are free")
	refused.Generation++
	assert.False(t, decide(refused, observation{gpus: free}).refused, "a new spec is a new decision")
}

// Unknown holders are never free: kubelet unreachable, or a pod kubelet
// admitted without showing all its slices (init containers).
func TestHolders(t *testing.T) {
	pod := func(name string, phase v1.PodPhase, profile string, n string) *v1.Pod {
		q := resource.MustParse(n)
		return &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: name}, Status: v1.PodStatus{Phase: phase},
			Spec: v1.PodSpec{InitContainers: []v1.Container{{Name: "init", Resources: v1.ResourceRequirements{Requests: v1.ResourceList{v1.ResourceName(mig.ResourcePrefix + profile): q}}}}}}
	}
	gpus := func() []Observed {
		return []Observed{a100(t, 0, have("1g.10gb", 0, ""), have("1g.10gb", 1, "team/running"), have("3g.40gb", 4, ""))}
	}
	pods := []*v1.Pod{
		pod("running", v1.PodRunning, "1g.10gb", "2"), // holds 1g.10gb@1 and, invisibly, one more
		pod("late", v1.PodPending, "3g.40gb", "1"),    // bound, not admitted
		pod("done", v1.PodSucceeded, "3g.40gb", "1"),
	}
	o := observation{gpus: gpus()}
	o.holders(pods, podresources.Devices{Pods: map[string]bool{"team/running": true, "team/done": true}})
	assert.Equal(t, "team/running (unknown)", o.gpus[0].Slices[0].Holder, "the free 1g.10gb may be team/running's second slice")
	assert.Equal(t, "", o.gpus[0].Slices[2].Holder)
	assert.Equal(t, map[mig.ProfileName][]string{mig.MustParseProfile("3g.40gb"): {"team/late"}}, o.waiting)

	o = observation{gpus: gpus(), kubeletErr: errors.New("connection refused")}
	o.holders(pods, podresources.Devices{})
	for _, s := range o.gpus[0].Slices {
		assert.Equal(t, unknownHolder, s.Holder, "kubelet unreachable: %s counts as used", s.Slice)
	}

	assert.ErrorContains(t, indexIDs(podresources.Devices{Allocatable: map[string][]string{"nvidia.com/mig-1g.10gb": {"MIG-x", "0:1"}}}), "deviceIDStrategy to uuid")
	assert.NoError(t, indexIDs(podresources.Devices{Allocatable: map[string][]string{"nvidia.com/mig-1g.10gb": {"MIG-x"}}}))
}

// A re-advertisement is confirmed by the device IDs kubelet can allocate,
// per resource, not by counts: the same number of 3g.40gb under another
// UUID is not it, nor the right UUID under another resource name (a
// reused UUID of a destroyed slice of another profile).
func TestIdentityDiff(t *testing.T) {
	const r1, r3 = "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"
	observed := []Observed{a100(t, 0, have("1g.10gb", 0, ""), have("3g.40gb", 4, ""))}
	assert.Empty(t, identityDiff(map[string][]string{r1: {"MIG-1g.10gb"}, r3: {"MIG-3g.40gb"}}, observed))
	assert.Equal(t, "kubelet cannot allocate [nvidia.com/mig-3g.40gb MIG-3g.40gb] and can allocate [nvidia.com/mig-3g.40gb MIG-old]",
		identityDiff(map[string][]string{r1: {"MIG-1g.10gb"}, r3: {"MIG-old"}}, observed))
	assert.NotEmpty(t, identityDiff(map[string][]string{r1: {"MIG-1g.10gb", "MIG-3g.40gb"}}, observed), "under the wrong resource")
}

// When kubelet cannot be asked, Node allocatable calls for a
// re-advertisement only while it shows fewer slices than exist: a stale
// count of a retired resource (kubelet writes its drop once, and a failed
// status update leaves it for good) does not — seen in the soak, where the
// agent, which then also waited for Node allocatable after each restart,
// restarted the plugin every 30 s for a 4g.24gb that no longer existed.
func TestAllocatableDiff(t *testing.T) {
	const r1, r4 = "nvidia.com/mig-1g.6gb", "nvidia.com/mig-4g.24gb"
	node := func(alloc map[string]int64) *v1.Node {
		n := &v1.Node{Status: v1.NodeStatus{Allocatable: v1.ResourceList{}}}
		for r, q := range alloc {
			n.Status.Allocatable[v1.ResourceName(r)] = *resource.NewQuantity(q, resource.DecimalSI)
		}
		return n
	}
	want := map[v1.ResourceName]int64{r1: 2}
	assert.Empty(t, allocatableDiff(node(map[string]int64{r1: 2}), want))
	assert.Empty(t, allocatableDiff(node(map[string]int64{r1: 2, r4: 1}), want), "a stale retired resource")
	assert.Empty(t, allocatableDiff(node(map[string]int64{r1: 3}), want), "a drop not written yet")
	assert.Equal(t, "nvidia.com/mig-1g.6gb: allocatable 1, slices 2", allocatableDiff(node(map[string]int64{r1: 1, r4: 1}), want))
	assert.Equal(t, "nvidia.com/mig-1g.6gb: allocatable 0, slices 2", allocatableDiff(node(nil), want))
}

// fakeKubelet answers PodResources with fixed devices, and records whom
// Devices was asked about.
type fakeKubelet struct {
	devices  podresources.Devices
	asked    *[][]string
	restarts podresources.Restarts
}

func (f fakeKubelet) Devices(_ context.Context, _ string, pods []string) (podresources.Devices, error) {
	if f.asked != nil {
		*f.asked = append(*f.asked, pods)
	}
	return f.devices, nil
}

func (f fakeKubelet) Restarts() podresources.Restarts  { return f.restarts }
func (f fakeKubelet) RestartsChanged() <-chan struct{} { return nil }

func (f fakeKubelet) Allocatable(context.Context, string) (map[string][]string, error) {
	return f.devices.Allocatable, nil
}

func podLister(t *testing.T, pods ...*v1.Pod) corelisters.PodLister {
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, p := range pods {
		require.NoError(t, idx.Add(p))
	}
	return corelisters.NewPodLister(idx)
}

// While a pod bound to the node may be in kubelet's admission (Pending,
// no container status yet), the agent asks kubelet about the node's pods
// one by one: a List then could make kubelet hand that pod's devices to
// the next pod too. Otherwise it lists.
func TestAsksQuietlyDuringAdmission(t *testing.T) {
	pod := func(name string, phase v1.PodPhase, started bool) *v1.Pod {
		p := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: name}, Status: v1.PodStatus{Phase: phase}}
		if started {
			p.Status.ContainerStatuses = []v1.ContainerStatus{{Name: "main"}}
		}
		return p
	}
	running, creating, done := pod("running", v1.PodRunning, true), pod("creating", v1.PodPending, true), pod("done", v1.PodSucceeded, true)
	var asked [][]string
	_, ctx := ktesting.NewTestContext(t)
	for _, pods := range [][]*v1.Pod{{running, creating, done}, {running, done, pod("bound", v1.PodPending, false)}} {
		a := &Agent{kubelet: fakeKubelet{asked: &asked}, podLister: podLister(t, pods...)}
		_, err := a.kubeletDevices(ctx)
		require.NoError(t, err)
	}
	assert.Equal(t, [][]string{nil, {"team/bound", "team/running"}}, asked)
}

// oneSlice is a simulated A100-80GB with 1g.10gb@0.
func oneSlice(t *testing.T) (*gpu.Simulator, *gpu.NVML, gpu.Slice) {
	sim, err := gpu.NewSimulator(t.Name(), "A100-80GB")
	require.NoError(t, err)
	lib, err := gpu.Open(sim.Interface())
	require.NoError(t, err)
	s, err := lib.Create(0, mig.MustParseProfile("1g.10gb"), 0)
	require.NoError(t, err)
	return sim, lib, s
}

// Just before a destroy the agent asks kubelet again: a slice that was
// free when observed but that kubelet has since given to a pod is not
// destroyed, and its GPU is left alone.
func TestApplyRechecksBeforeDestroy(t *testing.T) {
	sim, lib, s := oneSlice(t)
	observed := []Observed{{GPU: gpu.GPU{Index: 0}, Slices: []ObservedSlice{{Slice: s}}}}
	a := &Agent{lib: lib, kubelet: fakeKubelet{devices: podresources.Devices{Used: map[string]string{s.UUID: "team/just-admitted"}}}, podLister: podLister(t)}
	_, ctx := ktesting.NewTestContext(t)
	out := a.apply(ctx, []Step{{Destroy, 0, s.Slice}, {Create, 0, sl("3g.40gb", 4)}}, observed, nil, never)
	assert.Empty(t, out.steps)
	assert.Equal(t, []Conflict{{0, ReasonSliceInUse, "gpu 0: not changed: 1g.10gb@0 is used by pod team/just-admitted"}}, out.conflicts)
	assert.Equal(t, []mig.Slice{s.Slice}, sim.Layout(0), "nothing destroyed, nothing created on that GPU")
}

// fakePlugin records what the agent advertised; kubeletFollows answers
// Allocatable from the last list, as kubelet does once it has it, unless
// stuck.
type fakePlugin struct {
	sets    []map[string][]deviceplugin.Device
	stuck   bool // kubelet keeps the first list
	kubelet deviceplugin.KubeletState
}

func (f *fakePlugin) Set(d map[string][]deviceplugin.Device) { f.sets = append(f.sets, d) }
func (f *fakePlugin) Run(context.Context) error              { return nil }
func (f *fakePlugin) Kubelet() deviceplugin.KubeletState     { return f.kubelet }
func (f *fakePlugin) KubeletChanged() <-chan struct{}        { return nil }

// The node takes no MIG pod from when its kubelet goes until kubeletSettle
// after it is back: the agent says so on DevicePluginRestarting (which
// Filter reads) and Applied, and applies nothing meanwhile. The kubelet is
// back once the PodResources connection is made again and, in agent mode,
// the agent's plugin has registered with it.
func TestKubeletRestartClosesTheNode(t *testing.T) {
	p := &fakePlugin{}
	a := &Agent{cfg: Config{Plugin: p}, kubelet: fakeKubelet{restarts: podresources.Restarts{Gone: true}}}
	why := a.kubeletRestarting()
	assert.Contains(t, why, "kubelet is gone")
	st, _ := report(spec("p-2", layout(0, "1g.10gb@0")), &v1.Node{}, &observation{gpus: []Observed{a100(t, 0)}}, outcome{closed: why}, metav1.Now())
	restarting := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionRestarting)
	require.NotNil(t, restarting)
	assert.Equal(t, metav1.ConditionTrue, restarting.Status)
	assert.Equal(t, ReasonKubeletRestarting, restarting.Reason)
	assert.Equal(t, why, restarting.Message)
	applied := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionApplied)
	require.NotNil(t, applied)
	assert.Equal(t, metav1.ConditionFalse, applied.Status)
	assert.Equal(t, "plan p-2: "+why, applied.Message)

	long := time.Now().Add(-kubeletSettle)
	a.kubelet = fakeKubelet{restarts: podresources.Restarts{Back: long}}
	p.kubelet = deviceplugin.KubeletState{Gone: true}
	assert.Contains(t, a.kubeletRestarting(), "kubelet is gone", "the plugin has not registered again")
	back := time.Now().Add(-time.Second)
	p.kubelet = deviceplugin.KubeletState{Back: back}
	assert.Contains(t, a.kubeletRestarting(), "kubelet came back at "+back.UTC().Format(time.TimeOnly))
	assert.Contains(t, a.kubeletRestarting(), "no MIG pod is bound to the node until "+back.Add(kubeletSettle).UTC().Format(time.TimeOnly))
	p.kubelet.Back = long
	assert.Empty(t, a.kubeletRestarting(), "settled")
	st, _ = report(spec("p-2", layout(0, "1g.10gb@0")), &v1.Node{}, &observation{gpus: []Observed{a100(t, 0)}}, outcome{}, metav1.Now())
	assert.True(t, meta.IsStatusConditionFalse(st.Conditions, v1alpha1.ConditionRestarting))

	restartMode := &Agent{kubelet: fakeKubelet{restarts: podresources.Restarts{Back: time.Now().Add(-2 * time.Second)}}}
	assert.Contains(t, restartMode.kubeletRestarting(), "kubelet came back at", "restart mode: the PodResources connection alone")
	restartMode.kubelet = fakeKubelet{}
	assert.Empty(t, restartMode.kubeletRestarting(), "never restarted")
}

type kubeletFollows struct {
	fakeKubelet
	p *fakePlugin
}

func (k kubeletFollows) Allocatable(context.Context, string) (map[string][]string, error) {
	if len(k.p.sets) == 0 {
		return nil, nil
	}
	last := k.p.sets[len(k.p.sets)-1]
	if k.p.stuck {
		last = k.p.sets[0]
	}
	out := map[string][]string{}
	for r, ds := range last {
		for _, d := range ds {
			out[r] = append(out[r], d.ID)
		}
	}
	return out, nil
}

// In agent mode every slice a plan destroys is withdrawn from kubelet
// before anything changes: the agent sends the list without them and goes
// on only once kubelet no longer offers them; then it reports progress
// (the scheduler may bind to what kubelet can allocate), and again after
// each slice it creates. If kubelet keeps offering a slice, nothing on its
// GPU changes and no progress is reported: the scheduler keeps waiting
// for the whole plan.
func TestWithdrawBeforeDestroy(t *testing.T) {
	for _, stuck := range []bool{false, true} {
		sim, lib, s := oneSlice(t)
		observed := []Observed{{GPU: gpu.GPU{Index: 0}, Profiles: []mig.Profile{{Name: mig.MustParseProfile("1g.10gb")}}, Slices: []ObservedSlice{{Slice: s}}}}
		p := &fakePlugin{stuck: stuck}
		p.Set(ownDevices(observed))
		a := &Agent{lib: lib, kubelet: kubeletFollows{fakeKubelet{}, p}, podLister: podLister(t),
			cfg: Config{Plugin: p, DevicePluginTimeout: 300 * time.Millisecond}}
		_, ctx := ktesting.NewTestContext(t)
		var progress []string // the layout at each progress report
		out := a.apply(ctx, []Step{{Destroy, 0, s.Slice}, {Create, 0, sl("3g.40gb", 4)}}, observed, func(context.Context) {
			progress = append(progress, fmt.Sprint(sim.Layout(0)))
		}, never)
		require.Len(t, p.sets, 2)
		assert.Equal(t, map[string][]deviceplugin.Device{"nvidia.com/mig-1g.10gb": nil}, p.sets[1], "withdrawn: the resource stays, without the slice")
		assert.Nil(t, a.withdrawn, "nothing withdrawn once the plan is applied")
		if stuck {
			assert.Empty(t, out.steps)
			require.Len(t, out.conflicts, 1)
			assert.Equal(t, ReasonKubeletUnreachable, out.conflicts[0].Reason)
			assert.Equal(t, "gpu 0: not changed: kubelet still offers 1g.10gb@0 after it was withdrawn", out.conflicts[0].Message)
			assert.Equal(t, []mig.Slice{s.Slice}, sim.Layout(0), "not destroyed")
			assert.Empty(t, progress, "no progress while kubelet may hand out a slice the plan destroys")
			continue
		}
		assert.Len(t, out.steps, 2)
		assert.Equal(t, []mig.Slice{sl("3g.40gb", 4)}, sim.Layout(0))
		require.NotEmpty(t, progress)
		assert.Equal(t, fmt.Sprint([]mig.Slice{s.Slice}), progress[0], "once the destroys are withdrawn, before anything changes")
		for _, p := range progress[1:] {
			// A report the create kicked off may also be left to the
			// sync's own, which follows at once.
			assert.Equal(t, fmt.Sprint([]mig.Slice{sl("3g.40gb", 4)}), p, "after the create")
		}
	}
}

// Bad input: a node in agent mode where NVIDIA's device plugin still runs.
// Both would serve the same resource names; the agent advertises nothing
// and says why (DevicePluginConflict). A finished plugin pod does not count.
func TestNVIDIAPluginOnAnAgentModeNode(t *testing.T) {
	pod := func(name string, phase v1.PodPhase) *v1.Pod {
		return &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "gpu-operator", Name: name, Labels: map[string]string{"app": "nvidia-device-plugin-daemonset"}},
			Spec: v1.PodSpec{NodeName: "node-a"}, Status: v1.PodStatus{Phase: phase}}
	}
	p := &fakePlugin{}
	a := &Agent{podLister: podLister(t, pod("old", v1.PodSucceeded), pod("nvidia-device-plugin-x", v1.PodRunning)),
		cfg: Config{NodeName: "node-a", DevicePluginNamespace: "gpu-operator", DevicePluginSelector: "app=nvidia-device-plugin-daemonset", Plugin: p}}
	_, ctx := ktesting.NewTestContext(t)
	err := a.advertiseOwn(ctx, &observation{})
	require.ErrorIs(t, err, errTwoPlugins)
	assert.Contains(t, err.Error(), "NVIDIA's device plugin runs on this node (gpu-operator/nvidia-device-plugin-x) while the agent is its device plugin")
	assert.Empty(t, p.sets, "nothing advertised")
}

// The agent's plugin advertises every offered profile (empty ones too),
// the slices with a full-size compute instance, and whole GPUs with MIG
// off and no change pending.
func TestOwnDevices(t *testing.T) {
	noCI := have("1g.10gb", 0, "")
	noCI.CI = -1
	o := a100(t, 0, have("3g.40gb", 4, ""), noCI)
	off := Observed{GPU: gpu.GPU{Index: 1, UUID: "GPU-off"}}
	pending := Observed{GPU: gpu.GPU{Index: 2, UUID: "GPU-pending", MIG: gpu.MIGMode{Pending: true}}}
	got := ownDevices([]Observed{o, off, pending})
	assert.Equal(t, []deviceplugin.Device{{ID: "MIG-3g.40gb", CDIName: "dynamig.io/gpu=MIG-3g.40gb"}}, got["nvidia.com/mig-3g.40gb"])
	assert.Contains(t, got, "nvidia.com/mig-1g.10gb", "registered without devices: its slice has no compute instance")
	assert.Empty(t, got["nvidia.com/mig-1g.10gb"])
	assert.Contains(t, got, "nvidia.com/mig-7g.80gb", "every offered profile")
	assert.Equal(t, []deviceplugin.Device{{ID: "GPU-off", CDIName: "dynamig.io/gpu=GPU-off"}}, got["nvidia.com/gpu"])
	assert.Empty(t, ownDevices(except([]Observed{o}, map[string]bool{"MIG-3g.40gb": true}))["nvidia.com/mig-3g.40gb"], "withdrawn")
}

// The status marks a slice advertised only when kubelet lists its MIG UUID
// as allocatable under the slice's own resource name: what the scheduler
// binds on in agent mode.
func TestStatusSaysWhichSlicesKubeletCanAllocate(t *testing.T) {
	o := a100(t, 0, have("1g.10gb", 0, ""), have("3g.40gb", 4, "team/a"))
	var st v1alpha1.NodePartitionStatus
	setGPUs(&st, &v1.Node{}, []Observed{o}, map[string][]string{
		"nvidia.com/mig-3g.40gb": {"MIG-3g.40gb"},
		"nvidia.com/mig-1g.10gb": {"MIG-3g.40gb"}, // not the 1g slice's UUID
	})
	require.Len(t, st.GPUs, 1)
	advertised := map[string]bool{}
	for _, s := range st.GPUs[0].Slices {
		advertised[s.Profile] = s.Advertised
	}
	assert.Equal(t, map[string]bool{"1g.10gb": false, "3g.40gb": true}, advertised)
}

// Restart mode: the scheduler binds on the slices the status marks
// advertised. When the restarted plugin does not re-advertise them in
// time, none is marked — not even those kubelet could allocate before the
// restart, which it holds unhealthy now — so that nothing is bound to the
// node until a re-advertisement is confirmed.
func TestFailedReadvertisementAdvertisesNothing(t *testing.T) {
	o := a100(t, 0, have("1g.10gb", 0, ""))
	before := map[string][]string{"nvidia.com/mig-1g.10gb": {"MIG-1g.10gb"}}
	a := &Agent{kube: kubefake.NewClientset(), kubelet: fakeKubelet{devices: podresources.Devices{Allocatable: map[string][]string{}}},
		cfg: Config{NodeName: "node-a", DevicePluginNamespace: "gpu-operator", DevicePluginSelector: "app=nvidia-device-plugin-daemonset", DevicePluginTimeout: 200 * time.Millisecond}}
	_, ctx := ktesting.NewTestContext(t)
	obs := &observation{gpus: []Observed{o}, allocatable: before}
	err := a.readvertise(ctx, obs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "did not re-advertise the slices within 200ms: kubelet cannot allocate [nvidia.com/mig-1g.10gb MIG-1g.10gb]")
	var st v1alpha1.NodePartitionStatus
	setGPUs(&st, &v1.Node{}, obs.gpus, obs.allocatable)
	require.Len(t, st.GPUs, 1)
	assert.False(t, st.GPUs[0].Slices[0].Advertised, "not advertised after a failed re-advertisement")
}

// A sync that reported mid-plan (progress) compares its final status with
// what it wrote, not with the copy it started from: a final status equal
// to that older copy is still written, and no write needs a conflict.
func TestStatusBuildsOnWhatTheAgentWrote(t *testing.T) {
	start := &v1alpha1.NodePartition{ObjectMeta: metav1.ObjectMeta{Name: "node-a", UID: "np-uid"},
		Status: v1alpha1.NodePartitionStatus{ObservedPlanID: "p-1", DevicePlugin: v1alpha1.DevicePluginAgent}}
	client := dynamigfake.NewSimpleClientset(start.DeepCopy())
	a := &Agent{partitions: client.DynamigV1alpha1().NodePartitions(), cfg: Config{Plugin: &fakePlugin{}}}
	_, ctx := ktesting.NewTestContext(t)

	mid := start.Status.DeepCopy()
	mid.ApplyingPlanID = "p-2"
	require.NoError(t, a.writeStatus(ctx, start, *mid))
	require.NoError(t, a.writeStatus(ctx, start, start.Status), "back to the status the sync started from")
	got, err := client.DynamigV1alpha1().NodePartitions().Get(ctx, "node-a", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, start.Status, got.Status, "the mid-plan report does not linger")
}

// slowTwoGPUs is an agent on two simulated A100-80GB whose GPU-instance
// creates take 50 ms each.
func slowTwoGPUs(t *testing.T) (*gpu.Simulator, *Agent, context.Context) {
	t.Helper()
	sim, err := gpu.NewSimulator(t.Name(), "A100-80GB", "A100-80GB")
	require.NoError(t, err)
	lib, err := gpu.Open(sim.Interface())
	require.NoError(t, err)
	sim.SetLatency(gpu.MethodCreateGPUInstance, 50*time.Millisecond)
	_, ctx := ktesting.NewTestContext(t)
	return sim, &Agent{lib: lib, kubelet: fakeKubelet{}, podLister: podLister(t)}, ctx
}

// Each GPU's steps run in order, the GPUs side by side: with every
// GPU-instance create taking 50 ms, the second GPU's first slice exists
// before the first GPU's last; a failure on one GPU stops the others
// after their current step.
func TestApplyRunsGPUsSideBySide(t *testing.T) {
	sim, a, ctx := slowTwoGPUs(t)
	var steps []Step
	for g := range 2 {
		for _, start := range []int{0, 1, 2} {
			steps = append(steps, Step{Create, g, sl("1g.10gb", start)})
		}
	}
	out := a.apply(ctx, steps, nil, nil, never)
	require.NoError(t, out.err)
	assert.Equal(t, steps, out.steps, "every step done, reported in the plan's order")
	var created [2][]gpu.Op
	for _, op := range sim.Ops() {
		if op.Kind == "create" {
			created[op.GPU] = append(created[op.GPU], op)
		}
	}
	for g := range 2 {
		require.Len(t, created[g], 3)
		for i, op := range created[g] {
			assert.Equal(t, steps[3*g+i].Slice, op.Slice, "gpu %d's steps in order", g)
		}
	}
	assert.True(t, created[1][0].Time.Before(created[0][2].Time), "gpu 1's first slice (%s) before gpu 0's last (%s)", created[1][0].Time, created[0][2].Time)

	sim.FailCall(gpu.MethodCreateGPUInstance, 1, gpu.FaultUnknown)
	var more []Step
	for g := range 2 {
		for _, start := range []int{4, 5, 6} {
			more = append(more, Step{Create, g, sl("1g.10gb", start)})
		}
	}
	out = a.apply(ctx, more, nil, nil, never)
	require.Error(t, out.err)
	assert.Equal(t, ReasonNVMLError, out.reason)
	// The other GPU's create that ran with the failing one may be followed
	// by one more, begun before the failure was recorded; not by a third.
	assert.Less(t, len(out.steps), 3, "after a failure, the other GPU stops: %v", out.steps)
}

// A write mid-plan may return a spec published since (plan p-3 while the
// sync applies p-2): the sync's report still says p-2 observed, so that
// the scheduler waits for p-3, which may destroy the slices p-2 created.
func TestReportSaysThePlanTheSyncApplied(t *testing.T) {
	np := spec("p-2", layout(0, "1g.10gb@0"))
	np.UID, np.Generation, np.ResourceVersion = "np-uid", 2, "10"
	np.Status.ObservedPlanID = "p-1"
	newer := spec("p-3", layout(0, "2g.20gb@0"))
	newer.UID, newer.Generation, newer.ResourceVersion = "np-uid", 3, "12"
	newer.Status = *np.Status.DeepCopy()
	newer.Status.ApplyingPlanID = "p-2"
	a := &Agent{written: newer}

	b := a.base(np)
	assert.Equal(t, "p-2", b.Spec.PlanID)
	assert.Equal(t, int64(2), b.Generation)
	assert.Equal(t, "p-2", b.Status.ApplyingPlanID, "the status the agent last wrote")
	st, _ := report(b, &v1.Node{}, &observation{gpus: []Observed{a100(t, 0)}}, outcome{steps: []Step{{Create, 0, sl("1g.10gb", 0)}}}, metav1.Now())
	assert.Equal(t, "p-2", st.ObservedPlanID)
	assert.Equal(t, int64(2), st.ObservedGeneration)
	assert.Empty(t, st.ApplyingPlanID)
}

// never is a spec that stays the newest.
func never() bool { return false }

// When a newer spec is published mid-plan, every GPU stops after its
// current step, so that the newer plan does not wait for this one's
// busiest GPU: gpu 0 has three slices to create, gpu 1 one; once a step
// is done the spec is newer, and gpu 0 makes no second slice.
func TestApplyMakesWayForANewerSpec(t *testing.T) {
	sim, a, ctx := slowTwoGPUs(t)
	steps := []Step{{Create, 0, sl("1g.10gb", 0)}, {Create, 0, sl("1g.10gb", 1)}, {Create, 0, sl("1g.10gb", 2)}, {Create, 1, sl("3g.40gb", 4)}}
	var published atomic.Bool
	newer := func() bool { return published.Load() }
	out := a.apply(ctx, steps[:1], nil, nil, newer)
	require.NoError(t, out.err)
	assert.False(t, out.superseded, "no newer spec: the plan runs to its end")

	published.Store(true)
	out = a.apply(ctx, steps[1:], nil, nil, newer)
	require.NoError(t, out.err)
	assert.True(t, out.superseded)
	assert.Equal(t, []Step{steps[1], steps[3]}, out.steps, "each GPU's current step, then no other")
	created := 0
	for _, op := range sim.Ops() {
		if op.Kind == "create" {
			created++
		}
	}
	assert.Equal(t, 3, created, "NVML made only the slices the outcome reports")
}
