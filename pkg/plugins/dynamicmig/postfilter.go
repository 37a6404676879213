package dynamicmig

import (
	"context"
	"fmt"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

// PostFilter plans for all pending MIG pods of this profile at once and
// publishes the layouts that change. The pod is nominated to its planned
// node and stays Unschedulable until the slices appear on that node.
func (p *DynamicMIG) PostFilter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, _ fwk.NodeToStatusReader) (*fwk.PostFilterResult, *fwk.Status) {
	s, err := getState(state)
	if err != nil {
		return nil, fwk.NewStatus(fwk.Unschedulable) // PreFilter skipped the pod: no MIG demand
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	start := p.now()
	defer func() { planDuration.Observe(p.now().Sub(start).Seconds()) }()
	logger := klog.FromContext(ctx)

	if !p.partitions.synced() {
		plansTotal.WithLabelValues(resultNotReady).Inc()
		return nil, fwk.NewStatus(fwk.Unschedulable, "waiting for the NodePartition cache to sync")
	}
	views, left := p.views(logger, pod, s.demand)
	snap, err := p.snapshot(ctx, state, pod, s.demand, views, left)
	if err != nil {
		return nil, fwk.AsStatus(err)
	}
	plan := planner.Dynamig{}.Plan(snap)
	a, ok := assignment(plan, podKey(pod))
	if !ok {
		return nil, fwk.AsStatus(fmt.Errorf("the plan has no assignment for pod %s", podKey(pod)))
	}
	if !a.Served() {
		plansTotal.WithLabelValues(resultNoRoom).Inc()
		logger.V(2).Info("no MIG layout serves the pod now", "pod", klog.KObj(pod), "demand", s.demand.String(), "reason", a.Reason, "pods", len(snap.Pods), "nodes", len(snap.Nodes), "took", p.now().Sub(start))
		return nil, fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("no MIG layout can serve %s now: %s", s.demand, a.Reason))
	}
	node := views[a.Node]
	if st := p.fitsPlanned(ctx, state, pod, node.ni, plan, a.Node); !st.IsSuccess() {
		plansTotal.WithLabelValues(resultFilterFail).Inc()
		logger.V(2).Info("planned node fails the pod's filters; nothing published", "pod", klog.KObj(pod), "node", a.Node, "status", st.Message())
		return nil, fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("planned %s on %s, but the node fails the pod's filters: %s", s.demand, a.Node, st.Message()))
	}
	planID := p.newPlanID()
	logger = klog.LoggerWithValues(logger, "plan", planID)
	published := p.now()
	created, err := p.publish(klog.NewContext(ctx, logger), planID, plan, views)
	publishDuration.Observe(p.now().Sub(published).Seconds())
	if apierrors.IsConflict(err) {
		plansTotal.WithLabelValues(resultConflict).Inc()
		logger.V(2).Info("NodePartition changed while planning; the pod will be planned again", "pod", klog.KObj(pod), "err", err)
		// No cluster event may follow (an agent's status write is enough to
		// conflict): retry at once instead of waiting in the unschedulable pool.
		p.h.Activate(logger, map[string]*v1.Pod{podKey(pod): pod})
		return nil, fwk.NewStatus(fwk.Unschedulable, "a NodePartition changed while planning; planning again")
	}
	if err != nil {
		return nil, fwk.AsStatus(err)
	}
	podsWaiting.Set(float64(waiting(plan, views, created)))
	plansTotal.WithLabelValues(resultPlanned).Inc()
	var msg string
	if c, ok := created[a.Node]; ok {
		msg = fmt.Sprintf("plan %s creates %s", planID, describe(c, a.Node))
		p.h.EventRecorder().Eventf(pod, node.ni.Node(), v1.EventTypeNormal, ReasonPlanned, "Scheduling", "%s; the pod waits for %s", msg, s.demand)
	} else {
		msg = fmt.Sprintf("waiting for %s on %s", s.demand, a.Node)
		if node.part.InFlight {
			msg += fmt.Sprintf(" (plan %s not applied yet)", node.part.PlanID)
		}
		p.h.EventRecorder().Eventf(pod, node.ni.Node(), v1.EventTypeNormal, ReasonWaiting, "Scheduling", "%s", msg)
	}
	logger.V(2).Info("pod nominated for a MIG layout", "pod", klog.KObj(pod), "node", a.Node, "slices", a.Slices, "pods", len(snap.Pods), "nodes", len(snap.Nodes), "took", p.now().Sub(start))
	return framework.NewPostFilterResultWithNominatedNode(a.Node), fwk.NewStatus(fwk.Unschedulable, msg)
}

// assignment is the plan's answer for the pod named "namespace/name".
func assignment(plan *planner.Plan, pod string) (planner.Assignment, bool) {
	for _, a := range plan.Pods {
		if a.Pod == pod {
			return a, true
		}
	}
	return planner.Assignment{}, false
}

// fitsPlanned runs the pod's filters on its planned node as it will be once
// the plan is applied.
func (p *DynamicMIG) fitsPlanned(ctx context.Context, state fwk.CycleState, pod *v1.Pod, ni fwk.NodeInfo, plan *planner.Plan, node string) *fwk.Status {
	counts := map[mig.ProfileName]int{}
	for _, n := range plan.Nodes {
		if n.Name != node {
			continue
		}
		for _, g := range n.GPUs {
			for _, s := range g.Slices {
				counts[s.Profile]++
			}
		}
	}
	state.Write(simulateKey, simulating{})
	defer state.Delete(simulateKey)
	return p.h.RunFilterPluginsWithNominatedPods(ctx, state, pod, withMIG(ni, counts))
}
