package local

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/client"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/generated/clientset/versioned"
	"github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
	dynamiglisters "github.com/dynamig/dynamig/pkg/generated/listers/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
)

// scaleModel plays, for thousands of nodes at once, what the node agent
// (agent mode) and kubelet write to the API server, so that the scheduler
// sees a large cluster as it would: the Node (labels, Ready, capacity and
// allocatable with a nvidia.com/mig-* count per profile) and the
// NodePartition status the agent writes (partition.EncodeGPU and
// ShareProfiles: the GPUs' profiles, once per model, and slices with MIG
// UUIDs, used and advertised; observedPlanID, the Applied condition). It
// is light: no NVML, no device plugin, no kubelet process; a spec is
// applied after Delay as a whole (every slice
// advertised at once, no mid-plan report), and a pod bound to a node gets
// free slices of its profiles as kubelet's device manager would hand them
// out (or fails admission, UnexpectedAdmissionError, recorded as a
// violation) and is marked Running at once. A spec that would destroy a
// used slice or is not a valid layout is refused with the agent's
// Failed condition and recorded as a violation.
type scaleModel struct {
	kube     kubernetes.Interface
	dynamig  versioned.Interface
	delay    time.Duration
	npLister dynamiglisters.NodePartitionLister
	pods     cache.Indexer
	queue    workqueue.TypedInterface[string]

	holders    int // pods holding the slices used at the start
	mu         sync.Mutex
	nodes      map[string]*modelNode
	violations []string
}

// modelNode is what the model knows of one node: its GPUs' slices, the
// generation it last applied and the slices each admitted pod holds.
type modelNode struct {
	model     *mig.Model
	gpus      [][]partition.Slice
	applied   int64
	uuids     int
	admitted  map[string][]string // pod key → MIG UUIDs
	allocated map[string]bool     // MIG UUIDs held
}

const nodeIndex = "node"

// newScaleModel creates the snapshot's nodes with their NodePartitions
// (workers at a time) and returns the model, not yet running.
func newScaleModel(ctx context.Context, kube kubernetes.Interface, dyn versioned.Interface, snap *planner.Snapshot, labels map[string]map[string]string, delay time.Duration, workers int) (*scaleModel, error) {
	m := &scaleModel{kube: kube, dynamig: dyn, delay: delay, nodes: map[string]*modelNode{},
		queue: workqueue.NewTypedWithConfig(workqueue.TypedQueueConfig[string]{Name: "scale-model"})}
	var holders []*v1.Pod
	for _, n := range snap.Nodes {
		mn := &modelNode{model: n.GPUs[0].Model, admitted: map[string][]string{}, allocated: map[string]bool{}}
		for _, g := range n.GPUs {
			var ss []partition.Slice
			for _, s := range g.Slices {
				id := mn.newUUID(n.Name)
				ss = append(ss, partition.Slice{Slice: s.Slice, UUID: id, Used: s.Used, Advertised: true})
				if s.Used {
					p := Pod(fmt.Sprintf("%s-%d", n.Name, len(holders)), map[string]int64{s.Profile.ResourceName(): 1})
					p.Namespace, p.Spec.NodeName = holderNamespace, n.Name
					holders = append(holders, p)
					mn.admitted[p.Namespace+"/"+p.Name], mn.allocated[id] = []string{id}, true
				}
			}
			mn.gpus = append(mn.gpus, ss)
		}
		m.nodes[n.Name] = mn
	}
	err := parallel(ctx, len(snap.Nodes), workers, func(ctx context.Context, i int) error {
		name := snap.Nodes[i].Name
		return m.createNode(ctx, name, labels[name])
	})
	if err != nil {
		return nil, err
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: holderNamespace}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	m.holders = len(holders)
	err = parallel(ctx, len(holders), workers, func(ctx context.Context, i int) error {
		_, err := kube.CoreV1().Pods(holderNamespace).Create(ctx, holders[i], metav1.CreateOptions{})
		return err
	})
	return m, err
}

// holderNamespace holds the pods that use the slices used at the start,
// bound to their nodes.
const holderNamespace = "holders"

// settled says whether every holder pod runs: the model has caught up
// with the cluster it was given.
func (m *scaleModel) settled() bool {
	running := 0
	for _, o := range m.pods.List() {
		if p := o.(*v1.Pod); p.Namespace == holderNamespace && p.Status.Phase == v1.PodRunning {
			running++
		}
	}
	return running == m.holders
}

