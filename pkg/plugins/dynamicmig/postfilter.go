package dynamicmig

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

// simulating marks a cycle state used to ask the other filters whether a
// pod could run on a node if the node had the MIG slices it needs; the
// plugin's own Filter passes in it.
type simulating struct{}

func (s simulating) Clone() fwk.StateData { return s }

// view is one planned-for node: its scheduler NodeInfo, NodePartition and
// the layout the planner starts from.
type view struct {
	ni   fwk.NodeInfo
	np   *v1alpha1.NodePartition
	node planner.Node
}

// PostFilter plans for all pending MIG pods of this profile at once and
// publishes the layouts that change. The pod is nominated to its planned
// node and stays Unschedulable until the slices appear on that node.
func (p *DynamicMIG) PostFilter(ctx context.Context, state fwk.CycleState, pod *v1.Pod, m fwk.NodeToStatusReader) (*fwk.PostFilterResult, *fwk.Status) {
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
	views := p.views(logger, pod, m)
	snap, err := p.snapshot(ctx, state, pod, s.demand, views)
	if err != nil {
		return nil, fwk.AsStatus(err)
	}
	plan := planner.Dynamig{}.Plan(snap)
	a := plan.Pods[0] // the pod being scheduled is the snapshot's first
	if !a.Served() {
		plansTotal.WithLabelValues(resultNoRoom).Inc()
		logger.V(2).Info("no MIG layout serves the pod now", "pod", klog.KObj(pod), "demand", s.demand.String(), "reason", a.Reason)
		return nil, fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("no MIG layout can serve %s now: %s", s.demand, a.Reason))
	}
	planID := p.newPlanID()
	logger = klog.LoggerWithValues(logger, "plan", planID)
	created, err := p.publish(klog.NewContext(ctx, logger), planID, plan, views)
	if apierrors.IsConflict(err) {
		plansTotal.WithLabelValues(resultConflict).Inc()
		logger.V(2).Info("NodePartition changed while planning; the pod will be planned again", "pod", klog.KObj(pod), "err", err)
		// No cluster event may follow (an agent's status write is enough to
		// conflict): retry at once instead of waiting in the unschedulable pool.
		p.h.Activate(logger, map[string]*v1.Pod{pod.Namespace + "/" + pod.Name: pod})
		return nil, fwk.NewStatus(fwk.Unschedulable, "a NodePartition changed while planning; planning again")
	}
	if err != nil {
		return nil, fwk.AsStatus(err)
	}
	podsWaiting.Set(float64(waiting(plan, views, created)))
	node := views[a.Node]
	if st := p.fitsPlanned(ctx, state, pod, node.ni, plan, a.Node); !st.IsSuccess() {
		plansTotal.WithLabelValues(resultFilterFail).Inc()
		logger.V(2).Info("planned node fails the pod's filters", "pod", klog.KObj(pod), "node", a.Node, "status", st.Message())
		return nil, fwk.NewStatus(fwk.Unschedulable, fmt.Sprintf("planned %s on %s, but the node fails the pod's filters: %s", s.demand, a.Node, st.Message()))
	}
	plansTotal.WithLabelValues(resultPlanned).Inc()
	var msg string
	if c, ok := created[a.Node]; ok {
		msg = fmt.Sprintf("plan %s creates %s", planID, describe(c, a.Node))
		p.h.EventRecorder().Eventf(pod, node.ni.Node(), v1.EventTypeNormal, ReasonPlanned, "Scheduling", "%s; the pod waits for %s", msg, s.demand)
	} else {
		msg = fmt.Sprintf("waiting for %s on %s", s.demand, a.Node)
		if inFlight(node.np) {
			msg += fmt.Sprintf(" (plan %s not applied yet)", node.np.Spec.PlanID)
		}
		p.h.EventRecorder().Eventf(pod, node.ni.Node(), v1.EventTypeNormal, ReasonWaiting, "Scheduling", "%s", msg)
	}
	logger.V(2).Info("pod nominated for a MIG layout", "pod", klog.KObj(pod), "node", a.Node, "slices", a.Slices)
	return framework.NewPostFilterResultWithNominatedNode(a.Node), fwk.NewStatus(fwk.Unschedulable, msg)
}

