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
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	dynamigclient "github.com/dynamig/dynamig/pkg/client"
	"github.com/dynamig/dynamig/pkg/generated/clientset/versioned"
	dynamigv1alpha1 "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/typed/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
	dynamiglisters "github.com/dynamig/dynamig/pkg/generated/listers/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/guard"
)

// Kubelet is what the agent asks kubelet (podresources.Client).
type Kubelet interface {
	// Devices says which pods kubelet knows and the devices they hold;
	// pods, when not nil, are the only pods asked about.
	Devices(ctx context.Context, prefix string, pods []string) (podresources.Devices, error)
	// Allocatable lists the devices kubelet can hand out.
	Allocatable(ctx context.Context, prefix string) (map[string][]string, error)
	// Restarts says whether the connection to kubelet was lost and when it
	// was last made again; RestartsChanged is signalled when that changes.
	Restarts() podresources.Restarts
	RestartsChanged() <-chan struct{}
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
	// for kubelet to be able to allocate the slices.
	DevicePluginTimeout time.Duration
	// ResyncPeriod is how often the agent observes the GPUs without an
	// event, so that used/free in the status follows pods.
	ResyncPeriod time.Duration
	// Plugin, if set, is the agent's own device plugin (agent mode): the
	// agent advertises the slices through it, withdraws each before
	// destroying it, and never restarts NVIDIA's plugin
	// (DevicePluginNamespace and DevicePluginSelector are unused). Run runs it.
	Plugin Plugin
	// CDI, in agent mode, keeps a CDI spec for each advertised device
	// (cdi.Specs): written before the device is advertised, removed once it
	// is gone.
	CDI CDISpecs
}

// CDISpecs keeps the CDI specs of the devices the agent advertises.
type CDISpecs interface {
	Sync(ids []string) error
}

// Agent reconciles one node.
type Agent struct {
	cfg        Config
	lib        gpu.Lib
	kube       kubernetes.Interface
	partitions dynamigv1alpha1.NodePartitionInterface
	kubelet    Kubelet
	recorder   record.EventRecorder
	broadcast  record.EventBroadcaster

	queue      workqueue.TypedRateLimitingInterface[string]
	npLister   dynamiglisters.NodePartitionLister
	nodeLister corelisters.NodeLister
	podLister  corelisters.PodLister // the pods bound to this node
	factories  []interface{ Start(<-chan struct{}) }
	synced     []cache.InformerSynced

	ready atomic.Bool
	// replaced holds the device-plugin pods the agent deleted so that the
	// plugin re-scans the layout that exists; nil once the agent changes
	// the layout again (or before it deleted any). A plugin pod not in it
	// started after those deletions and is waited for, not deleted.
	replaced map[types.UID]bool
	// withdrawn holds, while a plan is applied in agent mode, the MIG
	// UUIDs of the slices it destroys: the agent's plugin does not
	// advertise them.
	withdrawn map[string]bool
	// written is the NodePartition as the agent last wrote it, ahead of
	// its informer until the watch delivers it (latest).
	written *v1alpha1.NodePartition
	lastMsg map[string]string // event key → last reason+message, for events on change only
	// coalescing is when the agent first made way for a newer spec
	// without reporting since (errSuperseded); zero otherwise.
	coalescing time.Time
}

const queueKey = "node"

// NewForConfig wires an agent with clients of the API server at restCfg.
func NewForConfig(restCfg *rest.Config, cfg Config, lib gpu.Lib, kubelet Kubelet) (*Agent, error) {
	kube, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("creating the API client: %w", err)
	}
	client, err := dynamigclient.New(restCfg)
	if err != nil {
		return nil, err
	}
	return New(cfg, lib, kube, client, kubelet)
}

