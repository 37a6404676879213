package dynamicmig

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
	fwk "k8s.io/kube-scheduler/framework"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	"k8s.io/kubernetes/pkg/scheduler/backend/cache"
	"k8s.io/kubernetes/pkg/scheduler/backend/queue"
	"k8s.io/kubernetes/pkg/scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/defaultbinder"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/feature"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/noderesources"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/queuesort"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/tainttoleration"
	frameworkruntime "k8s.io/kubernetes/pkg/scheduler/framework/runtime"
	schedmetrics "k8s.io/kubernetes/pkg/scheduler/metrics"
	tf "k8s.io/kubernetes/pkg/scheduler/testing/framework"

	configv1 "github.com/dynamig/dynamig/pkg/apis/config/v1"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/test/builders"
)

// fakePartitions is a partitionStore in memory. It records every spec
// written; NextErr, when set, fails the next write.
type fakePartitions struct {
	mu      sync.Mutex
	objects map[string]*v1alpha1.NodePartition
	written []*v1alpha1.NodePartition
	NextErr error
}

func (f *fakePartitions) synced() bool { return true }

func (f *fakePartitions) get(node string) *partition.Node {
	f.mu.Lock()
	defer f.mu.Unlock()
	if np, ok := f.objects[node]; ok {
		return partition.Decode(np.DeepCopy())
	}
	return nil
}

func (f *fakePartitions) updateSpec(_ context.Context, np *v1alpha1.NodePartition) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.NextErr; err != nil {
		f.NextErr = nil
		return err
	}
	f.objects[np.Name] = np.DeepCopy()
	f.written = append(f.written, np.DeepCopy())
	return nil
}

// testFramework is a scheduler framework with DynamicMIG (PreFilter,
// Filter, PostFilter), TaintToleration and NodeResourcesFit on a snapshot of the given nodes
// and pods; pending pods are in the informer.
// activations records the pods a plugin activates.
type activations struct{ pods []string }

func (a *activations) Activate(_ klog.Logger, pods map[string]*v1.Pod) {
	for k := range pods {
		a.pods = append(a.pods, k)
	}
}

func testFramework(t *testing.T, parts *fakePartitions, nodes []*v1.Node, pods ...*v1.Pod) (framework.Framework, *events.FakeRecorder) {
	fw, recorder, _, _ := testFrameworkWithActivations(t, parts, nodes, pods...)
	return fw, recorder
}

func testFrameworkWithActivations(t testing.TB, parts partitionStore, nodes []*v1.Node, pods ...*v1.Pod) (framework.Framework, *events.FakeRecorder, *activations, *DynamicMIG) {
	_, ctx := ktesting.NewTestContext(t)
	schedmetrics.Register() // the test queue records scheduler metrics
	var objs []runtime.Object
	for _, p := range pods {
		objs = append(objs, p)
	}
	informerFactory := informers.NewSharedInformerFactory(fake.NewClientset(objs...), 0)
	podInformer := informerFactory.Core().V1().Pods()
	for _, p := range pods {
		require.NoError(t, podInformer.Informer().GetStore().Add(p))
	}
	recorder := events.NewFakeRecorder(100)
	activated := &activations{}
	var built *DynamicMIG
	var bound []*v1.Pod
	for _, p := range pods {
		if p.Spec.NodeName != "" {
			bound = append(bound, p)
		}
	}
	factory := func(ctx context.Context, obj runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
		args, err := configv1.Decode(obj)
		if err != nil {
			return nil, err
		}
		plugin, err := newPlugin(ctx, args, h, parts)
		built = plugin
		return plugin, err
	}
	fw, err := tf.NewFramework(ctx, []tf.RegisterPluginFunc{
		tf.RegisterQueueSortPlugin(queuesort.Name, queuesort.New),
		tf.RegisterBindPlugin(defaultbinder.Name, defaultbinder.New),
		tf.RegisterPluginAsExtensions(Name, factory, "PreFilter", "Filter", "PostFilter"),
		tf.RegisterFilterPlugin(tainttoleration.Name, func(ctx context.Context, obj runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
			return tainttoleration.New(ctx, obj, h, feature.Features{})
		}),
		tf.RegisterPluginAsExtensions(noderesources.Name, func(ctx context.Context, _ runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
			args := &schedconfig.NodeResourcesFitArgs{ScoringStrategy: &schedconfig.ScoringStrategy{
				Type: schedconfig.LeastAllocated, Resources: []schedconfig.ResourceSpec{{Name: "cpu", Weight: 1}},
			}, IgnoredResources: mig.ResourceNames()} // as the shipped configuration
			return noderesources.NewFit(ctx, args, h, feature.Features{})
		}, "PreFilter", "Filter"),
	}, "dynamig-scheduler",
		frameworkruntime.WithSnapshotSharedLister(cache.NewSnapshot(bound, nodes)),
		frameworkruntime.WithInformerFactory(informerFactory),
		frameworkruntime.WithEventRecorder(recorder),
		frameworkruntime.WithPodNominator(queue.NewTestQueue(ctx, nil)),
		frameworkruntime.WithPodActivator(activated),
	)
	require.NoError(t, err)
	return fw, recorder, activated, built
}

