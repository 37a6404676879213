package dynamicmig

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

func list(kv ...string) v1.ResourceList {
	out := v1.ResourceList{}
	for i := 0; i < len(kv); i += 2 {
		out[v1.ResourceName(kv[i])] = resource.MustParse(kv[i+1])
	}
	return out
}

func container(limits v1.ResourceList) v1.Container {
	return v1.Container{Name: "c", Resources: v1.ResourceRequirements{Limits: limits, Requests: limits}}
}

func TestPodDemand(t *testing.T) {
	p := func(s string) mig.ProfileName { return mig.MustParseProfile(s) }
	tests := []struct {
		name string
		pod  v1.PodSpec
		want Demand
		err  string
	}{
		{"none", v1.PodSpec{Containers: []v1.Container{container(list("cpu", "1"))}}, nil, ""},
		{"two profiles", v1.PodSpec{Containers: []v1.Container{
			container(list("nvidia.com/mig-1g.10gb", "2")), container(list("nvidia.com/mig-3g.40gb", "1", "cpu", "1")),
		}}, Demand{p("1g.10gb"): 2, p("3g.40gb"): 1}, ""},
		{"init container larger", v1.PodSpec{
			InitContainers: []v1.Container{container(list("nvidia.com/mig-1g.10gb", "3"))},
			Containers:     []v1.Container{container(list("nvidia.com/mig-1g.10gb", "1"))},
		}, Demand{p("1g.10gb"): 3}, ""},
		{"media engines", v1.PodSpec{Containers: []v1.Container{container(list("nvidia.com/mig-1g.10gb.me", "1"))}}, Demand{p("1g.10gb+me"): 1}, ""},
		{"unknown profile", v1.PodSpec{Containers: []v1.Container{container(list("nvidia.com/mig-1g", "1"))}}, nil, `resource "nvidia.com/mig-1g"`},
	}
	for _, tt := range tests {
		d, err := podDemand(&v1.Pod{Spec: tt.pod})
		if tt.err != "" {
			require.ErrorContains(t, err, tt.err, tt.name)
			continue
		}
		require.NoError(t, err, tt.name)
		assert.Equal(t, tt.want, d, tt.name)
	}
}

func partition(spec []v1alpha1.GPULayout, planID, observed string, gpus ...v1alpha1.GPUStatus) *v1alpha1.NodePartition {
	return &v1alpha1.NodePartition{
		ObjectMeta: metav1.ObjectMeta{Name: "n"},
		Spec:       v1alpha1.NodePartitionSpec{PlanID: planID, GPUs: spec},
		Status:     v1alpha1.NodePartitionStatus{ObservedPlanID: observed, GPUs: gpus},
	}
}

func gpuStatus(index int32, model string, slices ...v1alpha1.SliceStatus) v1alpha1.GPUStatus {
	return v1alpha1.GPUStatus{Index: index, Model: model, MIGMode: v1alpha1.MIGEnabled, Slices: slices}
}

func used(profile string, start int32) v1alpha1.SliceStatus {
	return v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: profile, Start: start}, Used: true}
}