// views lists the nodes the plan may change: selected by the node
// selector, with a NodePartition whose status reports GPUs, not stale, not
// ruled out for the pod by a filter no layout can change; at most
// MaxNodesPerPlan, in name order.
func (p *DynamicMIG) views(logger klog.Logger, pod *v1.Pod, m fwk.NodeToStatusReader) map[string]*view {
	infos, err := p.h.SnapshotSharedLister().NodeInfos().List()
	if err != nil {
		logger.Error(err, "listing nodes")
		return nil
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].Node().Name < infos[j].Node().Name })
	out := map[string]*view{}
	for _, ni := range infos {
		node := ni.Node()
		if !p.selector.Matches(labels.Set(node.Labels)) {
			continue
		}
		np, err := p.partitions.get(node.Name)
		if err != nil || np == nil || len(np.Status.GPUs) == 0 {
			continue // the agent has not reported this node yet
		}
		if inFlight(np) {
			if t := planTime(np); !t.IsZero() && p.now().Sub(t) > p.args.PlanTimeout {
				logger.V(2).Info("plan not applied in time; planning around the node", "node", node.Name, "plan", np.Spec.PlanID, "published", t)
				p.h.EventRecorder().Eventf(node, nil, v1.EventTypeWarning, ReasonPlanNotApplied, "Scheduling",
					"plan %s published %s ago is not applied (planTimeout %s); dynamig plans around this node until its agent reports it", np.Spec.PlanID, p.now().Sub(t).Round(time.Second), p.args.PlanTimeout)
				continue
			}
		}
		pn, err := plannerNode(node.Name, np)
		if err != nil {
			logger.V(2).Info("NodePartition status is not usable; planning around the node", "node", node.Name, "err", err)
			continue
		}
		out[node.Name] = &view{ni: ni, np: np, node: pn}
		if len(out) == int(p.args.MaxNodesPerPlan) {
			break
		}
	}
	return out
}

// plannerNode is the layout the planner starts from: the spec's layout of
// a GPU whose plan is in flight (the agent is creating it), else what the
// status reports. A slice is used if the status says so.
func plannerNode(name string, np *v1alpha1.NodePartition) (planner.Node, error) {
	n := planner.Node{Name: name, Bound: map[mig.ProfileName]int{}}
	spec := map[int32][]v1alpha1.Slice{}
	if inFlight(np) {
		for _, g := range np.Spec.GPUs {
			spec[g.Index] = g.Slices
		}
	}
	for _, g := range np.Status.GPUs {
		if g.MIGMode != v1alpha1.MIGEnabled {
			continue
		}
		m, err := gpuModel(g)
		if err != nil {
			return n, fmt.Errorf("gpu %d: %w", g.Index, err)
		}
		if m == nil {
			continue // no discovered profiles and a model the catalog does not know: not planned
		}
		used := map[v1alpha1.Slice]bool{}
		layout := make([]v1alpha1.Slice, 0, len(g.Slices))
		for _, s := range g.Slices {
			used[s.Slice] = s.Used
			layout = append(layout, s.Slice)
		}
		if want, ok := spec[g.Index]; ok {
			layout = want
		}
		pg := planner.GPU{Index: int(g.Index), Model: m}
		for _, s := range layout {
			prof, err := mig.ParseProfile(s.Profile)
			if err != nil {
				return n, fmt.Errorf("gpu %d: %w", g.Index, err)
			}
			pg.Slices = append(pg.Slices, planner.Slice{Profile: prof, Start: int(s.Start), Used: used[s]})
		}
		if err := m.Validate(toMIG(pg.Slices)); err != nil {
			return n, fmt.Errorf("gpu %d: %w", g.Index, err)
		}
		n.GPUs = append(n.GPUs, pg)
	}
	if len(n.GPUs) == 0 {
		return n, fmt.Errorf("no GPU with MIG enabled and a known model")
	}
	return n, nil
}

// discovered caches the models built from NVML-discovered profiles, by
// their description, so that every plan of the same GPU kind shares one
// model (and the planner's per-model tables).
var discovered sync.Map // string → *mig.Model

// gpuModel is the GPU's model: built from the profiles and placements the
// agent discovered through NVML where the status has them (they reflect the
// real driver), else the catalog's by name; nil if neither is known.
func gpuModel(g v1alpha1.GPUStatus) (*mig.Model, error) {
	if len(g.Profiles) == 0 {
		if m, err := mig.ModelByName(g.Model); err == nil {
			return m, nil
		}
		m, _ := mig.ModelByNVMLName(g.Model)
		return m, nil
	}
	key := fmt.Sprintf("%s%v", g.Model, g.Profiles)
	if m, ok := discovered.Load(key); ok {
		return m.(*mig.Model), nil
	}
	profiles := make([]mig.Profile, len(g.Profiles))
	for i, p := range g.Profiles {
		name, err := mig.ParseProfile(p.Name)
		if err != nil {
			return nil, err
		}
		starts := make([]int, len(p.Starts))
		for j, st := range p.Starts {
			starts[j] = int(st)
		}
		profiles[i] = mig.Profile{Name: name, ComputeSlices: name.Compute, MemorySlices: int(p.MemorySlices), MaxCount: int(p.MaxCount), Starts: starts}
	}
	m, err := mig.NewModel(g.Model, profiles)
	if err != nil {
		return nil, fmt.Errorf("discovered profiles: %w", err)
	}
	actual, _ := discovered.LoadOrStore(key, m)
	return actual.(*mig.Model), nil
}

