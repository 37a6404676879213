package dynamicmig

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/test/builders"
)

// The planner starts from the spec's layout of a GPU whose plan is in
// flight, and plans with the profiles the agent discovered.
func TestPlannerNode(t *testing.T) {
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0)),
		v1alpha1.GPUStatus{Index: 1, Model: "A100-80GB", MIGMode: v1alpha1.MIGDisabled})
	n := plannerNode(partition.Decode(inflight))
	require.Len(t, n.GPUs, 1, "MIG off: not planned")
	assert.Equal(t, []planner.Slice{
		{Slice: mig.Slice{Profile: mig.MustParseProfile("3g.40gb"), Start: 0}, Used: true},
		{Slice: mig.Slice{Profile: mig.MustParseProfile("3g.40gb"), Start: 4}},
	}, n.GPUs[0].Slices)

	a100, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	offered := builders.Without(a100.Profiles, "1g.20gb")
	g := partition.EncodeGPU(0, "GPU-1", "NVIDIA A100 80GB PCIe (custom)", v1alpha1.MIGEnabled, offered, nil)
	n = plannerNode(partition.Decode(builders.NodePartition(nil, "", "", g)))
	p := planner.Dynamig{}.Plan(&planner.Snapshot{Nodes: []planner.Node{n}, Pods: []planner.Pod{
		{Name: "a", Requests: map[mig.ProfileName]int{mig.MustParseProfile("1g.20gb"): 1}},
		{Name: "b", Requests: map[mig.ProfileName]int{mig.MustParseProfile("4g.40gb"): 1}},
	}})
	a, ok := assignment(p, "a")
	require.True(t, ok)
	assert.Contains(t, a.Reason, "offers profile 1g.20gb")
	b, ok := assignment(p, "b")
	require.True(t, ok)
	assert.True(t, b.Served())
}

func node(alloc v1.ResourceList) *v1.Node {
	return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}, Status: v1.NodeStatus{Allocatable: alloc}}
}

func TestQueueingHints(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	p := &DynamicMIG{}
	pod := &v1.Pod{Spec: v1.PodSpec{Containers: []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-1g.10gb", "2"))}}}
	tests := []struct {
		name     string
		old, new *v1.Node
		want     fwk.QueueingHint
	}{
		{"added with enough", nil, node(builders.Resources("nvidia.com/mig-1g.10gb", "2")), fwk.Queue},
		{"added with too few", nil, node(builders.Resources("nvidia.com/mig-1g.10gb", "1")), fwk.QueueSkip},
		{"grew", node(builders.Resources("nvidia.com/mig-1g.10gb", "1")), node(builders.Resources("nvidia.com/mig-1g.10gb", "3")), fwk.Queue},
		{"unchanged", node(builders.Resources("nvidia.com/mig-1g.10gb", "3")), node(builders.Resources("nvidia.com/mig-1g.10gb", "3", "cpu", "4")), fwk.QueueSkip},
		{"other profile", node(nil), node(builders.Resources("nvidia.com/mig-3g.40gb", "2")), fwk.QueueSkip},
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

	gone := &v1.Pod{Spec: v1.PodSpec{NodeName: "n", Containers: []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-3g.40gb", "1"))}}}
	got, err := p.isSchedulableAfterPodDelete(logger, pod, gone, nil)
	require.NoError(t, err)
	assert.Equal(t, fwk.Queue, got, "a pod holding slices went")
	got, err = p.isSchedulableAfterPodDelete(logger, pod, &v1.Pod{Spec: v1.PodSpec{NodeName: "n", Containers: []v1.Container{builders.Container(builders.Resources("cpu", "1"))}}}, nil)
	require.NoError(t, err)
	assert.Equal(t, fwk.QueueSkip, got, "a CPU pod went")
}

// A NodePartition change says why it may serve pending pods, or nothing.
func TestCapacityChange(t *testing.T) {
	d := func(np *v1alpha1.NodePartition) *partition.Node { return partition.Decode(np) }
	inflight := d(builders.NodePartition(nil, "p-2", "p-1"))
	applied := d(builders.NodePartition(nil, "p-2", "p-2"))
	busy := d(builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0))))
	freed := d(builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: "3g.40gb"}})))
	tests := []struct {
		name     string
		old, new *partition.Node
		want     string
	}{
		{"a plan was applied", inflight, applied, planApplied},
		{"nothing changed", applied, applied, ""},
		{"a new plan published is no capacity yet", d(builders.NodePartition(nil, "p-1", "p-1")), inflight, ""},
		{"a slice was freed", busy, freed, slicesFreed},
		{"a slice was taken", freed, busy, ""},
		{"the agent reported the node's GPUs", d(builders.NodePartition(nil, "p-1", "p-1")), freed, gpusReported},
		{"a new NodePartition with GPUs", nil, freed, planApplied},
		{"a new NodePartition without GPUs", nil, d(builders.NodePartition(nil, "", "")), ""},
		{"the agent advertised a slice", d(agentMode(builders.Free("3g.40gb", 0))), d(agentMode(builders.Advertised("3g.40gb", 0))), advertised},
		{"the agent withdrew a slice", d(agentMode(builders.Advertised("3g.40gb", 0))), d(agentMode(builders.Free("3g.40gb", 0))), ""},
		{"kubelet can allocate a slice (restart mode)", freed, d(builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Advertised("3g.40gb", 0)))), advertised},
		{"a newer plan was published mid-plan", applyingPlan("p-2", "p-2"), applyingPlan("p-3", "p-2"), ""},
		{"the agent began applying the newer plan", applyingPlan("p-3", "p-2"), applyingPlan("p-3", "p-3"), applying},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, capacityChange(tt.old, tt.new), tt.name)
	}
}