func TestPlannerNode(t *testing.T) {
	applied := partition(nil, "p-1", "p-1", gpuStatus(0, "A100-80GB", used("3g.40gb", 0)), gpuStatus(1, "NVIDIA H100 80GB HBM3"))
	n, err := plannerNode("n", applied)
	require.NoError(t, err)
	require.Len(t, n.GPUs, 2)
	assert.Equal(t, []planner.Slice{{Profile: mig.MustParseProfile("3g.40gb"), Start: 0, Used: true}}, n.GPUs[0].Slices)
	assert.Equal(t, "H100-80GB", n.GPUs[1].Model.Name, "NVML names resolve too")

	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := partition(spec, "p-2", "p-1", gpuStatus(0, "A100-80GB", used("3g.40gb", 0)))
	n, err = plannerNode("n", inflight)
	require.NoError(t, err)
	assert.Equal(t, []planner.Slice{
		{Profile: mig.MustParseProfile("3g.40gb"), Start: 0, Used: true},
		{Profile: mig.MustParseProfile("3g.40gb"), Start: 4},
	}, n.GPUs[0].Slices, "a plan in flight is the layout to plan from")
	assert.Equal(t, map[mig.ProfileName]int{mig.MustParseProfile("3g.40gb"): 1}, keptCounts(inflight), "3g.40gb@4 is planned, not there yet")

	off := partition(nil, "", "", v1alpha1.GPUStatus{Index: 0, Model: "A100-80GB", MIGMode: v1alpha1.MIGDisabled}, gpuStatus(1, "GeForce RTX 4090"))
	_, err = plannerNode("n", off)
	require.ErrorContains(t, err, "no GPU with MIG enabled and a known model")

	bad := partition(nil, "", "", gpuStatus(0, "A100-80GB", used("3g.40gb", 0), used("4g.40gb", 0)))
	_, err = plannerNode("n", bad)
	require.ErrorContains(t, err, "gpu 0: invalid MIG layout")
}

// A GPU whose status lists the profiles NVML offers is planned with those:
// here an older driver without 1g.20gb, on a GPU the catalog does not know.
func TestPlannerNodePrefersDiscoveredProfiles(t *testing.T) {
	a100, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	g := gpuStatus(0, "NVIDIA A100 80GB PCIe (custom)", used("3g.40gb", 4))
	for _, p := range a100.Profiles {
		if p.Name.String() == "1g.20gb" {
			continue
		}
		ps := v1alpha1.ProfileStatus{Name: p.Name.String(), MemorySlices: int32(p.MemorySlices), MaxCount: int32(p.MaxCount)}
		for _, st := range p.Starts {
			ps.Starts = append(ps.Starts, int32(st))
		}
		g.Profiles = append(g.Profiles, ps)
	}
	n, err := plannerNode("n", partition(nil, "", "", g))
	require.NoError(t, err)
	m := n.GPUs[0].Model
	assert.Equal(t, "NVIDIA A100 80GB PCIe (custom)", m.Name)
	_, ok := m.ProfileIndex(mig.MustParseProfile("1g.20gb"))
	assert.False(t, ok, "not offered by this driver")
	again, err := plannerNode("n", partition(nil, "", "", g))
	require.NoError(t, err)
	assert.Same(t, m, again.GPUs[0].Model, "one model per GPU kind")

	p := planner.Dynamig{}.Plan(&planner.Snapshot{Nodes: []planner.Node{n}, Pods: []planner.Pod{
		{Name: "a", Requests: map[mig.ProfileName]int{mig.MustParseProfile("1g.20gb"): 1}},
		{Name: "b", Requests: map[mig.ProfileName]int{mig.MustParseProfile("4g.40gb"): 1}},
	}})
	assert.Contains(t, p.Pods[0].Reason, "offers profile 1g.20gb")
	assert.True(t, p.Pods[1].Served())

	g.Profiles[0].Starts = []int32{9}
	_, err = plannerNode("n", partition(nil, "", "", g))
	require.ErrorContains(t, err, "discovered profiles")
}

func node(alloc v1.ResourceList) *v1.Node {
	return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}, Status: v1.NodeStatus{Allocatable: alloc}}
}

