package dynamicmig

import (
	"context"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	corev1helpers "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/guard"
	"github.com/dynamig/dynamig/pkg/partition"
)

const (
	stateKey    fwk.StateKey = "PreFilter" + Name
	simulateKey fwk.StateKey = Name + "/simulate"
)

// preFilterState is the pod's MIG demand.
type preFilterState struct{ demand demand.Demand }

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

// simulating marks a cycle state used to ask the other filters whether a
// pod could run on a node if the node had the MIG slices it needs; the
// plugin's own Filter passes in it.
type simulating struct{}

func (s simulating) Clone() fwk.StateData { return s }

// PreFilter reads the pod's MIG demand. Pods without one are skipped (their
// Filter is not run and PostFilter returns at once). A malformed MIG
// resource name is UnschedulableAndUnresolvable with an event: no layout
// can serve it.
func (p *DynamicMIG) PreFilter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, _ []fwk.NodeInfo) (*fwk.PreFilterResult, *fwk.Status) {
	if !p.scheduling.Load() {
		p.scheduling.Store(true)
	}
	d, err := demand.Of(pod)
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

// Filter's reasons name no node, so that kube-scheduler adds them up over
// the nodes ("0/105 nodes are available: 100 no free 1g.10gb, 5 node
// being repartitioned …"), as the in-tree plugins' do; which node and
// plan is logged at verbosity 4, and PostFilter's event names the plan.
const (
	reasonRepartitioning = "node being repartitioned (its MIG plan is not applied yet)"
	reasonRestarting     = "node's GPU device plugin or kubelet is restarting"
)

// Filter rejects a node without enough free slices of the pod's profiles
// (those its NodePartition reports advertised — kubelet can allocate
// them — or, for a node without one, Node allocatable; less what the
// pods on the node request; NodeResourcesFit leaves MIG resources to it),
// so that DynamicMIG is among the pod's rejectors and is asked again when
// capacity appears (see requeue.go); NodeResourcesFit's hints alone would
// wait for allocatable to grow, which no repartition of freed slices
// causes.
//
// It also rejects every MIG pod on a node whose published plan is not
// applied yet — unless the node is in agent mode and its agent reports
// the plan's destroys withdrawn from kubelet (then the slices advertised
// so far count) — or whose agent restarts the device plugin, or whose
// kubelet restarts (see the agent's kubeletSettle). The kubelet, not
// the scheduler, picks the device a pod gets, from all the device plugin
// still advertises — slices the plan is about to destroy included; and
// the agent restarts the NVIDIA device plugin to apply the plan, during
// which the kubelet fails the admission of any pod asking for its
// resources, for good (UnexpectedAdmissionError).
func (p *DynamicMIG) Filter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, ni fwk.NodeInfo) *fwk.Status {
	if _, err := state.Read(simulateKey); err == nil {
		return nil
	}
	s, err := getState(state)
	if err != nil {
		return fwk.AsStatus(err)
	}
	node := ni.Node()
	part := p.partitions.get(node.Name)
	if part != nil && !guard.Off(guard.InFlight) {
		switch {
		case part.InFlight && !part.Applying:
			if logger := klog.FromContext(ctx).V(4); logger.Enabled() { // Filter runs per node: no arguments built unless logged
				logger.Info("node being repartitioned", "pod", klog.KObj(pod), "node", node.Name, "plan", part.PlanID)
			}
			return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, reasonRepartitioning)
		case part.Restarting:
			if logger := klog.FromContext(ctx).V(4); logger.Enabled() {
				logger.Info("device plugin restarting", "pod", klog.KObj(pod), "node", node.Name)
			}
			return fwk.NewStatus(fwk.UnschedulableAndUnresolvable, reasonRestarting)
		}
	}
	requested := ni.GetRequested().GetScalarResources()
	allocatable := ni.GetAllocatable().GetScalarResources()
	for prof, want := range s.demand {
		r := v1.ResourceName(prof.ResourceName())
		have := allocatable[r]
		if part != nil {
			// The agent says which slices kubelet can allocate (its
			// device manager admits from them); Node allocatable shows
			// them only at kubelet's next node-status update.
			have = part.Advertised[string(r)] - unhealthy(node, part, r, allocatable[r])
		}
		if have-requested[r] < int64(want) {
			return fwk.NewStatus(shortage(pod, ni, r), fmt.Sprintf("no free %s", prof))
		}
	}
	return nil
}

// shortage is the code of a node's rejection for want of free r:
// Unschedulable where a pod of lower priority than pod holds r there, so
// that DefaultPreemption may free it; elsewhere removing pods frees no r,
// and UnschedulableAndUnresolvable has DefaultPreemption skip the node
// rather than try it (its dry run over thousands of nodes, for every MIG
// pod waiting for a repartition, cost the scheduler more CPU than
// planning). The same holds for a node being repartitioned or restarting:
// no eviction ends that sooner. Both codes requeue the pod alike.
func shortage(pod *v1.Pod, ni fwk.NodeInfo, r v1.ResourceName) fwk.Code {
	priority := corev1helpers.PodPriority(pod)
	for _, pi := range ni.GetPods() {
		other := pi.GetPod()
		if corev1helpers.PodPriority(other) < priority && demand.AsksFor(other, r) {
			return fwk.Unschedulable
		}
	}
	return fwk.UnschedulableAndUnresolvable
}

// unhealthy counts the devices of r kubelet holds unhealthy (Node
// capacity above allocatable: their plugin went, as when the agent
// crashed without a word): they do not count, whatever the agent said
// last. A node status kubelet posted before the device plugin's last
// restart ended (the agent's own, or NVIDIA's in restart mode) is not
// taken for that: the agent confirmed what kubelet can allocate since.
// Both times come from the node's clock, to the second; a status of the
// same second counts.
func unhealthy(node *v1.Node, part *partition.Node, r v1.ResourceName, allocatable int64) int64 {
	capacity := node.Status.Capacity[r]
	n := capacity.Value() - allocatable
	if n <= 0 || postedBefore(node, part.RestartEnded) {
		return 0
	}
	return n
}

// postedBefore reports whether kubelet's last node status (its Ready
// heartbeat, written with every status it posts) predates t; false when
// either is unknown.
func postedBefore(node *v1.Node, t time.Time) bool {
	if t.IsZero() {
		return false
	}
	for _, c := range node.Status.Conditions {
		if c.Type == v1.NodeReady {
			return !c.LastHeartbeatTime.IsZero() && c.LastHeartbeatTime.Time.Before(t)
		}
	}
	return false
}