func (mn *modelNode) newUUID(node string) string {
	mn.uuids++
	return fmt.Sprintf("MIG-%s-%d", node, mn.uuids)
}

// parallel runs f for 0..n-1 on workers goroutines; the first error stops it.
func parallel(ctx context.Context, n, workers int, f func(context.Context, int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range next {
				if err := f(ctx, i); err != nil {
					cancel(err)
				}
			}
		})
	}
	for i := 0; i < n && ctx.Err() == nil; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return context.Cause(ctx)
}

func (m *scaleModel) createNode(ctx context.Context, name string, extra map[string]string) error {
	labels := map[string]string{"dynamig.io/partitioning": "mig", "kubernetes.io/hostname": name}
	for k, v := range extra {
		labels[k] = v
	}
	m.mu.Lock()
	mn := m.nodes[name]
	capacity := mn.capacity()
	m.mu.Unlock()
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Status: v1.NodeStatus{Capacity: capacity, Allocatable: capacity, Conditions: []v1.NodeCondition{{
			Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
		}}},
	}
	created, err := m.kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating node %s: %w", name, err)
	}
	np := &v1alpha1.NodePartition{ObjectMeta: metav1.ObjectMeta{Name: name, OwnerReferences: []metav1.OwnerReference{{
		APIVersion: "v1", Kind: "Node", Name: name, UID: created.UID,
	}}}}
	parts := m.dynamig.DynamigV1alpha1().NodePartitions()
	if np, err = parts.Create(ctx, np, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating NodePartition %s: %w", name, err)
	}
	m.mu.Lock()
	np.Status = m.status(np, mn, nil)
	m.mu.Unlock()
	if _, err := parts.UpdateStatus(ctx, np, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("reporting NodePartition %s: %w", name, err)
	}
	return nil
}

// capacity is the Node's capacity as kubelet reports it with the
// device plugin's resources: a count per profile of the slices.
func (mn *modelNode) capacity() v1.ResourceList {
	rl := v1.ResourceList{
		v1.ResourceCPU: resource.MustParse("128"), v1.ResourceMemory: resource.MustParse("1Ti"), v1.ResourcePods: resource.MustParse("250"),
	}
	counts := map[string]int64{}
	for _, p := range mn.model.Profiles {
		counts[p.Name.ResourceName()] = 0
	}
	for _, g := range mn.gpus {
		for _, s := range g {
			counts[s.Profile.ResourceName()]++
		}
	}
	for r, n := range counts {
		rl[v1.ResourceName(r)] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	return rl
}

// status is the NodePartition status the agent would write for the node
// as the model has it, reporting err (a refused spec) if not nil.
func (m *scaleModel) status(np *v1alpha1.NodePartition, mn *modelNode, err error) v1alpha1.NodePartitionStatus {
	st := v1alpha1.NodePartitionStatus{ObservedPlanID: np.Spec.PlanID, ObservedGeneration: np.Generation, DevicePlugin: v1alpha1.DevicePluginAgent}
	for i, g := range mn.gpus {
		st.GPUs = append(st.GPUs, partition.EncodeGPU(i, fmt.Sprintf("GPU-%s-%d", np.Name, i), mn.model.Name, v1alpha1.MIGEnabled, mn.model.Profiles, g))
	}
	st.Models = partition.ShareProfiles(st.GPUs)
	applied := metav1.Condition{Type: v1alpha1.ConditionApplied, Status: metav1.ConditionTrue, Reason: "Applied", ObservedGeneration: np.Generation,
		LastTransitionTime: metav1.Now(), Message: "the spec's layout exists and the agent advertises it"}
	failed := metav1.Condition{Type: v1alpha1.ConditionFailed, Status: metav1.ConditionFalse, Reason: "Applied", ObservedGeneration: np.Generation, LastTransitionTime: metav1.Now()}
	if err != nil {
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, "SliceInUse", err.Error()
		failed.Status, failed.Reason, failed.Message = metav1.ConditionTrue, "SliceInUse", err.Error()
	}
	restarting := metav1.Condition{Type: v1alpha1.ConditionRestarting, Status: metav1.ConditionFalse, Reason: "NotRestarting", ObservedGeneration: np.Generation, LastTransitionTime: metav1.Now()}
	for _, c := range []metav1.Condition{applied, failed, restarting} {
		meta.SetStatusCondition(&st.Conditions, c)
	}
	return st
}

// start watches the NodePartitions and the bound pods; run applies them.
func (m *scaleModel) start(ctx context.Context) error {
	// Trimmed as the agent's informer is: its status writes carry no managedFields.
	npFactory := externalversions.NewSharedInformerFactoryWithOptions(m.dynamig, 0, externalversions.WithTransform(client.TrimManagedFields))
	npInformer := npFactory.Dynamig().V1alpha1().NodePartitions()
	podFactory := informers.NewSharedInformerFactoryWithOptions(m.kube, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermNotEqualSelector("spec.nodeName", "").String()
	}))
	podInformer := podFactory.Core().V1().Pods().Informer()
	if err := podInformer.AddIndexers(cache.Indexers{nodeIndex: func(obj any) ([]string, error) {
		return []string{obj.(*v1.Pod).Spec.NodeName}, nil
	}}); err != nil {
		return err
	}
	enqueueNP := func(obj any) {
		if np, ok := obj.(*v1alpha1.NodePartition); ok {
			m.queue.Add(np.Name)
		}
	}
	enqueuePod := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		if p, ok := obj.(*v1.Pod); ok {
			m.queue.Add(p.Spec.NodeName)
		}
	}
	if _, err := npInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: enqueueNP, UpdateFunc: func(_, n any) { enqueueNP(n) }}); err != nil {
		return err
	}
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: enqueuePod, UpdateFunc: func(_, n any) { enqueuePod(n) }, DeleteFunc: enqueuePod}); err != nil {
		return err
	}
	m.npLister, m.pods = npInformer.Lister(), podInformer.GetIndexer()
	npFactory.Start(ctx.Done())
	podFactory.Start(ctx.Done())
	npFactory.WaitForCacheSync(ctx.Done())
	podFactory.WaitForCacheSync(ctx.Done())
	return nil
}