func migNode(name string, taints ...v1.Taint) *v1.Node {
	return &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"dynamig.io/partitioning": "mig"}},
		Spec:       v1.NodeSpec{Taints: taints},
		Status:     v1.NodeStatus{Allocatable: builders.Resources("cpu", "8", "memory", "32Gi", "pods", "110")},
	}
}

func emptyA100(node string) *v1alpha1.NodePartition {
	np := builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB"))
	np.Name = node
	return np
}

func pendingPod(name string, limits v1.ResourceList) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: k8stypes.UID("uid-" + name)},
		Spec:       v1.PodSpec{SchedulerName: "dynamig-scheduler", Containers: []v1.Container{builders.Container(limits)}},
	}
}

// schedule runs PreFilter, Filter on every node and, if no node fits,
// PostFilter, as a scheduling cycle does.
func schedule(t *testing.T, fw framework.Framework, pod *v1.Pod, nodes []*v1.Node) (*fwk.PostFilterResult, *fwk.Status) {
	_, ctx := ktesting.NewTestContext(t)
	state := framework.NewCycleState()
	if _, st, _ := fw.RunPreFilterPlugins(ctx, state, pod); !st.IsSuccess() {
		return nil, st
	}
	statuses := framework.NewDefaultNodeToStatus()
	infos, err := fw.SnapshotSharedLister().NodeInfos().List()
	require.NoError(t, err)
	fits := false
	for _, ni := range infos {
		st := fw.RunFilterPlugins(ctx, state, pod, ni)
		if st.IsSuccess() {
			fits = true
		} else {
			statuses.Set(ni.Node().Name, st)
		}
	}
	if fits {
		return nil, nil
	}
	return fw.RunPostFilterPlugins(ctx, state, pod, statuses)
}

func TestPostFilterPlansNominatesAndPublishes(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": emptyA100("n1")}}
	nodes := []*v1.Node{migNode("n1")}
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	fw, recorder := testFramework(t, parts, nodes, pod)

	result, st := schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code(), st.Message())
	require.NotNil(t, result)
	assert.Equal(t, "n1", result.NominatedNodeName)
	assert.Contains(t, st.Message(), "creates 1g.10gb on n1 gpu 0")
	require.Len(t, parts.written, 1)
	assert.Equal(t, []string{"1g.10gb@6"}, builders.SpecLayout(parts.written[0], 0))
	assert.NotEmpty(t, parts.written[0].Annotations[partition.PlanTimeAnnotation])
	assert.Contains(t, <-recorder.Events, ReasonPlanned)

	// The same pod again: the plan is in flight, its slice planned; no new plan.
	result, st = schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code())
	assert.Equal(t, "n1", result.NominatedNodeName)
	assert.Contains(t, st.Message(), "waiting for 1g.10gb on n1")
	assert.Len(t, parts.written, 1)
}

