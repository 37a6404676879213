package dynamicmig

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	corev1helpers "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
)

// view is one planned-for node: its scheduler NodeInfo, decoded
// NodePartition and the layout the planner starts from.
type view struct {
	ni   fwk.NodeInfo
	part *partition.Node
	node planner.Node
	// open is ni with room for any MIG request on it (openMIG), for the
	// pending pods' other filters: built once per plan, and kept in the
	// node's memo for the next while the node does not change.
	open fwk.NodeInfo
	room room // for the pod planned, when candidates are capped
	memo *memo
}

// views lists the nodes the plan for pod may change: selected by the node
// selector, with a NodePartition whose status reports GPUs, not stale, and
// usable for planning, and that pod's node selector, required node
// affinity and taints do not rule out (eligible) — so that a pod that only
// the last of thousands of nodes accepts is planned there. Past
// MaxNodesPerPlan it keeps the nodes with the most room for the pod
// (rank): the cap bounds the planner's work per plan, not which nodes
// a pod can reach. left names the other plannable nodes: pods nominated
// to them wait there and are not planned again elsewhere.
func (p *DynamicMIG) views(logger klog.Logger, pod *v1.Pod, d demand.Demand) (views map[string]*view, left map[string]bool) {
	infos, err := p.h.SnapshotSharedLister().NodeInfos().List()
	if err != nil {
		logger.Error(err, "listing nodes")
		return nil, nil
	}
	affinity := nodeaffinity.GetRequiredNodeAffinity(pod)
	p.memos.prune(len(infos))
	var cands []*view
	left = map[string]bool{}
	for _, ni := range infos {
		node := ni.Node()
		m := p.memos.of(node.Name)
		if m.node != node {
			m.node, m.selected = node, p.selector.Matches(labels.Set(node.Labels))
		}
		if !m.selected {
			continue
		}
		part := p.partitions.get(node.Name)
		if part == nil || len(part.GPUs) == 0 {
			continue // the agent has not reported this node yet
		}
		if part.InFlight && !part.PlanTime.IsZero() && p.now().Sub(part.PlanTime) > p.args.PlanTimeout {
			logger.V(2).Info("plan not applied in time; planning around the node", "node", node.Name, "plan", part.PlanID, "published", part.PlanTime)
			p.h.EventRecorder().Eventf(node, nil, v1.EventTypeWarning, ReasonPlanNotApplied, "Scheduling",
				"plan %s published %s ago is not applied (planTimeout %s); dynamig plans around this node until its agent reports it", part.PlanID, p.now().Sub(part.PlanTime).Round(time.Second), p.args.PlanTimeout)
			continue
		}
		if part.Err != nil {
			logger.V(2).Info("NodePartition status is not usable; planning around the node", "node", node.Name, "err", part.Err)
			continue
		}
		if !eligible(logger, pod, affinity, node) {
			left[node.Name] = true
			continue
		}
		cands = append(cands, &view{ni: ni, part: part, memo: m})
	}
	if limit := int(p.args.MaxNodesPerPlan); len(cands) > limit {
		offers := map[*mig.Model]bool{}
		key := d.String()
		for _, v := range cands {
			if m := v.memo; m.roomPart != v.part || m.roomDemand != key {
				m.roomPart, m.roomDemand, m.room = v.part, key, roomFor(v.part, d, offers)
			}
			v.room = v.memo.room
		}
		slices.SortFunc(cands, func(a, b *view) int {
			if a.room != b.room {
				if a.room.better(b.room) {
					return -1
				}
				return 1
			}
			return strings.Compare(a.ni.Node().Name, b.ni.Node().Name)
		})
		for _, v := range cands[limit:] {
			left[v.ni.Node().Name] = true
		}
		cands = cands[:limit]
	}
	views = make(map[string]*view, len(cands))
	for _, v := range cands {
		v.node = plannerNode(v.part)
		if m := v.memo; m.generation != v.ni.GetGeneration() || m.openPart != v.part {
			m.generation, m.openPart = v.ni.GetGeneration(), v.part
			m.open, m.bound = openMIG(v.ni, v.part), demand.Demand{}
			for _, pi := range v.ni.GetPods() {
				addDemand(m.bound, pi.GetPod())
			}
		}
		v.open = v.memo.open
		maps.Copy(v.node.Bound, v.memo.bound)
		views[v.node.Name] = v
	}
	p.memos.keepOpen(views)
	return views, left
}