func toMIG(slices []planner.Slice) []mig.Slice {
	out := make([]mig.Slice, len(slices))
	for i, s := range slices {
		out[i] = mig.Slice{Profile: s.Profile, Start: s.Start}
	}
	return out
}

// snapshot builds the planner's input: the views, with what bound and
// nominated pods request counted as Bound (invariant 2), and the pending
// MIG pods of this profile, the pod being scheduled first, each with the
// nodes its other filters accept.
func (p *DynamicMIG) snapshot(ctx context.Context, state fwk.CycleState, pod *v1.Pod, demand Demand, views map[string]*view) (*planner.Snapshot, error) {
	snap := &planner.Snapshot{}
	names := make([]string, 0, len(views))
	for name := range views {
		names = append(names, name)
	}
	sort.Strings(names)
	nominated := map[types.UID]bool{}
	for _, name := range names {
		v := views[name]
		for _, pi := range v.ni.GetPods() {
			addDemand(v.node.Bound, pi.GetPod())
		}
		for _, pi := range p.h.NominatedPodsForNode(name) {
			if pi.GetPod().UID != pod.UID {
				addDemand(v.node.Bound, pi.GetPod())
				nominated[pi.GetPod().UID] = true
			}
		}
		snap.Nodes = append(snap.Nodes, v.node)
	}

	state.Write(simulateKey, simulating{})
	defer state.Delete(simulateKey)
	snap.Pods = append(snap.Pods, p.pending(ctx, state, pod, demand, views, names))
	for _, other := range p.otherPending(pod, views, nominated) {
		d, err := podDemand(other)
		if err != nil || len(d) == 0 {
			continue
		}
		st := framework.NewCycleState()
		st.Write(simulateKey, simulating{})
		if _, status, _ := p.fw.RunPreFilterPlugins(ctx, st, other); !status.IsSuccess() {
			continue
		}
		snap.Pods = append(snap.Pods, p.pending(ctx, st, other, d, views, names))
	}
	if err := snap.Validate(); err != nil {
		return nil, fmt.Errorf("building the planner snapshot: %w", err)
	}
	return snap, nil
}

// addDemand adds a pod's MIG demand to a node's bound counts.
func addDemand(bound map[mig.ProfileName]int, pod *v1.Pod) {
	d, err := podDemand(pod)
	if err != nil {
		return
	}
	for prof, n := range d {
		bound[prof] += n
	}
}

// pending is a pod as the planner sees it, with the nodes whose filters
// (other than MIG capacity) accept it.
func (p *DynamicMIG) pending(ctx context.Context, state fwk.CycleState, pod *v1.Pod, d Demand, views map[string]*view, names []string) planner.Pod {
	pp := planner.Pod{Name: pod.Namespace + "/" + pod.Name, Requests: d, Created: pod.CreationTimestamp.Time, Nodes: []string{}}
	if pod.Spec.Priority != nil {
		pp.Priority = *pod.Spec.Priority
	}
	for _, name := range names {
		if p.h.RunFilterPluginsWithNominatedPods(ctx, state, pod, withMIG(views[name].ni, d, nil)).IsSuccess() {
			pp.Nodes = append(pp.Nodes, name)
		}
	}
	return pp
}