func TestPostFilterConflictPlansAgain(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": emptyA100("n1")}}
	parts.NextErr = apierrors.NewConflict(schema.GroupResource{Group: "dynamig.io", Resource: "nodepartitions"}, "n1", nil)
	nodes := []*v1.Node{migNode("n1")}
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-3g.40gb", "1"))
	fw, _, activated, _ := testFrameworkWithActivations(t, parts, nodes, pod)

	result, st := schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code())
	assert.Contains(t, st.Message(), "planning again")
	assert.Nil(t, result)
	assert.Equal(t, []string{pod.Namespace + "/" + pod.Name}, activated.pods, "retried at once, not after the unschedulable timeout")
	result, st = schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code())
	assert.Equal(t, "n1", result.NominatedNodeName)
	assert.Len(t, parts.written, 1)
}

func TestPostFilterRespectsOtherFilters(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"a": emptyA100("a"), "b": emptyA100("b")}}
	nodes := []*v1.Node{migNode("a", v1.Taint{Key: "dedicated", Value: "x", Effect: v1.TaintEffectNoSchedule}), migNode("b")}
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-4g.40gb", "1"))
	fw, _ := testFramework(t, parts, nodes, pod)

	result, st := schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code(), st.Message())
	assert.Equal(t, "b", result.NominatedNodeName, "node a's taint is not tolerated")
	require.Len(t, parts.written, 1)
	assert.Equal(t, "b", parts.written[0].Name)
}

func TestPostFilterPlansForOtherPendingPodsToo(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": emptyA100("n1")}}
	nodes := []*v1.Node{migNode("n1")}
	first := pendingPod("first", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	second := pendingPod("second", builders.Resources("nvidia.com/mig-4g.40gb", "1"))
	fw, _ := testFramework(t, parts, nodes, first, second)

	_, st := schedule(t, fw, first, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code(), st.Message())
	require.Len(t, parts.written, 1)
	// One plan for both: the 4g at 0 for the pending pod, the 1g above it.
	assert.Equal(t, []string{"1g.10gb@6", "4g.40gb@0"}, builders.SpecLayout(parts.written[0], 0))
}

func TestPreFilterAndFilter(t *testing.T) {
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "7g.80gb", Start: 0}}}}
	inflight := builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB", builders.Advertised("1g.10gb", 0)))
	inflight.Name = "n1"
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": inflight}}
	nodes := []*v1.Node{migNode("n1")}
	plain := pendingPod("plain", builders.Resources("cpu", "1"))
	bad := pendingPod("bad", builders.Resources("nvidia.com/mig-9g.99gb", "1"))
	one := pendingPod("one", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	fw, recorder := testFramework(t, parts, nodes, plain, bad, one)
	_, ctx := ktesting.NewTestContext(t)

	_, st, _ := fw.RunPreFilterPlugins(ctx, framework.NewCycleState(), plain)
	assert.True(t, st.IsSuccess(), "pods without MIG demand pass (DynamicMIG skips them)")

	_, st, _ = fw.RunPreFilterPlugins(ctx, framework.NewCycleState(), bad)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code())
	assert.Contains(t, st.Message(), `invalid MIG profile "9g.99gb"`)
	assert.Contains(t, <-recorder.Events, ReasonInvalidRequest)

	// The advertised 1g.10gb is about to be replaced by a 7g: Filter says so.
	state := framework.NewCycleState()
	_, st, _ = fw.RunPreFilterPlugins(ctx, state, one)
	require.True(t, st.IsSuccess())
	ni, err := fw.SnapshotSharedLister().NodeInfos().Get("n1")
	require.NoError(t, err)
	st = fw.RunFilterPlugins(ctx, state, one, ni)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code())
	assert.Equal(t, reasonRepartitioning, st.Message())

	// Once applied, the slice is free and the pod fits; with it taken,
	// DynamicMIG itself rejects the node, so that its hints requeue the pod.
	applied := inflight.DeepCopy()
	applied.Status.ObservedPlanID = "p-2"
	parts.objects["n1"] = applied
	assert.True(t, fw.RunFilterPlugins(ctx, state, one, ni).IsSuccess())
	two := pendingPod("two", builders.Resources("nvidia.com/mig-1g.10gb", "2"))
	state = framework.NewCycleState()
	_, st, _ = fw.RunPreFilterPlugins(ctx, state, two)
	require.True(t, st.IsSuccess())
	st = fw.RunFilterPlugins(ctx, state, two, ni)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code())
	assert.Equal(t, Name, st.Plugin(), "DynamicMIG is the rejector")
	assert.Equal(t, "no free 1g.10gb", st.Message())
}