// memo is what plans derive from a node and reuse while it does not
// change: whether the scheduler's node selector takes it (for this Node
// object), its room for a demand (for this NodePartition decoding), and,
// for this NodeInfo generation and decoding, openMIG's copy and the MIG
// demand of the pods on it. At thousands of nodes these were most of a
// plan's time, and between two plans few nodes change.
type memo struct {
	node     *v1.Node
	selected bool

	roomPart   *partition.Node
	roomDemand string // as demand.String prints it
	room       room

	generation int64
	openPart   *partition.Node
	open       fwk.NodeInfo
	bound      demand.Demand
}

// memos are the nodes' memos by name, used under DynamicMIG.mu.
type memos map[string]*memo

// of is the node's memo, created empty the first time.
func (ms *memos) of(name string) *memo {
	if *ms == nil {
		*ms = memos{}
	}
	m := (*ms)[name]
	if m == nil {
		m = &memo{}
		(*ms)[name] = m
	}
	return m
}

// prune forgets every memo when there are many more than the nodes
// (nodes were deleted): the next plan builds those of the nodes left.
func (ms *memos) prune(nodes int) {
	if len(*ms) > 2*nodes+100 {
		*ms = nil
	}
}

// keepOpen drops the open copies of the nodes that are not among views,
// so that at most a plan's nodes hold one.
func (ms memos) keepOpen(views map[string]*view) {
	for name, m := range ms {
		if m.open != nil && views[name] == nil {
			m.generation, m.openPart, m.open, m.bound = 0, nil, nil, nil
		}
	}
}

// eligible reports whether the pod's node selector, required node
// affinity and NoSchedule/NoExecute taints allow the node: cheap checks,
// so that candidate selection scales; the pod's other filters run on the
// nodes kept (plannerPod).
func eligible(logger klog.Logger, pod *v1.Pod, affinity nodeaffinity.RequiredNodeAffinity, node *v1.Node) bool {
	if ok, _ := affinity.Match(node); !ok {
		return false
	}
	_, untolerated := corev1helpers.FindMatchingUntoleratedTaint(logger, node.Spec.Taints, pod.Spec.Tolerations, func(t *v1.Taint) bool {
		return t.Effect == v1.TaintEffectNoSchedule || t.Effect == v1.TaintEffectNoExecute
	}, true)
	return !untolerated
}

// room is a cheap bound on what a node offers a pod: free slices of the
// profiles it asks for (served with no change) and compute slices no
// container holds on GPUs that offer one of them.
type room struct{ free, compute int }

// better orders nodes for a pod: one with free slices it asks for, then
// the most compute to repartition.
func (a room) better(b room) bool {
	if a.free != b.free {
		return a.free > b.free
	}
	return a.compute > b.compute
}

// roomFor is the node's room for the demand; offers caches, per model,
// whether it offers a profile of the demand.
func roomFor(part *partition.Node, d demand.Demand, offers map[*mig.Model]bool) room {
	var r room
	for i := range part.GPUs {
		g := &part.GPUs[i]
		if !g.Plannable() {
			continue
		}
		offered, known := offers[g.Model]
		if !known {
			for prof := range d {
				_, ok := g.Model.ProfileIndex(prof)
				offered = offered || ok
			}
			offers[g.Model] = offered
		}
		if !offered {
			continue
		}
		compute := g.Model.ComputeSlices
		for _, s := range g.Slices {
			if s.Used {
				compute -= s.Profile.Compute
			} else if _, asked := d[s.Profile]; asked {
				r.free++
			}
		}
		r.compute += compute
	}
	return r
}

// plannerNode is the node as the planner starts from it: each plannable
// GPU with the layout planning starts from (partition.GPU.Start), and no
// bound demand yet.
func plannerNode(part *partition.Node) planner.Node {
	// Busy only in agent mode: in restart mode a newer plan for a node
	// whose plan is in flight shares its device-plugin restart.
	n := planner.Node{Name: part.Object.Name, Bound: map[mig.ProfileName]int{}, Busy: part.InFlight && part.AgentAdvertises}
	for i := range part.GPUs {
		g := &part.GPUs[i]
		if !g.Plannable() {
			continue
		}
		pg := planner.GPU{Index: g.Index, Model: g.Model}
		for _, s := range g.Start(part.InFlight) {
			pg.Slices = append(pg.Slices, planner.Slice{Slice: s.Slice, Used: s.Used})
		}
		n.GPUs = append(n.GPUs, pg)
	}
	return n
}

