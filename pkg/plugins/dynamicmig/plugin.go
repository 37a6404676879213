// Package dynamicmig is the DynamicMIG scheduler plugin. PreFilter reads a
// pod's MIG demand; Filter keeps pods off slices that a published plan is
// about to remove; PostFilter plans new MIG layouts for all pending MIG
// pods at once (package planner), publishes them to the NodePartition
// specs, nominates the pod's node and leaves the pod Unschedulable until
// the node agent has applied the layout and kubelet advertises the slices.
package dynamicmig

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/config"
	configv1 "github.com/dynamig/dynamig/pkg/apis/config/v1"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Name is the plugin's name in a KubeSchedulerConfiguration.
const Name = "DynamicMIG"

const (
	stateKey    fwk.StateKey = "PreFilter" + Name
	simulateKey fwk.StateKey = Name + "/simulate"
)

// DynamicMIG is the plugin.
type DynamicMIG struct {
	h          fwk.Handle
	fw         framework.Framework // for PreFilter of other pending pods
	args       *config.DynamicMIGArgs
	selector   labels.Selector
	partitions partitionStore
	now        func() time.Time

	mu     sync.Mutex // serialises planning and publishing
	planNo uint64
}

var (
	_ fwk.PreFilterPlugin   = &DynamicMIG{}
	_ fwk.FilterPlugin      = &DynamicMIG{}
	_ fwk.PostFilterPlugin  = &DynamicMIG{}
	_ fwk.EnqueueExtensions = &DynamicMIG{}
)

// partitionStore is where the plugin reads NodePartitions (shared objects:
// never modified) and writes their spec: an informer and the API server,
// or a fake in unit tests.
type partitionStore interface {
	synced() bool
	get(node string) (*v1alpha1.NodePartition, error)
	updateSpec(ctx context.Context, np *v1alpha1.NodePartition) error
}

// New builds the plugin from its arguments (see package config/v1). Bad
// arguments stop the scheduler with a message naming the field.
func New(ctx context.Context, obj runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
	args, err := configv1.Decode(obj)
	if err != nil {
		return nil, err
	}
	logger := klog.FromContext(ctx)
	pods := h.SharedInformerFactory().Core().V1().Pods().Lister()
	parts, err := newPartitions(ctx, h.KubeConfig(), func(old, np *v1alpha1.NodePartition) {
		why := capacityChange(old, np)
		if why == "" {
			return
		}
		if why == planApplied {
			if t := planTime(np); !t.IsZero() {
				planToApplied.Observe(time.Since(t).Seconds())
			}
		}
		// The queueing hints see this change through the scheduler's own
		// informer, which may be ahead of ours: a pod requeued by them
		// could be planned from our older copy and wait again. Activate
		// the pending MIG pods once our copy has the change too.
		activatePending(logger, h, pods)
	})
	if err != nil {
		return nil, err
	}
	return newPlugin(ctx, args, h, parts)
}

// activatePending moves the pending pods that ask for MIG slices to the
// active queue.
func activatePending(logger klog.Logger, h fwk.Handle, pods corelisters.PodLister) {
	all, err := pods.List(labels.Everything())
	if err != nil {
		return
	}
	pending := map[string]*v1.Pod{}
	for _, pod := range all {
		if pod.Spec.NodeName == "" && pod.DeletionTimestamp == nil && asksForMIG(pod) {
			pending[pod.Namespace+"/"+pod.Name] = pod
		}
	}
	if len(pending) > 0 {
		h.Activate(logger, pending)
	}
}

func newPlugin(ctx context.Context, args *config.DynamicMIGArgs, h fwk.Handle, parts partitionStore) (*DynamicMIG, error) {
	sel, err := labels.Parse(args.NodeSelector)
	if err != nil {
		return nil, fmt.Errorf("DynamicMIG args: nodeSelector: %w", err)
	}
	fw, ok := h.(framework.Framework)
	if !ok {
		return nil, fmt.Errorf("DynamicMIG needs the scheduler's framework handle, got %T", h)
	}
	registerMetrics()
	klog.FromContext(ctx).V(2).Info("DynamicMIG ready", "nodeSelector", args.NodeSelector, "planTimeout", args.PlanTimeout,
		"maxNodesPerPlan", args.MaxNodesPerPlan, "maxPendingPodsPerPlan", args.MaxPendingPodsPerPlan)
	return &DynamicMIG{h: h, fw: fw, args: args, selector: sel, partitions: parts, now: time.Now}, nil
}

// Name implements fwk.Plugin.
func (p *DynamicMIG) Name() string { return Name }

// preFilterState is the pod's MIG demand.
type preFilterState struct{ demand Demand }

// Clone implements fwk.StateData; the demand is never modified.
func (s *preFilterState) Clone() fwk.StateData { return s }