// A NodePartition change activates only the pending pods it can help: the
// pods nominated to the node, and those asking for a profile it makes
// available there; never every pending pod.
func TestPartitionChangedActivatesOnlyPodsItHelps(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{}}
	nodes := []*v1.Node{migNode("n1")}
	small := pendingPod("small", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	big := pendingPod("big", builders.Resources("nvidia.com/mig-7g.80gb", "1"))
	h100 := pendingPod("h100", builders.Resources("nvidia.com/mig-1g.12gb", "1"))
	cpu := pendingPod("cpu", builders.Resources("cpu", "1"))
	bound := pendingPod("bound", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	bound.Spec.NodeName = "n1"
	other := pendingPod("other-scheduler", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	other.Spec.SchedulerName = "default-scheduler"
	_, _, activated, plugin := testFrameworkWithActivations(t, parts, nodes, small, big, h100, cpu, bound, other)
	logger, _ := ktesting.NewTestContext(t)

	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "1g.10gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB"))
	applied := builders.NodePartition(spec, "p-2", "p-2", builders.GPU(0, "A100-80GB", builders.Free("1g.10gb", 0), builders.Used("3g.40gb", 4)))
	inflight.Name, applied.Name = "n1", "n1"

	plugin.partitionChanged(logger, partition.Decode(inflight), partition.Decode(applied))
	assert.ElementsMatch(t, []string{"ns/small"}, activated.pods, "a free 1g.10gb appeared: only the pod asking for it")

	activated.pods = nil
	plugin.partitionChanged(logger, partition.Decode(applied), partition.Decode(applied))
	assert.Empty(t, activated.pods, "nothing changed")

	activated.pods = nil
	plugin.partitionChanged(logger, nil, partition.Decode(emptyA100("n2")))
	assert.ElementsMatch(t, []string{"ns/small", "ns/big"}, activated.pods, "a new A100 can be partitioned for any A100 profile, not H100's 1g.12gb")
}