// agentMode is a NodePartition of an agent-mode node with an A100 of these slices.
func agentMode(slices ...v1alpha1.SliceStatus) *v1alpha1.NodePartition {
	np := builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", slices...))
	np.Status.DevicePlugin = v1alpha1.DevicePluginAgent
	return np
}

// applyingPlan is a node in agent mode with plan in its spec while the
// agent applies the plan applying, one slice of it advertised.
func applyingPlan(plan, applying string) *partition.Node {
	np := agentMode(builders.Advertised("1g.10gb", 0))
	np.Spec.PlanID, np.Status.ApplyingPlanID = plan, applying
	return partition.Decode(np)
}

func TestDescribe(t *testing.T) {
	created := map[int]demand.Demand{
		3: {mig.MustParseProfile("3g.40gb"): 1},
		0: {mig.MustParseProfile("1g.10gb"): 5, mig.MustParseProfile("2g.20gb"): 1},
	}
	assert.Equal(t, "1g.10gb×5 + 2g.20gb on node-a gpu 0, 3g.40gb on node-a gpu 3", describe(created, "node-a"))
}

// Pending pods that differ only in name and MIG request share a filter
// key (their other filters are run once per plan); anything else the
// filters read makes another key, and a pod with resource claims has none.
func TestFilterKey(t *testing.T) {
	a := pendingPod("a", builders.Resources("nvidia.com/mig-1g.10gb", "1", "cpu", "1"))
	b := pendingPod("b", builders.Resources("nvidia.com/mig-3g.40gb", "2", "cpu", "1"))
	ka, ok := filterKey(a)
	require.True(t, ok)
	kb, _ := filterKey(b)
	assert.Equal(t, ka, kb, "name and MIG request do not matter")
	assert.Equal(t, "1", a.Spec.Containers[0].Resources.Requests.Name("nvidia.com/mig-1g.10gb", "").String(), "the pod is not changed")

	tolerant := b.DeepCopy()
	tolerant.Spec.Tolerations = []v1.Toleration{{Key: "team", Operator: v1.TolerationOpExists}}
	labelled := b.DeepCopy()
	labelled.Labels = map[string]string{"app": "x"}
	moreCPU := pendingPod("c", builders.Resources("nvidia.com/mig-1g.10gb", "1", "cpu", "2"))
	for name, p := range map[string]*v1.Pod{"toleration": tolerant, "labels": labelled, "cpu": moreCPU} {
		k, ok := filterKey(p)
		require.True(t, ok, name)
		assert.NotEqual(t, ka, k, name)
	}
	claims := b.DeepCopy()
	claims.Spec.ResourceClaims = []v1.PodResourceClaim{{Name: "gpu"}}
	_, ok = filterKey(claims)
	assert.False(t, ok, "resource claims: no key")
}
