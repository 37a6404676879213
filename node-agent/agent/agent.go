// Package agent is the node agent's reconcile loop: it watches its node's
// NodePartition, applies the spec's layout through the NVML boundary
// (destroying only slices it can prove free), makes the NVIDIA device
// plugin re-advertise, and reports what exists in the status.
package agent

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Kubelet is what the agent asks kubelet: the devices pods hold.
type Kubelet interface {
	Devices(ctx context.Context, prefix string) (podresources.Devices, error)
}

// Config is the agent's configuration.
type Config struct {
	// NodeName is this node, from the downward API.
	NodeName string
	// DevicePluginNamespace and DevicePluginSelector find the NVIDIA device
	// plugin pod on this node, deleted after every change so that it
	// re-advertises the slices.
	DevicePluginNamespace string
	DevicePluginSelector  string
	// DevicePluginTimeout bounds the wait for the new device-plugin pod and
	// for Node allocatable to show the slices.
	DevicePluginTimeout time.Duration
	// ResyncPeriod is how often the agent observes the GPUs without an
	// event, so that used/free in the status follows pods.
	ResyncPeriod time.Duration
}

// Agent reconciles one node.
type Agent struct {
	cfg        Config
	lib        gpu.Lib
	kube       kubernetes.Interface
	partitions dynamic.NamespaceableResourceInterface
	kubelet    Kubelet
	recorder   record.EventRecorder
	broadcast  record.EventBroadcaster

	queue     workqueue.TypedRateLimitingInterface[string]
	npStore   cache.Store
	nodeStore cache.Store
	factories []interface{ Start(<-chan struct{}) }
	synced    []cache.InformerSynced

	ready   atomic.Bool
	lastMsg map[string]string // condition type → last reason+message, for events on change only
}

const queueKey = "node"

// New wires an agent; Run starts it.
func New(cfg Config, lib gpu.Lib, kube kubernetes.Interface, dyn dynamic.Interface, kubelet Kubelet) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("node name is empty: set it from the downward API (spec.nodeName)")
	}
	registerMetrics()
	a := &Agent{
		cfg: cfg, lib: lib, kube: kube, partitions: dyn.Resource(v1alpha1.Resource), kubelet: kubelet,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 2*time.Minute),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "dynamig-agent"}),
		lastMsg: map[string]string{},
	}
	a.broadcast = record.NewBroadcaster()
	a.recorder = a.broadcast.NewRecorder(scheme.Scheme, v1.EventSource{Component: "dynamig-agent", Host: cfg.NodeName})

	byName := func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + cfg.NodeName }
	npFactory := dynamicinformer.NewFilteredDynamicSharedInformerFactory(dyn, 0, "", byName)
	npInformer := npFactory.ForResource(v1alpha1.Resource).Informer()
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithTweakListOptions(byName))
	nodeInformer := nodeFactory.Core().V1().Nodes().Informer()
	enqueue := func(any) { a.queue.Add(queueKey) }
	if _, err := npInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, DeleteFunc: enqueue,
		UpdateFunc: func(oldObj, newObj any) {
			o, n := oldObj.(*unstructured.Unstructured), newObj.(*unstructured.Unstructured)
			if o.GetGeneration() != n.GetGeneration() {
				a.queue.Add(queueKey) // spec changed; our own status writes do not requeue
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watching NodePartition %s: %w", cfg.NodeName, err)
	}
	if _, err := nodeInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: enqueue}); err != nil {
		return nil, fmt.Errorf("watching Node %s: %w", cfg.NodeName, err)
	}
	a.npStore, a.nodeStore = npInformer.GetStore(), nodeInformer.GetStore()
	a.factories = []interface{ Start(<-chan struct{}) }{npFactory, nodeFactory}
	a.synced = []cache.InformerSynced{npInformer.HasSynced, nodeInformer.HasSynced}
	return a, nil
}

// Ready reports whether the agent has synced its node once.
func (a *Agent) Ready() bool { return a.ready.Load() }