// New wires an agent; Run starts it. It watches only its own Node, the
// NodePartition of the same name and the pods bound to the node.
func New(cfg Config, lib gpu.Lib, kube kubernetes.Interface, client versioned.Interface, kubelet Kubelet) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("node name is empty: set it from the downward API (spec.nodeName)")
	}
	registerMetrics()
	a := &Agent{
		cfg: cfg, lib: lib, kube: kube, partitions: client.DynamigV1alpha1().NodePartitions(), kubelet: kubelet,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 2*time.Minute),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "dynamig-agent"}),
		lastMsg: map[string]string{},
	}
	a.broadcast = record.NewBroadcaster()
	a.recorder = a.broadcast.NewRecorder(scheme.Scheme, v1.EventSource{Component: "dynamig-agent", Host: cfg.NodeName})

	byName := func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + cfg.NodeName }
	npFactory := externalversions.NewSharedInformerFactoryWithOptions(client, 0, externalversions.WithTweakListOptions(byName), externalversions.WithTransform(dynamigclient.TrimManagedFields))
	npInformer := npFactory.Dynamig().V1alpha1().NodePartitions()
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithTweakListOptions(byName))
	nodeInformer := nodeFactory.Core().V1().Nodes()
	enqueue := func(any) { a.queue.Add(queueKey) }
	if _, err := npInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, DeleteFunc: enqueue,
		UpdateFunc: func(oldObj, newObj any) {
			o, n := oldObj.(*v1alpha1.NodePartition), newObj.(*v1alpha1.NodePartition)
			if o.Generation != n.Generation {
				a.queue.Add(queueKey) // spec changed; our own status writes do not requeue
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watching NodePartition %s: %w", cfg.NodeName, err)
	}
	if _, err := nodeInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue,
		UpdateFunc: func(oldObj, newObj any) {
			// kubelet wrote what the device plugin advertises: a wait for
			// it that timed out is retried now, not after its backoff.
			if !apiequality.Semantic.DeepEqual(oldObj.(*v1.Node).Status.Allocatable, newObj.(*v1.Node).Status.Allocatable) {
				a.queue.Add(queueKey)
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watching Node %s: %w", cfg.NodeName, err)
	}
	podFactory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + cfg.NodeName
	}))
	podInformer := podFactory.Core().V1().Pods()
	a.npLister, a.nodeLister, a.podLister = npInformer.Lister(), nodeInformer.Lister(), podInformer.Lister()
	a.factories = []interface{ Start(<-chan struct{}) }{npFactory, nodeFactory, podFactory}
	a.synced = []cache.InformerSynced{npInformer.Informer().HasSynced, nodeInformer.Informer().HasSynced, podInformer.Informer().HasSynced}
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
	if a.cfg.Plugin != nil {
		// The plugin outlives the loop: when the agent stops, it first tells
		// the scheduler (DevicePluginRestarting), then stops the plugin.
		pctx, stopPlugin := context.WithCancel(context.WithoutCancel(ctx))
		stopped := make(chan struct{})
		go func() {
			defer close(stopped)
			if err := a.cfg.Plugin.Run(pctx); err != nil {
				logger.Error(err, "the agent's device plugin stopped")
			}
		}()
		defer func() {
			mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if np, err := a.npLister.Get(a.cfg.NodeName); err == nil {
				if err := a.markRestarting(mctx, np); err != nil {
					logger.Error(err, "could not tell the scheduler that the node's device plugin stops")
				}
			}
			stopPlugin()
			<-stopped
		}()
		logger.Info("agent started; it is the node's device plugin")
	} else {
		logger.Info("agent started", "devicePlugin", a.cfg.DevicePluginNamespace+"/"+a.cfg.DevicePluginSelector)
	}
	a.queue.Add(queueKey)
	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	go a.followKubelet(ctx)
	for {
		key, quit := a.queue.Get()
		if quit {
			return nil
		}
		err := a.sync(ctx)
		if errors.Is(err, errSuperseded) {
			if a.coalescing.IsZero() {
				a.coalescing = time.Now()
			}
		} else {
			a.coalescing = time.Time{}
		}
		var wait errWait
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, errSuperseded):
			logger.V(2).Info("a newer spec was published while applying; applying it first")
			a.queue.Forget(key)
			a.queue.Add(key)
		case errors.As(err, &wait):
			logger.V(2).Info("waiting before applying", "why", wait.why)
			a.queue.Forget(key)
			a.queue.AddAfter(key, waitRetry)
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

// followKubelet syncs whenever the kubelet goes or comes back, which
// closes or opens the node (kubeletRestarting).
func (a *Agent) followKubelet(ctx context.Context) {
	var plugin <-chan struct{} // nil: never ready
	if a.cfg.Plugin != nil {
		plugin = a.cfg.Plugin.KubeletChanged()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-plugin:
		case <-a.kubelet.RestartsChanged():
		}
		a.queue.Add(queueKey)
	}
}