// snapshot builds the planner's input: the views, with what bound and
// nominated pods request counted as Bound (invariant 2), and the pending
// MIG pods of this profile not nominated to a plannable node (views or
// left), each with the nodes its other filters accept.
func (p *DynamicMIG) snapshot(ctx context.Context, state fwk.CycleState, pod *v1.Pod, d demand.Demand, views map[string]*view, left map[string]bool) (*planner.Snapshot, error) {
	snap := &planner.Snapshot{}
	names := make([]string, 0, len(views))
	for name := range views {
		names = append(names, name)
	}
	sort.Strings(names)
	nominated := map[types.UID]bool{}
	for _, name := range names {
		v := views[name] // Bound holds what the pods on the node request
		for _, pi := range p.h.NominatedPodsForNode(name) {
			if pi.GetPod().UID != pod.UID {
				addDemand(v.node.Bound, pi.GetPod())
				nominated[pi.GetPod().UID] = true
			}
		}
		snap.Nodes = append(snap.Nodes, v.node)
	}
	for name := range left {
		for _, pi := range p.h.NominatedPodsForNode(name) {
			nominated[pi.GetPod().UID] = true
		}
	}

	state.Write(simulateKey, simulating{})
	defer state.Delete(simulateKey)
	snap.Pods = append(snap.Pods, p.plannerPod(ctx, state, pod, d, views, names))
	// Pending pods alike for the filters share their nodes: a burst of one
	// workload's pods runs them once.
	alike := map[string][]string{}
	for _, other := range p.otherPending(pod, views, left, nominated) {
		od, err := demand.Of(other)
		if err != nil || len(od) == 0 {
			continue
		}
		key, keyed := filterKey(other)
		if nodes, ok := alike[key]; keyed && ok {
			if nodes != nil {
				snap.Pods = append(snap.Pods, newPlannerPod(other, od, nodes))
			}
			continue
		}
		st := framework.NewCycleState()
		st.Write(simulateKey, simulating{})
		if _, status, _ := p.fw.RunPreFilterPlugins(ctx, st, other); !status.IsSuccess() {
			if keyed {
				alike[key] = nil
			}
			continue
		}
		pp := p.plannerPod(ctx, st, other, od, views, names)
		if keyed {
			alike[key] = pp.Nodes
		}
		snap.Pods = append(snap.Pods, pp)
	}
	if err := snap.Validate(); err != nil {
		return nil, fmt.Errorf("building the planner snapshot: %w", err)
	}
	return snap, nil
}

// addDemand adds a pod's MIG demand to a node's bound counts.
func addDemand(bound map[mig.ProfileName]int, pod *v1.Pod) {
	d, err := demand.Of(pod)
	if err != nil {
		return
	}
	for prof, n := range d {
		bound[prof] += n
	}
}

// podKey names a pod as the planner does: "namespace/name".
func podKey(pod *v1.Pod) string { return pod.Namespace + "/" + pod.Name }

// plannerPod is a pod as the planner sees it, with the nodes whose filters
// (other than MIG capacity) accept it.
func (p *DynamicMIG) plannerPod(ctx context.Context, state fwk.CycleState, pod *v1.Pod, d demand.Demand, views map[string]*view, names []string) planner.Pod {
	pp := newPlannerPod(pod, d, []string{})
	for _, name := range names {
		if p.h.RunFilterPluginsWithNominatedPods(ctx, state, pod, views[name].open).IsSuccess() {
			pp.Nodes = append(pp.Nodes, name)
		}
	}
	return pp
}

// newPlannerPod is the pod as the planner sees it, on these nodes.
func newPlannerPod(pod *v1.Pod, d demand.Demand, nodes []string) planner.Pod {
	return planner.Pod{Name: podKey(pod), Requests: d, Created: pod.CreationTimestamp.Time, Priority: priority(pod), Nodes: nodes}
}