// Run reconciles until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	logger := klog.FromContext(ctx).WithValues("node", a.cfg.NodeName)
	ctx = klog.NewContext(ctx, logger)
	a.broadcast.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.kube.CoreV1().Events("")})
	defer a.broadcast.Shutdown()
	defer a.queue.ShutDown()
	for _, f := range a.factories {
		f.Start(ctx.Done())
	}
	if !cache.WaitForCacheSync(ctx.Done(), a.synced...) {
		return fmt.Errorf("node %s: informers did not sync: %w", a.cfg.NodeName, ctx.Err())
	}
	logger.Info("agent started", "devicePlugin", a.cfg.DevicePluginNamespace+"/"+a.cfg.DevicePluginSelector)
	a.queue.Add(queueKey)
	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	for {
		key, quit := a.queue.Get()
		if quit {
			return nil
		}
		err := a.sync(ctx)
		switch {
		case ctx.Err() != nil:
		case err != nil:
			logger.Error(err, "sync failed; retrying")
			a.queue.AddRateLimited(key)
		default:
			a.queue.Forget(key)
			a.queue.AddAfter(key, a.cfg.ResyncPeriod)
		}
		a.queue.Done(key)
	}
}

// outcome is what one sync did, for the status conditions.
type outcome struct {
	steps     []Step
	conflicts []Conflict
	err       error  // a failure to retry
	reason    string // the failure's condition reason
}

// sync observes the GPUs, applies the spec as far as it safely can, makes
// the device plugin re-advertise and writes the status.
func (a *Agent) sync(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	node, err := a.node()
	if err != nil {
		return err
	}
	np, err := a.partition(ctx, node)
	if err != nil {
		return err
	}
	start := time.Now()
	observed, kubeletErr, err := a.observe(ctx)
	if err != nil {
		nvmlErrors.WithLabelValues("observe", gpu.Code(err)).Inc()
		return a.fail(ctx, np, nil, ReasonNVMLError, fmt.Errorf("reading the GPUs: %w", err))
	}
	if kubeletErr != nil {
		logger.V(2).Info("kubelet PodResources API unavailable; no slice will be destroyed", "err", kubeletErr)
	}
	plan := np.Spec.PlanID
	spec, out := a.validSpec(np, observed)
	steps, conflicts := Diff(observed, spec, kubeletErr == nil)
	out.conflicts = append(out.conflicts, conflicts...)
	out.steps = a.apply(klog.NewContext(ctx, logger.WithValues("plan", plan)), steps, observed, &out)
	if len(out.steps) > 0 || out.err != nil {
		// Status must say exactly what exists, whatever happened.
		if observed, _, err = a.observe(ctx); err != nil {
			return a.fail(ctx, np, out.conflicts, ReasonNVMLError, fmt.Errorf("reading the GPUs: %w", err))
		}
	}
	recordSlices(observed)
	if out.err == nil && !advertised(node, observed) {
		if err := a.readvertise(ctx, observed); err != nil {
			out.err, out.reason = err, ReasonDevicePluginTimeout
		}
	}
	if len(out.steps) > 0 {
		result := "applied"
		if out.err != nil {
			result = "failed"
		}
		applyDuration.WithLabelValues(result).Observe(time.Since(start).Seconds())
	}
	st := a.status(node, observed)
	a.conditions(np, &st, out)
	if err := a.writeStatus(ctx, np, st); err != nil {
		return err
	}
	a.ready.Store(true)
	return out.err
}

func (a *Agent) node() (*v1.Node, error) {
	obj, ok, err := a.nodeStore.GetByKey(a.cfg.NodeName)
	if err != nil || !ok {
		return nil, fmt.Errorf("node %s not found (is NODE_NAME set from spec.nodeName?): %w", a.cfg.NodeName, err)
	}
	return obj.(*v1.Node), nil
}