// The kubelet, not the scheduler, picks a pod's device, from all the
// device plugin advertises. On a node whose plan is in flight no MIG pod
// passes, not even onto a free slice the plan keeps: kubelet might give it
// the one the plan destroys (1g.10gb@1 here), and the device plugin
// restarts to apply the plan.
func TestFilterKeepsMIGPodsOffNodesWithAPlanInFlight(t *testing.T) {
	status := builders.GPU(0, "A100-80GB", builders.Advertised("1g.10gb", 1), builders.Advertised("1g.10gb", 2), builders.Advertised("1g.10gb", 3), builders.Used("3g.40gb", 4))
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "2g.20gb", Start: 0}, {Profile: "1g.10gb", Start: 2}, {Profile: "1g.10gb", Start: 3}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := builders.NodePartition(spec, "p-2", "p-1", status)
	inflight.Name = "n1"
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": inflight}}
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	fw, _ := testFramework(t, parts, []*v1.Node{migNode("n1")}, pod)
	_, ctx := ktesting.NewTestContext(t)
	state := framework.NewCycleState()
	_, st, _ := fw.RunPreFilterPlugins(ctx, state, pod)
	require.True(t, st.IsSuccess())
	ni, err := fw.SnapshotSharedLister().NodeInfos().Get("n1")
	require.NoError(t, err)
	st = fw.RunFilterPlugins(ctx, state, pod, ni)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code(), "two kept 1g.10gb are free, yet kubelet could give the pod 1g.10gb@1")
	assert.Equal(t, reasonRepartitioning, st.Message())

	// No plan in flight, but the agent restarts the device plugin (after
	// its own restart, say): kubelet would fail the pod's admission.
	restarting := builders.NodePartition(spec, "p-2", "p-2", status)
	restarting.Name = "n1"
	restarting.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionRestarting, Status: metav1.ConditionTrue, Reason: "Restarting"}}
	parts.objects["n1"] = restarting
	st = fw.RunFilterPlugins(ctx, state, pod, ni)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code())
	assert.Equal(t, reasonRestarting, st.Message())
	restarting.Status.Conditions[0].Status = metav1.ConditionFalse
	assert.True(t, fw.RunFilterPlugins(ctx, state, pod, ni).IsSuccess(), "applied, advertised: the pod fits")
}

// Filter counts the slices the agent reports kubelet can allocate, not
// Node allocatable, which shows them only at kubelet's next node-status
// update: in agent mode, and in restart mode once NVIDIA's plugin is back
// with them. A slice kubelet cannot allocate yet does not count, nor one
// kubelet holds unhealthy in a status posted after the device plugin's
// last restart ended; and none while a plan is in flight whose destroys
// kubelet may still hand out (in restart mode, until the whole plan is
// applied).
func TestFilterCountsTheAdvertisedSlices(t *testing.T) {
	np := builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Advertised("1g.10gb", 1), builders.Free("1g.10gb", 2), builders.Used("3g.40gb", 4)))
	np.Name = "n1"
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": np}}
	node := migNode("n1") // kubelet has not written the slices to Node allocatable yet
	one := pendingPod("one", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
	two := pendingPod("two", builders.Resources("nvidia.com/mig-1g.10gb", "2"))
	fw, _ := testFramework(t, parts, []*v1.Node{node}, one, two)
	filter, ni := filterOn(t, fw, "n1")

	for _, mode := range []v1alpha1.DevicePluginMode{v1alpha1.DevicePluginNVIDIA, v1alpha1.DevicePluginAgent} {
		np.Status.DevicePlugin = mode
		assert.True(t, filter(one).IsSuccess(), "%s: one 1g.10gb is advertised", mode)
		st := filter(two)
		assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code(), "%s: the second 1g.10gb exists but kubelet cannot allocate it yet", mode)
		assert.Equal(t, "no free 1g.10gb", st.Message())
	}

	// kubelet holds the device unhealthy (capacity above allocatable).
	ended := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	np.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionRestarting, Status: metav1.ConditionFalse, Reason: "NotRestarting", LastTransitionTime: metav1.NewTime(ended)}}
	node.Status.Capacity = v1.ResourceList{"nvidia.com/mig-1g.10gb": resource.MustParse("1")}
	posted := func(at time.Time) {
		node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.NewTime(at)}}
		ni.SetNode(node)
	}
	posted(ended.Add(-time.Second))
	assert.True(t, filter(one).IsSuccess(), "a status posted while the device plugin restarted, which it has since done")
	posted(ended)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "posted in the second the restart ended: it counts")
	posted(ended.Add(time.Minute))
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "posted after the restart ended: the plugin went since (the agent crashed)")
	posted(time.Time{})
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "no heartbeat known: it counts")
	np.Status.Conditions = nil
	posted(ended.Add(-time.Second))
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "no restart known: it counts")
	node.Status.Capacity, node.Status.Conditions = nil, nil
	ni.SetNode(node)

	// A plan in flight: nothing binds until the agent reports its destroys
	// withdrawn (applyingPlanID); then the slices advertised so far count.
	np.Spec.PlanID = "p-2"
	st := filter(one)
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, st.Code())
	assert.Equal(t, reasonRepartitioning, st.Message())
	np.Status.ApplyingPlanID = "p-1"
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "the agent applies an older plan")
	np.Status.ApplyingPlanID = "p-2"
	assert.True(t, filter(one).IsSuccess(), "p-2's destroys are withdrawn; 1g.10gb@1 is advertised")
	np.Status.DevicePlugin = v1alpha1.DevicePluginNVIDIA
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(one).Code(), "restart mode waits for the whole plan")
}