// run applies what start watches until ctx ends.
func (m *scaleModel) run(ctx context.Context, workers int) {
	go func() {
		<-ctx.Done()
		m.queue.ShutDown()
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				name, quit := m.queue.Get()
				if quit {
					return
				}
				if err := m.sync(ctx, name); err != nil && ctx.Err() == nil {
					m.queue.Add(name) // a write conflict: again
				}
				m.queue.Done(name)
			}
		})
	}
	wg.Wait()
}

// sync applies a node's new spec, admits the pods bound to it and frees
// the slices of pods gone, then writes what changed.
func (m *scaleModel) sync(ctx context.Context, name string) error {
	np, err := m.npLister.Get(name)
	if err != nil {
		return nil
	}
	m.mu.Lock()
	mn, ok := m.nodes[name]
	m.mu.Unlock()
	if !ok {
		return nil
	}
	if np.Generation != mn.applied && np.Spec.PlanID != "" && m.delay > 0 {
		time.Sleep(m.delay)
	}
	objs, err := m.pods.ByIndex(nodeIndex, name)
	if err != nil {
		return err
	}
	m.mu.Lock()
	applied, refused := false, error(nil)
	if np.Generation != mn.applied && np.Spec.PlanID != "" {
		refused = m.apply(np, mn)
		applied = true
	}
	var running []*v1.Pod
	present := map[string]bool{}
	for _, o := range objs {
		p := o.(*v1.Pod)
		key := p.Namespace + "/" + p.Name
		present[key] = true
		if p.Status.Phase != v1.PodPending || !demand.AsksForMIG(p) {
			continue
		}
		if _, ok := mn.admitted[key]; ok {
			running = append(running, p) // a holder of a slice used at the start
			continue
		}
		if why := mn.admit(key, p); why != "" {
			m.violations = append(m.violations, fmt.Sprintf("pod %s on %s failed admission: %s", key, name, why))
			continue
		}
		running = append(running, p)
	}
	freed := false
	for key, ids := range mn.admitted {
		if !present[key] {
			mn.free(ids)
			delete(mn.admitted, key)
			freed = true
		}
	}
	var st *v1alpha1.NodePartitionStatus
	if applied || freed || len(running) > 0 {
		s := m.status(np, mn, refused)
		st = &s
	}
	capacity := mn.capacity()
	m.mu.Unlock()
	for _, p := range running {
		p = p.DeepCopy()
		p.Status.Phase = v1.PodRunning
		p.Status.Conditions = append(p.Status.Conditions, v1.PodCondition{Type: v1.PodReady, Status: v1.ConditionTrue, LastTransitionTime: metav1.Now()})
		if _, err := m.kube.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	if st == nil {
		return nil
	}
	if applied {
		node, err := m.kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		node.Status.Capacity, node.Status.Allocatable = capacity, capacity
		if _, err := m.kube.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	np = np.DeepCopy()
	np.Status = *st
	if _, err := m.dynamig.DynamigV1alpha1().NodePartitions().UpdateStatus(ctx, np, metav1.UpdateOptions{}); err != nil {
		return err
	}
	m.mu.Lock()
	mn.applied = np.Generation
	m.mu.Unlock()
	return nil
}

// apply makes the spec's layouts the node's, keeping the slices (and
// their UUIDs) it keeps; it refuses, changing nothing, a spec that is not
// a valid layout or destroys a used slice, as the agent does.
func (m *scaleModel) apply(np *v1alpha1.NodePartition, mn *modelNode) error {
	layouts, errs := partition.DesiredLayouts(np)
	next := slices.Clone(mn.gpus)
	for i, layout := range layouts {
		if err := errs[i]; err != nil {
			return m.refuse(np, fmt.Errorf("gpu %d: %w", i, err))
		}
		if i < 0 || i >= len(mn.gpus) {
			return m.refuse(np, fmt.Errorf("no gpu %d", i))
		}
		if err := mn.model.Validate(layout); err != nil {
			return m.refuse(np, fmt.Errorf("gpu %d: %w", i, err))
		}
		var g []partition.Slice
		for _, want := range layout {
			s := partition.Slice{Slice: want, UUID: mn.newUUID(np.Name), Advertised: true}
			for _, have := range mn.gpus[i] {
				if have.Slice == want {
					s = have
				}
			}
			g = append(g, s)
		}
		for _, have := range mn.gpus[i] {
			if (have.Used || mn.allocated[have.UUID]) && !slices.ContainsFunc(layout, func(s mig.Slice) bool { return s == have.Slice }) {
				return m.refuse(np, fmt.Errorf("gpu %d: %s is used", i, have.Slice))
			}
		}
		next[i] = g
	}
	mn.gpus = next
	return nil
}

func (m *scaleModel) refuse(np *v1alpha1.NodePartition, err error) error {
	m.violations = append(m.violations, fmt.Sprintf("plan %s on %s refused: %v", np.Spec.PlanID, np.Name, err))
	return err
}

// admit gives the pod free slices of the profiles it asks for, as
// kubelet's device manager would, or says why it cannot.
func (mn *modelNode) admit(key string, p *v1.Pod) string {
	want, err := demand.Of(p)
	if err != nil {
		return err.Error()
	}
	var got []string
	for prof, n := range want {
		for gi := range mn.gpus {
			for si := range mn.gpus[gi] {
				s := &mn.gpus[gi][si]
				if n > 0 && s.Profile == prof && !s.Used && !mn.allocated[s.UUID] {
					got = append(got, s.UUID)
					mn.allocated[s.UUID] = true
					n--
				}
			}
		}
		if n > 0 {
			for _, id := range got {
				delete(mn.allocated, id)
			}
			return fmt.Sprintf("UnexpectedAdmissionError: Requested %s: %d more than free", prof.ResourceName(), n)
		}
	}
	for gi := range mn.gpus {
		for si := range mn.gpus[gi] {
			if s := &mn.gpus[gi][si]; slices.Contains(got, s.UUID) {
				s.Used = true
			}
		}
	}
	mn.admitted[key] = got
	return ""
}

// free returns the slices of a pod gone.
func (mn *modelNode) free(ids []string) {
	for gi := range mn.gpus {
		for si := range mn.gpus[gi] {
			if s := &mn.gpus[gi][si]; slices.Contains(ids, s.UUID) {
				s.Used = false
				delete(mn.allocated, s.UUID)
			}
		}
	}
}

// Violations lists what the model saw go wrong: a pod that failed
// admission, a plan it refused.
func (m *scaleModel) Violations() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.violations)
}