func TestQueueingHints(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	p := &DynamicMIG{}
	pod := &v1.Pod{Spec: v1.PodSpec{Containers: []v1.Container{container(list("nvidia.com/mig-1g.10gb", "2"))}}}
	tests := []struct {
		name     string
		old, new *v1.Node
		want     fwk.QueueingHint
	}{
		{"added with enough", nil, node(list("nvidia.com/mig-1g.10gb", "2")), fwk.Queue},
		{"added with too few", nil, node(list("nvidia.com/mig-1g.10gb", "1")), fwk.QueueSkip},
		{"grew", node(list("nvidia.com/mig-1g.10gb", "1")), node(list("nvidia.com/mig-1g.10gb", "3")), fwk.Queue},
		{"unchanged", node(list("nvidia.com/mig-1g.10gb", "3")), node(list("nvidia.com/mig-1g.10gb", "3", "cpu", "4")), fwk.QueueSkip},
		{"other profile", node(nil), node(list("nvidia.com/mig-3g.40gb", "2")), fwk.QueueSkip},
	}
	for _, tt := range tests {
		var old any
		if tt.old != nil {
			old = tt.old
		}
		got, err := p.isSchedulableAfterNodeChange(logger, pod, old, tt.new)
		require.NoError(t, err, tt.name)
		assert.Equal(t, tt.want, got, tt.name)
	}

	u := func(np *v1alpha1.NodePartition) *unstructured.Unstructured {
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(np)
		require.NoError(t, err)
		return &unstructured.Unstructured{Object: obj}
	}
	inflight := partition(nil, "p-2", "p-1")
	applied := partition(nil, "p-2", "p-2")
	got, err := p.isSchedulableAfterPartitionChange(logger, pod, u(inflight), u(applied))
	require.NoError(t, err)
	assert.Equal(t, fwk.Queue, got, "a plan was applied")
	got, err = p.isSchedulableAfterPartitionChange(logger, pod, u(applied), u(applied))
	require.NoError(t, err)
	assert.Equal(t, fwk.QueueSkip, got)
	got, err = p.isSchedulableAfterPartitionChange(logger, pod, u(partition(nil, "p-1", "p-1")), u(inflight))
	require.NoError(t, err)
	assert.Equal(t, fwk.QueueSkip, got, "a new plan published is no capacity yet")
	busy := partition(nil, "p-1", "p-1", gpuStatus(0, "A100-80GB", used("3g.40gb", 0)))
	freed := partition(nil, "p-1", "p-1", gpuStatus(0, "A100-80GB", v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: "3g.40gb"}}))
	got, err = p.isSchedulableAfterPartitionChange(logger, pod, u(busy), u(freed))
	require.NoError(t, err)
	assert.Equal(t, fwk.Queue, got, "a slice was freed")
	got, err = p.isSchedulableAfterPartitionChange(logger, pod, u(freed), u(busy))
	require.NoError(t, err)
	assert.Equal(t, fwk.QueueSkip, got, "a slice was taken")
	got, err = p.isSchedulableAfterPartitionChange(logger, pod, u(partition(nil, "", "")), u(freed))
	require.NoError(t, err)
	assert.Equal(t, fwk.Queue, got, "the agent reported the node's GPUs")

	gone := &v1.Pod{Spec: v1.PodSpec{NodeName: "n", Containers: []v1.Container{container(list("nvidia.com/mig-3g.40gb", "1"))}}}
	got, err = p.isSchedulableAfterPodDelete(logger, pod, gone, nil)
	require.NoError(t, err)
	assert.Equal(t, fwk.Queue, got, "a pod holding slices went")
	got, err = p.isSchedulableAfterPodDelete(logger, pod, &v1.Pod{Spec: v1.PodSpec{NodeName: "n", Containers: []v1.Container{container(list("cpu", "1"))}}}, nil)
	require.NoError(t, err)
	assert.Equal(t, fwk.QueueSkip, got, "a CPU pod went")
}

func TestDescribe(t *testing.T) {
	created := map[int]Demand{
		3: {mig.MustParseProfile("3g.40gb"): 1},
		0: {mig.MustParseProfile("1g.10gb"): 5, mig.MustParseProfile("2g.20gb"): 1},
	}
	assert.Equal(t, "1g.10gb×5 + 2g.20gb on node-a gpu 0, 3g.40gb on node-a gpu 3", describe(created, "node-a"))
}