// filterOn returns a function that runs a pod's PreFilter and Filter
// plugins on the node named, and the node's NodeInfo.
func filterOn(t *testing.T, fw framework.Framework, node string) (func(*v1.Pod) *fwk.Status, fwk.NodeInfo) {
	_, ctx := ktesting.NewTestContext(t)
	ni, err := fw.SnapshotSharedLister().NodeInfos().Get(node)
	require.NoError(t, err)
	return func(pod *v1.Pod) *fwk.Status {
		state := framework.NewCycleState()
		_, st, _ := fw.RunPreFilterPlugins(ctx, state, pod)
		require.True(t, st.IsSuccess())
		return fw.RunFilterPlugins(ctx, state, pod, ni)
	}, ni
}

// A node short of a profile is worth DefaultPreemption's dry run only if
// a pod of lower priority holds that profile there: the rejection says so
// by its code (Unschedulable), and is UnschedulableAndUnresolvable
// everywhere else, so that preemption skips the node.
func TestFilterTellsPreemptionWhereEvictionsFreeSlices(t *testing.T) {
	np := builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0), builders.Used("3g.40gb", 4)))
	np.Name = "n1"
	np.Status.DevicePlugin = v1alpha1.DevicePluginAgent
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": np}}
	holder := pendingPod("holder", builders.Resources("nvidia.com/mig-3g.40gb", "2"))
	holder.Spec.NodeName = "n1"
	priority := func(p *v1.Pod, v int32) *v1.Pod { p.Spec.Priority = &v; return p }
	low := priority(pendingPod("low", builders.Resources("nvidia.com/mig-3g.40gb", "1")), 0)
	high := priority(pendingPod("high", builders.Resources("nvidia.com/mig-3g.40gb", "1")), 1000)
	other := priority(pendingPod("other", builders.Resources("nvidia.com/mig-1g.10gb", "1")), 1000)
	fw, _ := testFramework(t, parts, []*v1.Node{migNode("n1")}, holder, low, high, other)
	filter, _ := filterOn(t, fw, "n1")

	st := filter(high)
	assert.Equal(t, fwk.Unschedulable, st.Code(), "evicting the holder, of lower priority, frees its 3g.40gb")
	assert.Equal(t, "no free 3g.40gb", st.Message())
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(low).Code(), "the holder's priority is not lower")
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(other).Code(), "the holder holds no 1g.10gb")
	np.Spec.PlanID = "p-2"
	assert.Equal(t, fwk.UnschedulableAndUnresolvable, filter(high).Code(), "no eviction applies a plan sooner")
}

