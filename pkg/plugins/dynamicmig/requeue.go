package dynamicmig

import (
	"context"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
)

// Requeueing has one path per kind of change:
//   - Node allocatable grew, or a pod holding MIG slices went: queueing
//     hints (EventsToRegister), answered from the event's objects;
//   - a NodePartition changed: the plugin's own informer, which decodes
//     each version once, activates the pending pods the change can help
//     (partitionChanged). The scheduler's informer of the CR would hand
//     hints undecoded objects, possibly ahead of the plugin's copy, so
//     that a pod requeued by them could be planned from the older copy.

// EventsToRegister: a pod rejected for MIG capacity may fit when a Node's
// allocatable grows, or when a pod holding MIG slices goes (its slices may
// be repartitioned once the agent reports them free).
func (p *DynamicMIG) EventsToRegister(context.Context) ([]fwk.ClusterEventWithHint, error) {
	return []fwk.ClusterEventWithHint{
		{Event: fwk.ClusterEvent{Resource: fwk.Node, ActionType: fwk.Add | fwk.UpdateNodeAllocatable}, QueueingHintFn: p.isSchedulableAfterNodeChange},
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
	if !demand.AsksForMIG(gone) {
		return fwk.QueueSkip, nil
	}
	logger.V(5).Info("a pod holding MIG slices went", "pod", klog.KObj(pod), "gone", klog.KObj(gone), "node", gone.Spec.NodeName)
	return fwk.Queue, nil
}

// isSchedulableAfterNodeChange queues the pod when the allocatable of one
// of its profiles grew to at least what it asks for.
func (p *DynamicMIG) isSchedulableAfterNodeChange(logger klog.Logger, pod *v1.Pod, oldObj, newObj any) (fwk.QueueingHint, error) {
	newNode, ok := newObj.(*v1.Node)
	if !ok {
		return fwk.Queue, fmt.Errorf("expected a Node, got %T", newObj)
	}
	oldNode, _ := oldObj.(*v1.Node)
	d, err := demand.Of(pod)
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

// What a NodePartition change can mean for pending pods.
const (
	planApplied  = "a plan was applied"
	gpusReported = "the agent reported the node's GPUs"
	slicesFreed  = "the agent reported slices freed"
	restarted    = "the device plugin restarted"
	advertised   = "the agent advertised more slices"
	applying     = "the agent began applying the plan"
)

// capacityChange says why a NodePartition change may let a pending MIG
// pod be served, or "" if it cannot. old is nil for a new NodePartition.
func capacityChange(old, n *partition.Node) string {
	observed := n.Object.Status.ObservedPlanID
	switch {
	case observed != "" && !n.InFlight && (old == nil || old.Object.Status.ObservedPlanID != observed):
		return planApplied
	case (old == nil || len(old.GPUs) == 0) && len(n.GPUs) > 0:
		return gpusReported
	case old != nil && n.Used < old.Used:
		return slicesFreed
	case old != nil && old.Restarting && !n.Restarting:
		return restarted
	case old != nil && grew(old.Advertised, n.Advertised):
		return advertised
	case old != nil && n.Applying && !old.Applying:
		// A newer plan was published while the agent applied one: the
		// node took no MIG pod until the agent withdrew what the newer
		// plan destroys; the slices it advertised are open again.
		return applying
	}
	return ""
}

// grew reports whether any count in n is above its count in old.
func grew(old, n map[string]int64) bool {
	for k, v := range n {
		if v > old[k] {
			return true
		}
	}
	return false
}

// partitionChanged activates the pending pods a NodePartition change can
// help: those nominated to the node, and those asking for a profile the
// change makes available there — free slices of it after a plan is
// applied; any profile the node's GPUs offer when slices are freed or the
// GPUs first reported (a new layout may serve it).
func (p *DynamicMIG) partitionChanged(logger klog.Logger, old, n *partition.Node) {
	why := capacityChange(old, n)
	if why == "" {
		return
	}
	if why == planApplied && !n.PlanTime.IsZero() {
		planToApplied.Observe(time.Since(n.PlanTime).Seconds())
	}
	pods := map[string]*v1.Pod{}
	for _, pi := range p.h.NominatedPodsForNode(n.Object.Name) {
		if pod := pi.GetPod(); demand.AsksForMIG(pod) {
			pods[pod.Namespace+"/"+pod.Name] = pod
		}
	}
	for prof := range available(why, n) {
		for _, pod := range p.pending.asking(p.h.ProfileName(), prof) {
			pods[pod.Namespace+"/"+pod.Name] = pod
		}
	}
	if len(pods) == 0 {
		return
	}
	logger.V(5).Info("NodePartition change may serve pending pods; activating them", "node", n.Object.Name, "why", why, "pods", len(pods))
	p.h.Activate(logger, pods)
}

// available is the set of profiles a change makes available on the node.
func available(why string, n *partition.Node) map[mig.ProfileName]bool {
	out := map[mig.ProfileName]bool{}
	for i := range n.GPUs {
		g := &n.GPUs[i]
		switch {
		case why == planApplied || why == restarted || why == advertised || why == applying:
			for _, s := range g.Slices {
				if !s.Used {
					out[s.Profile] = true
				}
			}
		case g.Plannable():
			for _, prof := range g.Model.Profiles {
				out[prof.Name] = true
			}
		}
	}
	return out
}

// pendingIndex indexes, in the scheduler's pod informer, the pods waiting
// to be scheduled that ask for MIG slices, by "<schedulerName>" and by
// "<schedulerName>/<profile>" for each profile they ask for. A pod with
// scheduling gates is not waiting for the scheduler: nothing is planned
// for it until its gates are removed.
const pendingIndex = "dynamig.io/pending-mig"

// pendingPods finds pending MIG pods without listing every pod.
type pendingPods struct{ indexer cache.Indexer }

func newPendingPods(h fwk.Handle) (*pendingPods, error) {
	informer := h.SharedInformerFactory().Core().V1().Pods().Informer()
	if _, ok := informer.GetIndexer().GetIndexers()[pendingIndex]; !ok { // another profile's DynamicMIG may have added it
		if err := informer.AddIndexers(cache.Indexers{pendingIndex: pendingKeys}); err != nil {
			return nil, fmt.Errorf("indexing pending MIG pods: %w", err)
		}
	}
	return &pendingPods{indexer: informer.GetIndexer()}, nil
}

func pendingKeys(obj any) ([]string, error) {
	pod, ok := obj.(*v1.Pod)
	if !ok || pod.Spec.NodeName != "" || pod.DeletionTimestamp != nil || len(pod.Spec.SchedulingGates) > 0 || !demand.AsksForMIG(pod) {
		return nil, nil
	}
	d, err := demand.Of(pod)
	if err != nil {
		return nil, nil // PreFilter reports it; no layout serves it
	}
	keys := []string{pod.Spec.SchedulerName}
	for prof := range d {
		keys = append(keys, pod.Spec.SchedulerName+"/"+prof.String())
	}
	return keys, nil
}

// asking lists the pending pods of a scheduler profile that ask for the
// MIG profile, or for any if prof is the zero value.
func (pp *pendingPods) asking(scheduler string, prof mig.ProfileName) []*v1.Pod {
	key := scheduler
	if prof != (mig.ProfileName{}) {
		key += "/" + prof.String()
	}
	objs, err := pp.indexer.ByIndex(pendingIndex, key)
	if err != nil {
		return nil
	}
	out := make([]*v1.Pod, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*v1.Pod))
	}
	return out
}