// errWait is a sync that holds off for a moment for a reason that clears
// by itself (a pod bound to the node that kubelet has not admitted yet):
// retried after waitRetry, without backoff.
type errWait struct{ why string }

func (e errWait) Error() string { return "waiting: " + e.why }

const waitRetry = 500 * time.Millisecond

// progressEvery is the least time between two progress reports of a plan
// applied in agent mode (the first, once its destroys are withdrawn, is
// always made).
const progressEvery = 500 * time.Millisecond

// outcome is what one sync did, for the status conditions (apply returns
// its own part of it): the steps applied, why parts of the spec were not,
// and a failure to retry.
type outcome struct {
	steps     []Step
	conflicts []Conflict
	err       error  // a failure to retry
	reason    string // the failure's condition reason
	refused   bool   // the plan was refused before: conditions stay
	wait      string // why the agent holds off (errWait)
	closed    string // why the node takes no MIG pod and the agent holds off (its kubelet restarts)
	// superseded: a newer spec was published while the steps ran; the
	// sync stopped them and makes way for it (errSuperseded).
	superseded bool
}

// errSuperseded is a sync that made way for a newer spec before it
// advertised and reported: the next sync, at once, applies the newer spec
// from what exists, and advertises and reports once for both.
var errSuperseded = errors.New("a newer spec was published; applying it first")

// coalesceFor bounds how long the agent keeps making way for newer specs:
// a node whose spec changes faster than its GPUs are changed still
// advertises and reports what it made at least that often.
const coalesceFor = 30 * time.Second