// A plan reuses what it derived from a node (memos) only while neither
// the node nor its NodePartition changed: a pod bound since counts, and a
// NodePartition with more room moves its node ahead when candidates are
// capped.
func TestViewsSeeWhatChangedSinceTheLastPlan(t *testing.T) {
	a30 := func(name string, slices ...v1alpha1.SliceStatus) *v1alpha1.NodePartition {
		np := builders.NodePartition(nil, "", "", builders.GPU(0, "A30", slices...))
		np.Name = name
		return np
	}
	free := v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: "1g.6gb", Start: 3}}
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": a30("n1", free), "n2": a30("n2")}}
	decoded := decodedPartitions{"n1": parts.get("n1"), "n2": parts.get("n2")}
	nodes := []*v1.Node{migNode("n1"), migNode("n2")}
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-1g.6gb", "1"))
	fw, _, _, plugin := testFrameworkWithActivations(t, decoded, nodes, pod)
	plugin.args.MaxNodesPerPlan = 1
	logger, _ := ktesting.NewTestContext(t)
	d := demand.Demand{mig.MustParseProfile("1g.6gb"): 1}

	views, _ := plugin.views(logger, pod, d)
	require.Contains(t, views, "n1", "the node with a free 1g.6gb")
	open := views["n1"].open
	assert.Empty(t, views["n1"].node.Bound)
	views, _ = plugin.views(logger, pod, d)
	assert.Same(t, open, views["n1"].open, "nothing changed: reused")

	ni, err := fw.SnapshotSharedLister().NodeInfos().Get("n1")
	require.NoError(t, err)
	holder := pendingPod("holder", builders.Resources("nvidia.com/mig-1g.6gb", "1"))
	holder.Spec.NodeName = "n1"
	ni.(*framework.NodeInfo).AddPod(holder)
	views, _ = plugin.views(logger, pod, d)
	assert.Equal(t, 1, views["n1"].node.Bound[mig.MustParseProfile("1g.6gb")], "the pod bound since")
	assert.NotSame(t, open, views["n1"].open)

	decoded["n2"] = partition.Decode(a30("n2", free, v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: "1g.6gb", Start: 2}}))
	views, _ = plugin.views(logger, pod, d)
	assert.Contains(t, views, "n2", "n2 now has two free 1g.6gb")
}

// More MIG nodes than a plan considers (MaxNodesPerPlan, 100): a pod that
// only the last node accepts — by node selector or by its taints — is
// planned there, and past the cap the nodes with free slices the pod asks
// for are kept first.
func TestPostFilterFindsTheNodesThePodCanUse(t *testing.T) {
	const count = 105
	a30 := func(name string, slices ...v1alpha1.SliceStatus) *v1alpha1.NodePartition {
		np := builders.NodePartition(nil, "", "", builders.GPU(0, "A30", slices...))
		np.Name = name
		return np
	}
	taint := v1.Taint{Key: "team", Value: "other", Effect: v1.TaintEffectNoSchedule}
	build := func(last *v1.Node, lastPart *v1alpha1.NodePartition) (*fakePartitions, []*v1.Node) {
		parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{}}
		var nodes []*v1.Node
		for i := range count - 1 {
			name := fmt.Sprintf("n-%03d", i)
			parts.objects[name] = a30(name)
			nodes = append(nodes, migNode(name, taint))
		}
		parts.objects[last.Name] = lastPart
		return parts, append(nodes, last)
	}

	selected := migNode("n-104", taint)
	selected.Labels["pick"] = "me"
	parts, nodes := build(selected, a30("n-104"))
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-1g.6gb", "1"))
	pod.Spec.NodeSelector = map[string]string{"pick": "me"}
	pod.Spec.Tolerations = []v1.Toleration{{Key: "team", Operator: v1.TolerationOpExists}}
	fw, _ := testFramework(t, parts, nodes, pod)
	result, st := schedule(t, fw, pod, nodes)
	require.Equal(t, fwk.Unschedulable, st.Code(), st.Message())
	require.NotNil(t, result, st.Message())
	assert.Equal(t, "n-104", result.NominatedNodeName, "by node selector")

	parts, nodes = build(migNode("n-104"), a30("n-104"))
	pod = pendingPod("q", builders.Resources("nvidia.com/mig-1g.6gb", "1"))
	fw, _ = testFramework(t, parts, nodes, pod)
	result, st = schedule(t, fw, pod, nodes)
	require.NotNil(t, result, st.Message())
	assert.Equal(t, "n-104", result.NominatedNodeName, "every other node's taint is not tolerated")

	// Every node tolerated; only the last has a free 1g.6gb: no change
	// needed there, so it is among the nodes kept, and chosen.
	parts, nodes = build(migNode("n-104", taint), a30("n-104", v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: "1g.6gb", Start: 3}}))
	fw, _ = testFramework(t, parts, nodes, pod)
	pod.Spec.Tolerations = []v1.Toleration{{Key: "team", Operator: v1.TolerationOpExists}}
	result, st = schedule(t, fw, pod, nodes)
	require.NotNil(t, result, st.Message())
	assert.Equal(t, "n-104", result.NominatedNodeName, "the free slice, kept past the cap")
}