// otherPending lists the other pending pods of this profile that ask for
// MIG slices and are not yet nominated to a planned node — by the
// scheduler's nominator (already counted as bound on that node), or in
// their status: highest priority and oldest first, at most
// MaxPendingPodsPerPlan − 1.
func (p *DynamicMIG) otherPending(pod *v1.Pod, views map[string]*view, nominated map[types.UID]bool) []*v1.Pod {
	all, err := p.h.SharedInformerFactory().Core().V1().Pods().Lister().List(labels.Everything())
	if err != nil {
		return nil
	}
	var out []*v1.Pod
	for _, o := range all {
		if o.UID == pod.UID || o.Spec.NodeName != "" || o.DeletionTimestamp != nil || o.Spec.SchedulerName != p.h.ProfileName() {
			continue
		}
		if _, inStatus := views[o.Status.NominatedNodeName]; inStatus || nominated[o.UID] {
			continue // counted as bound on its node
		}
		if d, err := podDemand(o); err == nil && len(d) > 0 {
			out = append(out, o)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		pi, pj := priority(out[i]), priority(out[j])
		if pi != pj {
			return pi > pj
		}
		if !out[i].CreationTimestamp.Equal(&out[j].CreationTimestamp) {
			return out[i].CreationTimestamp.Before(&out[j].CreationTimestamp)
		}
		return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name
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
// planned layout's counts, or, with counts nil, enough for the demand on
// top of what is requested (to ask the other filters alone).
func withMIG(ni fwk.NodeInfo, d Demand, counts map[mig.ProfileName]int) fwk.NodeInfo {
	node := ni.Node().DeepCopy()
	if node.Status.Allocatable == nil {
		node.Status.Allocatable = v1.ResourceList{}
	}
	requested := ni.GetRequested().GetScalarResources()
	if counts == nil {
		for prof, n := range d {
			r := v1.ResourceName(prof.ResourceName())
			node.Status.Allocatable[r] = *resource.NewQuantity(requested[r]+int64(n)+1024, resource.DecimalSI)
		}
	} else {
		for name := range node.Status.Allocatable {
			if mig.IsMIGResource(string(name)) {
				delete(node.Status.Allocatable, name)
			}
		}
		for prof, n := range counts {
			node.Status.Allocatable[v1.ResourceName(prof.ResourceName())] = *resource.NewQuantity(int64(n), resource.DecimalSI)
		}
	}
	clone := ni.Snapshot()
	clone.SetNode(node)
	return clone
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
	return p.h.RunFilterPluginsWithNominatedPods(ctx, state, pod, withMIG(ni, nil, counts))
}

// publish writes the plan's layout to every NodePartition whose layout
// changes, under one plan ID, and returns the slices created per node and
// GPU. The first conflict stops it; what was published stays valid on its
// own (each node's layout is complete).
func (p *DynamicMIG) publish(ctx context.Context, planID string, plan *planner.Plan, views map[string]*view) (map[string]map[int]Demand, error) {
	logger := klog.FromContext(ctx)
	created := map[string]map[int]Demand{}
	for _, n := range plan.Nodes {
		v := views[n.Name]
		before := map[int]map[mig.Slice]bool{}
		for _, g := range v.node.GPUs {
			before[g.Index] = map[mig.Slice]bool{}
			for _, s := range g.Slices {
				before[g.Index][mig.Slice{Profile: s.Profile, Start: s.Start}] = true
			}
		}
		changed := false
		var gpus []v1alpha1.GPULayout
		for _, g := range n.GPUs {
			gl := v1alpha1.GPULayout{Index: int32(g.Index), Slices: []v1alpha1.Slice{}}
			for _, s := range g.Slices {
				gl.Slices = append(gl.Slices, v1alpha1.Slice{Profile: s.Profile.String(), Start: int32(s.Start)})
				if !before[g.Index][mig.Slice{Profile: s.Profile, Start: s.Start}] {
					if created[n.Name] == nil {
						created[n.Name] = map[int]Demand{}
					}
					if created[n.Name][g.Index] == nil {
						created[n.Name][g.Index] = Demand{}
					}
					created[n.Name][g.Index][s.Profile]++
					changed = true
				}
			}
			changed = changed || len(g.Slices) != len(before[g.Index])
			gpus = append(gpus, gl)
		}
		if !changed {
			continue
		}
		np := v.np.DeepCopy()
		np.Spec.PlanID = planID
		np.Spec.GPUs = gpus
		if np.Annotations == nil {
			np.Annotations = map[string]string{}
		}
		np.Annotations[PlanTimeAnnotation] = p.now().UTC().Format(time.RFC3339Nano)
		if err := p.partitions.updateSpec(ctx, np); err != nil {
			return created, err
		}
		logger.V(2).Info("published MIG layout", "node", n.Name, "created", describe(created[n.Name], n.Name))
	}
	return created, nil
}

// waiting counts the pods the plan serves on nodes whose layout is still
// to be applied: pods waiting for a repartition.
func waiting(plan *planner.Plan, views map[string]*view, created map[string]map[int]Demand) int {
	n := 0
	for _, a := range plan.Pods {
		if !a.Served() {
			continue
		}
		if _, ok := created[a.Node]; ok || inFlight(views[a.Node].np) {
			n++
		}
	}
	return n
}

func (p *DynamicMIG) newPlanID() string {
	p.planNo++
	return "p-" + strconv.FormatInt(p.now().Unix(), 36) + "-" + strconv.FormatUint(p.planNo, 36)
}