// partition returns the node's NodePartition, creating it (owned by the
// Node, so it goes when the Node goes) if it does not exist.
func (a *Agent) partition(ctx context.Context, node *v1.Node) (*v1alpha1.NodePartition, error) {
	obj, ok, err := a.npStore.GetByKey(a.cfg.NodeName)
	if err != nil {
		return nil, err
	}
	if ok {
		return decode(obj.(*unstructured.Unstructured))
	}
	np := &v1alpha1.NodePartition{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "NodePartition"},
		ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
		}}},
	}
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(np)
	if err != nil {
		return nil, err
	}
	created, err := a.partitions.Create(ctx, &unstructured.Unstructured{Object: u}, metav1.CreateOptions{FieldManager: "dynamig-agent"})
	if apierrors.IsAlreadyExists(err) {
		created, err = a.partitions.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating NodePartition %s: %w", a.cfg.NodeName, err)
	}
	klog.FromContext(ctx).Info("created the node's NodePartition")
	return decode(created)
}

func decode(u *unstructured.Unstructured) (*v1alpha1.NodePartition, error) {
	np := &v1alpha1.NodePartition{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, np); err != nil {
		return nil, fmt.Errorf("decoding NodePartition %s: %w", u.GetName(), err)
	}
	return np, nil
}

// observe reads every MIG-capable GPU and its slices from NVML and who
// holds each slice from kubelet. A kubelet error is returned apart: the
// agent still reports and creates, but destroys nothing.
func (a *Agent) observe(ctx context.Context) ([]Observed, error, error) {
	gpus, err := a.lib.GPUs()
	if err != nil {
		return nil, nil, err
	}
	devices, kubeletErr := a.kubelet.Devices(ctx, mig.ResourcePrefix)
	out := make([]Observed, 0, len(gpus))
	for _, g := range gpus {
		o := Observed{GPU: g}
		if g.MIG.Current {
			ss, err := a.lib.Slices(g.Index)
			if err != nil {
				return nil, kubeletErr, err
			}
			for _, s := range ss {
				o.Slices = append(o.Slices, ObservedSlice{Slice: s, Holder: holder(devices, g.Index, s)})
			}
		}
		out = append(out, o)
	}
	return out, kubeletErr, nil
}

// holder is the pod kubelet says holds a slice, by the MIG UUID or the
// "<gpu>:<mig index>" ID of deviceIDStrategy=index.
func holder(d podresources.Devices, gpuIndex int, s gpu.Slice) string {
	if s.UUID == "" {
		return ""
	}
	if pod, ok := d.Used[s.UUID]; ok {
		return pod
	}
	return d.Used[fmt.Sprintf("%d:%d", gpuIndex, s.MIGIndex)]
}

// validSpec is the spec's layout per GPU, minus GPUs whose layout is not
// valid for what NVML offers there (reported as conflicts).
func (a *Agent) validSpec(np *v1alpha1.NodePartition, observed []Observed) (map[int][]mig.Slice, outcome) {
	spec := map[int][]mig.Slice{}
	var out outcome
	for _, g := range np.Spec.GPUs {
		layout := make([]mig.Slice, 0, len(g.Slices))
		var bad error
		for _, s := range g.Slices {
			p, err := mig.ParseProfile(s.Profile)
			if err != nil {
				bad = err
				break
			}
			layout = append(layout, mig.Slice{Profile: p, Start: int(s.Start)})
		}
		if bad == nil {
			bad = a.validate(int(g.Index), layout, observed)
		}
		if bad != nil {
			out.conflicts = append(out.conflicts, Conflict{GPU: int(g.Index), Reason: ReasonInvalidSpec,
				Message: fmt.Sprintf("gpu %d: the plan's layout is not valid here: %v", g.Index, bad)})
			continue
		}
		spec[int(g.Index)] = layout
	}
	return spec, out
}