// otherPending lists the other pending pods of this profile that ask for
// MIG slices and are not yet nominated to a plannable node — by the
// scheduler's nominator (counted as bound on that node if the plan
// considers it), or in their status: highest priority and oldest first,
// at most MaxPendingPodsPerPlan − 1.
func (p *DynamicMIG) otherPending(pod *v1.Pod, views map[string]*view, left map[string]bool, nominated map[types.UID]bool) []*v1.Pod {
	var out []*v1.Pod
	for _, o := range p.pending.asking(p.h.ProfileName(), mig.ProfileName{}) {
		if o.UID == pod.UID {
			continue
		}
		if _, inStatus := views[o.Status.NominatedNodeName]; inStatus || left[o.Status.NominatedNodeName] || nominated[o.UID] {
			continue // waits on its node
		}
		out = append(out, o)
	}
	sort.Slice(out, func(i, j int) bool {
		pi, pj := priority(out[i]), priority(out[j])
		if pi != pj {
			return pi > pj
		}
		if !out[i].CreationTimestamp.Equal(&out[j].CreationTimestamp) {
			return out[i].CreationTimestamp.Before(&out[j].CreationTimestamp)
		}
		return podKey(out[i]) < podKey(out[j])
	})
	if limit := int(p.args.MaxPendingPodsPerPlan) - 1; len(out) > limit {
		out = out[:limit]
	}
	return out
}

func priority(pod *v1.Pod) int32 {
	if pod.Spec.Priority != nil {
		return *pod.Spec.Priority
	}
	return 0
}

// withMIG returns a copy of the NodeInfo whose MIG allocatable is the
// planned layout's counts.
func withMIG(ni fwk.NodeInfo, counts map[mig.ProfileName]int) fwk.NodeInfo {
	node := ni.Node().DeepCopy()
	if node.Status.Allocatable == nil {
		node.Status.Allocatable = v1.ResourceList{}
	}
	for name := range node.Status.Allocatable {
		if mig.IsMIGResource(string(name)) {
			delete(node.Status.Allocatable, name)
		}
	}
	for prof, n := range counts {
		node.Status.Allocatable[v1.ResourceName(prof.ResourceName())] = *resource.NewQuantity(int64(n), resource.DecimalSI)
	}
	clone := ni.Snapshot()
	clone.SetNode(node)
	return clone
}

// openRoom is the MIG allocatable openMIG adds on top of what is requested.
const openRoom = 1 << 20

// openMIG returns a copy of the NodeInfo with room for any MIG request of
// a profile its GPUs offer, so that the other filters are asked alone
// (NodeResourcesFit checks the resources the configuration does not leave
// to DynamicMIG).
func openMIG(ni fwk.NodeInfo, part *partition.Node) fwk.NodeInfo {
	node := ni.Node().DeepCopy()
	if node.Status.Allocatable == nil {
		node.Status.Allocatable = v1.ResourceList{}
	}
	requested := ni.GetRequested().GetScalarResources()
	for i := range part.GPUs {
		if m := part.GPUs[i].Model; m != nil {
			for _, prof := range m.Profiles {
				r := v1.ResourceName(prof.Name.ResourceName())
				node.Status.Allocatable[r] = *resource.NewQuantity(requested[r]+openRoom, resource.DecimalSI)
			}
		}
	}
	clone := ni.Snapshot()
	clone.SetNode(node)
	return clone
}

// filterKey is what the scheduler's filters read of a pending pod — its
// namespace, labels and spec — with its MIG requests left out (openMIG
// makes room for any): pods with the same key pass the same nodes'
// filters. A pod with resource claims (allocated per pod) has none
// (keyed false).
func filterKey(pod *v1.Pod) (string, bool) {
	if len(pod.Spec.ResourceClaims) > 0 {
		return "", false
	}
	spec := pod.Spec.DeepCopy()
	for _, cs := range [][]v1.Container{spec.InitContainers, spec.Containers} {
		for i := range cs {
			for _, rl := range []v1.ResourceList{cs[i].Resources.Requests, cs[i].Resources.Limits} {
				for name := range rl {
					if mig.IsMIGResource(string(name)) {
						delete(rl, name)
					}
				}
			}
		}
	}
	b, err := json.Marshal(struct {
		Namespace string
		Labels    map[string]string
		Spec      *v1.PodSpec
	}{pod.Namespace, pod.Labels, spec})
	if err != nil {
		return "", false
	}
	return string(b), true
}