func getState(state fwk.CycleState) (*preFilterState, error) {
	d, err := state.Read(stateKey)
	if err != nil {
		return nil, fmt.Errorf("reading %q from the cycle state: %w", stateKey, err)
	}
	s, ok := d.(*preFilterState)
	if !ok {
		return nil, fmt.Errorf("%q holds %T, not the DynamicMIG pre-filter state", stateKey, d)
	}
	return s, nil
}

// PreFilter reads the pod's MIG demand. Pods without one are skipped (their
// Filter is not run and PostFilter returns at once). A malformed MIG
// resource name is UnschedulableAndUnresolvable with an event: no layout
// can serve it.
func (p *DynamicMIG) PreFilter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, _ []fwk.NodeInfo) (*fwk.PreFilterResult, *fwk.Status) {
	d, err := podDemand(pod)
	if err != nil {
		if _, simErr := state.Read(simulateKey); simErr != nil { // the pod's own cycle
			p.h.EventRecorder().Eventf(pod, nil, v1.EventTypeWarning, ReasonInvalidRequest, "Scheduling", "%v", err)
		}
		return nil, fwk.NewStatus(fwk.UnschedulableAndUnresolvable, err.Error())
	}
	if len(d) == 0 {
		return nil, fwk.NewStatus(fwk.Skip)
	}
	state.Write(stateKey, &preFilterState{demand: d})
	return nil, nil
}

// PreFilterExtensions implements fwk.PreFilterPlugin.
func (p *DynamicMIG) PreFilterExtensions() fwk.PreFilterExtensions { return nil }

// Filter rejects a node without enough free slices of the pod's profiles,
// so that DynamicMIG is among the pod's rejectors and its queueing hints
// (slices freed, plan applied) requeue it; NodeResourcesFit's hints alone
// would wait for allocatable to grow, which no repartition of freed
// slices causes. On a node whose published plan is not applied yet, only
// slices that exist and that the plan keeps count: kubelet may still
// advertise slices that are about to go.
func (p *DynamicMIG) Filter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, ni fwk.NodeInfo) *fwk.Status {
	if _, err := state.Read(simulateKey); err == nil {
		return nil
	}
	s, err := getState(state)
	if err != nil {
		return fwk.AsStatus(err)
	}
	node := ni.Node()
	np, err := p.partitions.get(node.Name)
	if err != nil {
		return fwk.AsStatus(err)
	}
	var planned map[mig.ProfileName]int
	if inFlight(np) {
		planned = keptCounts(np)
	}
	requested := ni.GetRequested().GetScalarResources()
	allocatable := ni.GetAllocatable().GetScalarResources()
	for prof, want := range s.demand {
		r := v1.ResourceName(prof.ResourceName())
		usable := allocatable[r]
		if planned != nil {
			usable = min(usable, int64(planned[prof]))
		}
		if usable-requested[r] >= int64(want) {
			continue
		}
		if planned != nil {
			return fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("%s on %s is being repartitioned (plan %s not applied yet)", prof, node.Name, np.Spec.PlanID))
		}
		return fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("no free %s on %s", prof, node.Name))
	}
	return nil
}

// keptCounts counts, per profile, the slices that exist (in status) and
// that the NodePartition's spec keeps: on the GPUs it lists, those at the
// same placement; on the others, all. A slice the plan is about to create
// does not count until it exists, and one it replaces by another of the
// same profile does not either: kubelet could give it to the pod just
// before the agent destroys it.
func keptCounts(np *v1alpha1.NodePartition) map[mig.ProfileName]int {
	spec := map[int32]map[v1alpha1.Slice]bool{}
	for _, g := range np.Spec.GPUs {
		spec[g.Index] = map[v1alpha1.Slice]bool{}
		for _, s := range g.Slices {
			spec[g.Index][s] = true
		}
	}
	counts := map[mig.ProfileName]int{}
	for _, g := range np.Status.GPUs {
		want, listed := spec[g.Index]
		for _, s := range g.Slices {
			if p, err := mig.ParseProfile(s.Profile); err == nil && (!listed || want[s.Slice]) {
				counts[p]++
			}
		}
	}
	return counts
}

// EventsToRegister: a pod rejected for MIG capacity may fit when a Node's
// allocatable grows, a NodePartition's plan is applied or its agent
// reports slices freed or GPUs, or a pod holding MIG slices goes (its
// slices may be repartitioned once the agent reports them free).
func (p *DynamicMIG) EventsToRegister(context.Context) ([]fwk.ClusterEventWithHint, error) {
	return []fwk.ClusterEventWithHint{
		{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.Add | fwk.UpdateNodeAllocatable}, QueueingHintFn: p.isSchedulableAfterNodeChange},
		{Event: fwk.ClusterEvent{Resource: nodePartitionEvent, ActionType: fwk.Add | fwk.Update}, QueueingHintFn: p.isSchedulableAfterPartitionChange},
		{Event: fwk.ClusterEvent{Resource: fwk.AssignedPod, ActionType: fwk.Delete}, QueueingHintFn: p.isSchedulableAfterPodDelete},
	}, nil
}