// sync reconciles the node in phases: observe the GPUs, decide the steps
// (pure), apply them, observe again if anything changed, make the device
// plugin advertise what exists, then report (pure), emit the events and
// write the status. It returns a failure to retry with backoff, or an
// errWait to try again shortly.
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
	// The informer may not show the agent's last status write yet: the
	// sync goes by it, so that a plan refused a moment ago is not pursued.
	np = a.base(np)
	start := time.Now()
	obs, err := a.observe(ctx)
	if err != nil {
		nvmlErrors.WithLabelValues("observe", gpu.Code(err)).Inc()
		return a.fail(ctx, np, node, nil, ReasonNVMLError, fmt.Errorf("reading the GPUs: %w", err))
	}
	if obs.kubeletErr != nil {
		logger.V(2).Info("kubelet PodResources API unavailable; no slice will be destroyed", "err", obs.kubeletErr)
	}
	if why := a.kubeletRestarting(); why != "" {
		return a.hold(ctx, np, node, obs, outcome{closed: why})
	}
	d := decide(np, obs)
	if d.wait != "" {
		return a.hold(ctx, np, node, obs, outcome{wait: d.wait})
	}
	var progress func(context.Context)
	if a.cfg.Plugin != nil && len(d.steps) > 0 && np.Spec.PlanID != "" {
		// Each report wakes the scheduler for the pods it may serve.
		progress = func(ctx context.Context) { a.progress(ctx, np, node) }
	}
	newer := a.newer(np)
	out := a.apply(klog.NewContext(ctx, logger.WithValues("plan", np.Spec.PlanID)), d.steps, obs.gpus, progress, newer)
	out.conflicts, out.refused = append(d.conflicts, out.conflicts...), d.refused
	if len(out.steps) > 0 {
		a.replaced = nil // plugin pods started until now scanned an older layout
	}
	if out.err == nil && (out.superseded || newer()) {
		if len(out.steps) > 0 {
			applyDuration.WithLabelValues("superseded").Observe(time.Since(start).Seconds())
		}
		return errSuperseded
	}
	if len(out.steps) > 0 || out.err != nil {
		// Status must say exactly what exists, whatever happened.
		if obs, err = a.observe(ctx); err != nil {
			return a.fail(ctx, np, node, out.conflicts, ReasonNVMLError, fmt.Errorf("reading the GPUs: %w", err))
		}
	}
	recordSlices(obs.gpus)
	if out.err == nil {
		var wait errWait
		switch err := a.advertise(ctx, np, node, &obs, len(out.steps) > 0); {
		case errors.As(err, &wait):
			return a.hold(ctx, np, node, obs, outcome{wait: wait.why})
		case errors.Is(err, errCDI):
			out.err, out.reason = err, ReasonCDISpecFailed
		case errors.Is(err, errTwoPlugins):
			out.err, out.reason = err, ReasonDevicePluginConflict
		case errors.Is(err, errKubeletUnknown):
			out.err, out.reason = err, ReasonKubeletUnreachable
		case err != nil:
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
	st, events := report(a.base(np), node, &obs, out, metav1.Now())
	a.emit(events)
	if err := a.writeStatus(ctx, np, st); err != nil {
		return err
	}
	a.ready.Store(true)
	return out.err
}

// newer says whether a spec newer than np's was published since, while
// the agent may still make way for it (coalesceFor).
func (a *Agent) newer(np *v1alpha1.NodePartition) func() bool {
	if !a.coalescing.IsZero() && time.Since(a.coalescing) > coalesceFor {
		return func() bool { return false }
	}
	return func() bool {
		latest, err := a.npLister.Get(a.cfg.NodeName)
		return err == nil && latest.Generation > np.Generation
	}
}

// hold reports what exists and why the agent waits (out.wait, or
// out.closed), and returns errWait.
func (a *Agent) hold(ctx context.Context, np *v1alpha1.NodePartition, node *v1.Node, obs observation, out outcome) error {
	st, events := report(a.base(np), node, &obs, out, metav1.Now())
	a.emit(events)
	if err := a.writeStatus(ctx, np, st); err != nil {
		return err
	}
	return errWait{why: out.wait + out.closed}
}

// kubeletSettle is how long a node takes no MIG pod after its kubelet
// restarted (kubeletRestarting). Until the kubelet has read its pods from
// the API server (its first batch, which it admits before it counts its
// sources ready: about a second after it starts, measured here), it keeps
// the devices of pods deleted while it was down allocated from its
// checkpoint, and fails a pod it admits meanwhile that needs one of them
// ("Requested: 1, Available: 0", UnexpectedAdmissionError) — pods bound
// to the node in that time are in that batch.
const kubeletSettle = 5 * time.Second

// kubeletRestarting says why the node takes no MIG pod while its kubelet
// restarts: from when the kubelet goes (it closes the PodResources
// connection and, in agent mode, the plugin's streams) until kubeletSettle
// after it is back (the connection made again and, in agent mode, the
// plugin registered with it). "" otherwise.
func (a *Agent) kubeletRestarting() string {
	if guard.Off(guard.KubeletRestart) {
		return ""
	}
	r := a.kubelet.Restarts()
	gone, back := r.Gone, r.Back
	if a.cfg.Plugin != nil {
		k := a.cfg.Plugin.Kubelet()
		gone = gone || k.Gone
		if k.Back.After(back) {
			back = k.Back
		}
	}
	if gone {
		return "kubelet is gone (it closed its connections to the agent): no MIG pod is bound to the node until it is back and has read its pods"
	}
	if time.Since(back) < kubeletSettle {
		// One message per restart: the status is not rewritten meanwhile.
		return fmt.Sprintf("kubelet came back at %s: until it has read its pods it counts the devices of pods deleted while it was down as allocated; no MIG pod is bound to the node until %s",
			back.UTC().Format(time.TimeOnly), back.Add(kubeletSettle).UTC().Format(time.TimeOnly))
	}
	return ""
}

func (a *Agent) node() (*v1.Node, error) {
	node, err := a.nodeLister.Get(a.cfg.NodeName)
	if err != nil {
		return nil, fmt.Errorf("node %s not found (is NODE_NAME set from spec.nodeName?): %w", a.cfg.NodeName, err)
	}
	return node, nil
}

// partition returns the node's NodePartition, creating it (owned by the
// Node, so it goes when the Node goes) if it does not exist. The object
// may be the informer's: callers never modify it.
func (a *Agent) partition(ctx context.Context, node *v1.Node) (*v1alpha1.NodePartition, error) {
	np, err := a.npLister.Get(a.cfg.NodeName)
	if err == nil || !apierrors.IsNotFound(err) {
		return np, err
	}
	np = &v1alpha1.NodePartition{
		ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
		}}},
	}
	created, err := a.partitions.Create(ctx, np, metav1.CreateOptions{FieldManager: "dynamig-agent"})
	if apierrors.IsAlreadyExists(err) {
		created, err = a.partitions.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("creating NodePartition %s: %w", a.cfg.NodeName, err)
	}
	klog.FromContext(ctx).Info("created the node's NodePartition")
	return created, nil
}