// validate checks a layout against the profiles NVML offers on the GPU.
func (a *Agent) validate(index int, layout []mig.Slice, observed []Observed) error {
	for _, o := range observed {
		if o.GPU.Index != index || !o.GPU.MIG.Current {
			continue
		}
		ps, err := a.lib.Profiles(index)
		if err != nil {
			return err
		}
		m, err := mig.NewModel(o.GPU.Name, asMIGProfiles(ps))
		if err != nil {
			return err
		}
		return m.Validate(layout)
	}
	return nil // Diff reports a GPU that is missing or has MIG off
}

func asMIGProfiles(ps []gpu.Profile) []mig.Profile {
	out := make([]mig.Profile, len(ps))
	for i, p := range ps {
		out[i] = mig.Profile{Name: p.Name, ComputeSlices: p.ComputeSlices, MemorySlices: p.MemorySlices, MaxCount: p.MaxCount, Starts: p.Starts}
	}
	return out
}

// apply runs the steps in order and returns those that ran. Before each
// destroy it asks kubelet again whether the slice is free; NVML's IN_USE
// is the last guard. A slice found in use blocks the rest of its GPU's
// steps (a conflict); any other failure stops the run, to be retried.
func (a *Agent) apply(ctx context.Context, steps []Step, observed []Observed, out *outcome) []Step {
	logger := klog.FromContext(ctx)
	blocked := map[int]bool{}
	var done []Step
	for _, st := range steps {
		if blocked[st.GPU] {
			continue
		}
		log := logger.WithValues("gpu", st.GPU, "profile", st.Slice.Profile.String(), "start", st.Slice.Start)
		var err error
		switch st.Kind {
		case Destroy:
			if who, err := a.recheck(ctx, st, observed); err != nil || who != "" {
				msg := fmt.Sprintf("gpu %d: not changed: %s is used by pod %s", st.GPU, st.Slice, who)
				reason := ReasonSliceInUse
				if err != nil {
					msg, reason = fmt.Sprintf("gpu %d: not changed: %s may be in use: %v", st.GPU, st.Slice, err), ReasonKubeletUnreachable
				}
				out.conflicts = append(out.conflicts, Conflict{GPU: st.GPU, Reason: reason, Message: msg})
				blocked[st.GPU] = true
				continue
			}
			err = a.lib.Destroy(st.GPU, st.Slice.Profile, st.Slice.Start)
		case Create:
			_, err = a.lib.Create(st.GPU, st.Slice.Profile, st.Slice.Start)
		}
		if err != nil {
			nvmlErrors.WithLabelValues(string(st.Kind), gpu.Code(err)).Inc()
		}
		switch {
		case err == nil:
			log.V(2).Info("step done", "step", st.String())
			done = append(done, st)
		case errors.Is(err, gpu.ErrInUse):
			out.conflicts = append(out.conflicts, Conflict{GPU: st.GPU, Reason: ReasonSliceInUse,
				Message: fmt.Sprintf("gpu %d: not changed further: NVML says %s is in use (%v)", st.GPU, st.Slice, err)})
			blocked[st.GPU] = true
		default:
			out.err, out.reason = fmt.Errorf("%s: %w", st, err), ReasonNVMLError
			return done
		}
	}
	return done
}

// recheck asks kubelet, just before a destroy, who holds the slice.
func (a *Agent) recheck(ctx context.Context, st Step, observed []Observed) (string, error) {
	d, err := a.kubelet.Devices(ctx, mig.ResourcePrefix)
	if err != nil {
		return "", err
	}
	for _, o := range observed {
		if o.GPU.Index != st.GPU {
			continue
		}
		for _, s := range o.Slices {
			if s.Profile == st.Slice.Profile && s.Start == st.Slice.Start {
				return holder(d, st.GPU, s.Slice), nil
			}
		}
	}
	return "", nil
}

func recordSlices(observed []Observed) {
	slices.Reset()
	for _, o := range observed {
		for _, s := range o.Slices {
			state := "free"
			if s.Holder != "" {
				state = "used"
			}
			slices.WithLabelValues(s.Profile.String(), state).Inc()
		}
	}
}