// isSchedulableAfterPodDelete queues the pod when a bound pod that held
// MIG slices is deleted or finishes.
func (p *DynamicMIG) isSchedulableAfterPodDelete(logger klog.Logger, pod *v1.Pod, oldObj, _ any) (fwk.QueueingHint, error) {
	gone, ok := oldObj.(*v1.Pod)
	if !ok {
		return fwk.Queue, fmt.Errorf("expected a Pod, got %T", oldObj)
	}
	if !asksForMIG(gone) {
		return fwk.QueueSkip, nil
	}
	logger.V(5).Info("a pod holding MIG slices went", "pod", klog.KObj(pod), "gone", klog.KObj(gone), "node", gone.Spec.NodeName)
	return fwk.Queue, nil
}

// nodePartitionEvent is the NodePartition resource as the scheduler's
// dynamic informers name it.
const nodePartitionEvent fwk.EventResource = "nodepartitions.v1alpha1.dynamig.io"

func (p *DynamicMIG) isSchedulableAfterNodeChange(logger klog.Logger, pod *v1.Pod, oldObj, newObj any) (fwk.QueueingHint, error) {
	newNode, ok := newObj.(*v1.Node)
	if !ok {
		return fwk.Queue, fmt.Errorf("expected a Node, got %T", newObj)
	}
	oldNode, _ := oldObj.(*v1.Node)
	d, err := podDemand(pod)
	if err != nil {
		return fwk.QueueSkip, nil
	}
	for prof, want := range d {
		r := v1.ResourceName(prof.ResourceName())
		nq, ok := newNode.Status.Allocatable[r]
		if !ok || nq.Value() < int64(want) {
			continue
		}
		if oldNode != nil {
			if oq, ok := oldNode.Status.Allocatable[r]; ok && oq.Cmp(nq) >= 0 {
				continue
			}
		}
		logger.V(5).Info("MIG capacity grew on the node", "pod", klog.KObj(pod), "node", newNode.Name, "resource", r, "allocatable", nq.Value())
		return fwk.Queue, nil
	}
	logger.V(5).Info("no MIG capacity the pod needs appeared on the node", "pod", klog.KObj(pod), "node", newNode.Name)
	return fwk.QueueSkip, nil
}

func (p *DynamicMIG) isSchedulableAfterPartitionChange(logger klog.Logger, pod *v1.Pod, oldObj, newObj any) (fwk.QueueingHint, error) {
	np, err := fromUnstructured(newObj)
	if err != nil {
		return fwk.Queue, err
	}
	old := &v1alpha1.NodePartition{}
	if oldObj != nil {
		if old, err = fromUnstructured(oldObj); err != nil {
			old = &v1alpha1.NodePartition{}
		}
	}
	if why := capacityChange(old, np); why != "" {
		logger.V(5).Info("MIG capacity may have appeared", "pod", klog.KObj(pod), "node", np.Name, "why", why, "plan", np.Status.ObservedPlanID)
		return fwk.Queue, nil
	}
	return fwk.QueueSkip, nil
}

// What a NodePartition change can mean for pending pods.
const (
	planApplied  = "a plan was applied"
	gpusReported = "the agent reported the node's GPUs"
	slicesFreed  = "the agent reported slices freed"
)

// capacityChange says why a NodePartition change may let a pending MIG
// pod be served, or "" if it cannot.
func capacityChange(old, np *v1alpha1.NodePartition) string {
	switch {
	case np.Status.ObservedPlanID != "" && np.Status.ObservedPlanID != old.Status.ObservedPlanID && !inFlight(np):
		return planApplied
	case len(old.Status.GPUs) == 0 && len(np.Status.GPUs) > 0:
		return gpusReported
	case usedSlices(np) < usedSlices(old):
		return slicesFreed
	}
	return ""
}

func usedSlices(np *v1alpha1.NodePartition) int {
	n := 0
	for _, g := range np.Status.GPUs {
		for _, s := range g.Slices {
			if s.Used {
				n++
			}
		}
	}
	return n
}

// describe prints the slices a plan creates on a node: "1g.10gb×5 on node-a gpu 0".
func describe(created map[int]Demand, node string) string {
	gpus := make([]int, 0, len(created))
	for gpu := range created {
		gpus = append(gpus, gpu)
	}
	sort.Ints(gpus)
	parts := make([]string, len(gpus))
	for i, gpu := range gpus {
		parts[i] = fmt.Sprintf("%s on %s gpu %d", created[gpu], node, gpu)
	}
	return strings.Join(parts, ", ")
}