// A pod nominated to a node the pod being planned cannot use (node b's
// taint) waits there: it is not planned again on the nodes this plan
// considers.
func TestPostFilterLeavesPodsNominatedElsewhere(t *testing.T) {
	parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"a": emptyA100("a"), "b": emptyA100("b")}}
	taint := v1.Taint{Key: "team", Value: "x", Effect: v1.TaintEffectNoSchedule}
	nodes := []*v1.Node{migNode("a"), migNode("b", taint)}
	waiting := pendingPod("waiting", builders.Resources("nvidia.com/mig-3g.40gb", "1"))
	waiting.Spec.Tolerations = []v1.Toleration{{Key: "team", Operator: v1.TolerationOpExists}}
	waiting.Status.NominatedNodeName = "b"
	pod := pendingPod("p", builders.Resources("nvidia.com/mig-4g.40gb", "1"))
	fw, _ := testFramework(t, parts, nodes, waiting, pod)

	result, st := schedule(t, fw, pod, nodes)
	require.NotNil(t, result, st.Message())
	assert.Equal(t, "a", result.NominatedNodeName)
	require.Len(t, parts.written, 1)
	assert.Equal(t, []string{"4g.40gb@0"}, builders.SpecLayout(parts.written[0], 0), "no slice for the pod nominated to b")
}

func TestPublishSaysWhichPlansItKeeps(t *testing.T) {
	for _, tc := range []struct {
		name   string
		exists v1alpha1.SliceStatus
		keeps  string
	}{
		{"a plan that only adds slices keeps the applied plan", builders.Advertised("3g.40gb", 4), "p-1"},
		{"a plan that destroys a slice keeps none", builders.Advertised("7g.80gb", 0), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			np := builders.NodePartition([]v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{tc.exists.Slice}}}, "p-1", "p-1", builders.GPU(0, "A100-80GB", tc.exists))
			np.Name, np.Status.DevicePlugin = "n1", v1alpha1.DevicePluginAgent
			parts := &fakePartitions{objects: map[string]*v1alpha1.NodePartition{"n1": np}}
			nodes := []*v1.Node{migNode("n1")}
			pod := pendingPod("p", builders.Resources("nvidia.com/mig-1g.10gb", "1"))
			fw, _ := testFramework(t, parts, nodes, pod)

			_, st := schedule(t, fw, pod, nodes)
			require.Equal(t, fwk.Unschedulable, st.Code(), st.Message())
			require.Len(t, parts.written, 1)
			assert.Equal(t, tc.keeps, parts.written[0].Annotations[partition.KeepsAnnotation])
		})
	}
}

func TestPlannerNodeIsBusyWhileItsAgentApplies(t *testing.T) {
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "7g.80gb", Start: 0}}}}
	for _, tc := range []struct {
		name     string
		plugin   v1alpha1.DevicePluginMode
		observed string
		want     bool
	}{
		{"agent mode, plan in flight", v1alpha1.DevicePluginAgent, "p-1", true},
		{"agent mode, plan applied", v1alpha1.DevicePluginAgent, "p-2", false},
		{"restart mode, plan in flight: a newer plan shares the restart", v1alpha1.DevicePluginNVIDIA, "p-1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			np := builders.NodePartition(spec, "p-2", tc.observed, builders.GPU(0, "A100-80GB"))
			np.Status.DevicePlugin = tc.plugin
			assert.Equal(t, tc.want, plannerNode(partition.Decode(np)).Busy)
		})
	}
}
