// Package nodesim plays, against a real API server, what kubelet, the
// container runtime and the NVIDIA device plugin do for one node whose GPUs
// are simulated. It is a light node model, kept where the real kubelet
// (test/kubeletnode: the end-to-end tests, the soak, make demo) cannot go:
// the many-node latency benchmark (20 nodes × 8 GPUs and more, on 2
// cores) and the agent's integration tests, which run without the
// kubelet binary. It must be at least as strict as kubelet v1.37 (k8s.io/kubernetes
// pkg/kubelet/cm/devicemanager, cited function by function):
//
//   - the Node, with the labels GPU Feature Discovery sets;
//   - a device-plugin pod that, when deleted, comes back after RestartDelay
//     and only RegisterDelay after it is Ready re-scans NVML and registers
//     the node's MIG slices (the real plugin discovers devices only at
//     start). From the deletion until then kubelet holds all the plugin's
//     devices unhealthy: GetAllocatableResources lists none, Node
//     allocatable drops to 0 while capacity stays, and a pod admitted then
//     that asks for one of them fails for good (UnexpectedAdmissionError);
//   - Node capacity and allocatable written only at kubelet's status ticks
//     (StatusUpdatePeriod), so the scheduler sees them late, as it does;
//   - admission: kubelet's device manager picks the devices of each
//     container, in no particular order (pseudo-random, seeded), from the
//     healthy devices no active pod holds, or rejects the pod as kubelet
//     does; then kubelet's resource predicates (OutOf<resource>);
//   - containers: a container whose MIG device no longer exists cannot be
//     created (StartError, as the NVIDIA container runtime fails it); its
//     simulated CUDA process starts on the device ProcessDelay after the
//     container (so NVML shows IN_USE only then), fails if the device has
//     gone by then, and stops when the pod ends; failed containers restart
//     with kubelet's back-off, or fail the pod under restartPolicy Never;
//   - the kubelet PodResources API on a unix socket, listing what kubelet
//     lists (not regular init containers' devices).
//
// Every device a pod held (Holds) and every failure caused by a MIG device
// (Failures) is recorded for the tests.
package nodesim

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/rand"
	"path/filepath"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Device-plugin pod defaults: the GPU Operator's namespace and label.
const (
	DevicePluginNamespace = "gpu-operator"
	DevicePluginLabel     = "app"
	DevicePluginApp       = "nvidia-device-plugin-daemonset"
)

// Defaults of Options.
const (
	// DefaultRegisterDelay: NVML scan and registration of a started plugin.
	DefaultRegisterDelay = 100 * time.Millisecond
	// DefaultStatusUpdatePeriod is kubelet's nodeStatusUpdateFrequency.
	DefaultStatusUpdatePeriod = 10 * time.Second
	// DefaultProcessDelay: from a container's start to its CUDA process.
	DefaultProcessDelay = 300 * time.Millisecond
)

// Options describe a simulated node. Durations left zero take their
// default; a negative one means "at once".
type Options struct {
	Name   string
	Models []string // catalog models of its GPUs, MIG mode on, no slices
	Labels map[string]string
	// SocketDir holds the PodResources socket (keep the path short: unix
	// sockets are limited to 108 bytes).
	SocketDir string
	// RestartDelay is how long the device plugin's pod takes to come back
	// (Running and Ready) once the old one is gone.
	RestartDelay time.Duration
	// RegisterDelay is how long the plugin then takes to scan NVML and
	// register with kubelet (default DefaultRegisterDelay). Its pod is
	// Ready meanwhile and its resources are still unhealthy: a Ready
	// plugin pod does not mean the slices are advertised.
	RegisterDelay time.Duration
	// StatusUpdatePeriod is kubelet's nodeStatusUpdateFrequency: Node
	// capacity and allocatable of the device-plugin resources change only
	// at these ticks, the first at a random phase (default
	// DefaultStatusUpdatePeriod, kubelet's 10 s; negative: at every change,
	// which is kinder than kubelet — only where a test says why).
	StatusUpdatePeriod time.Duration
	// ProcessDelay is how long a container with MIG devices takes from its
	// start to its CUDA process on them (default DefaultProcessDelay): the
	// window in which NVML does not yet report the device IN_USE.
	ProcessDelay time.Duration
	// Seed seeds kubelet's choice among free devices, so that runs
	// reproduce; 0 derives it from Name.
	Seed int64
	// Slices exist on the GPUs before anything starts: GPU index → slices.
	Slices map[int][]mig.Slice
	// AgentPlugin puts the node in agent mode: no NVIDIA device plugin;
	// the agent advertises the GPU resources through AgentPlugin.
	AgentPlugin bool
}

// DevicesAnnotation on a pod names the device IDs ("MIG-…", comma
// separated) kubelet must give it, instead of any free ones; if they are
// not free, admission fails as when no device is.
const DevicesAnnotation = "dynamig.io/devices"

// RunSecondsAnnotation on a pod makes the stand-in kubelet finish it
// (Succeeded) that many seconds after it started, if all its containers
// run then.
const RunSecondsAnnotation = "dynamig.io/run-seconds"

// Node is a running simulated node.
type Node struct {
	Name   string
	Sim    *gpu.Simulator
	Socket string

	cs     kubernetes.Interface
	plugin *gpu.NVML // the device plugin's own NVML session
	server *podresources.Server
	opts   Options
	queue  workqueue.TypedInterface[string]
	store  cache.Store
	kick   chan struct{} // a status write is due (StatusUpdatePeriod < 0)
	// gracePeriod is kubelet's endpointStopGracePeriod.
	gracePeriod time.Duration

	mu            sync.Mutex
	rng           *rand.Rand
	starting      bool                // a device-plugin start is under way
	pluginUID     types.UID           // the live device-plugin pod, "" while none
	registeredUID types.UID           // the plugin pod whose plugin is registered with kubelet
	agentDevices  map[string][]string // agent mode: what the agent's plugin advertises, by resource
	started       bool                // a plugin pod was created before
	restarts      int
	paused        bool
	endpoints     map[string]*endpoint // resource → kubelet's registration and device health
	nodeStatus    nodeStatus           // MIG capacity and allocatable as last written to the Node
	pods          map[string]*podState // "namespace/name" → admitted or rejected pod
	holds         []Hold
	failures      []Failure
}

// Hold is a device a pod held (kubelet had it allocated to the pod) from
// admission until release; To is zero while it still holds it.
type Hold struct {
	Device, Pod string
	Resource    string // the resource name the pod got it under
	From, To    time.Time
}

// Failure kinds.
const (
	// FailureAdmission: kubelet rejected the pod for a MIG resource; the pod
	// is Failed for good (UnexpectedAdmissionError, OutOf<resource>).
	FailureAdmission = "Admission"
	// FailureNoDevice: kubelet admitted the pod without a device of a MIG
	// resource it asks for, as it does for an extended resource that
	// neither a device plugin nor the Node knows (predicate.go,
	// removeMissingExtendedResources): it runs without its GPU.
	FailureNoDevice = "AdmittedWithoutDevice"
	// FailureContainerStart: the container runtime could not create a
	// container because its MIG device does not exist (StartError).
	FailureContainerStart = "ContainerStart"
	// FailureProcessStart: a running container's CUDA process found its
	// MIG device gone (the container exits with an error).
	FailureProcessStart = "ProcessStart"
	// FailureProcessStop: stopping a CUDA process failed; its device went
	// while it ran, which NVML forbids.
	FailureProcessStop = "ProcessStop"
	// FailureWrongDevice: a container started on a device whose UUID, after
	// its slice was destroyed, names a slice of another profile now. The
	// runtime cannot tell: the pod runs on a slice it did not ask for, which
	// kubelet may give another pod under that slice's resource name.
	FailureWrongDevice = "WrongDevice"
)

// Failure is a pod that failed, or a container that could not start or
// run, because of a MIG device.
type Failure struct {
	Time      time.Time
	Kind      string // FailureAdmission, …
	Pod       string // "namespace/name"
	Container string // "" for admission
	Resource  string // the MIG resource, where one is to blame
	Device    string // the device ID, where one is to blame
	Reason    string // as kubelet reports it: "UnexpectedAdmissionError", "StartError", …
	Message   string
}

func (f Failure) String() string {
	s := fmt.Sprintf("%s %s %s", f.Time.Format(time.StampMilli), f.Kind, f.Pod)
	if f.Container != "" {
		s += " container " + f.Container
	}
	return s + fmt.Sprintf(": %s: %s", f.Reason, f.Message)
}

// Holds returns every device hold so far, oldest first.
func (n *Node) Holds() []Hold {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Hold(nil), n.holds...)
}

// Failures returns every failure caused by a MIG device so far, oldest
// first. A run that kept its promise has none.
func (n *Node) Failures() []Failure {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Failure(nil), n.failures...)
}

// NewGPUs simulates a node's GPUs (catalog models, MIG mode on) with the
// slices that exist before anything starts (GPU index → slices), and
// opens the NVML session the device plugin reads them through.
func NewGPUs(node string, models []string, existing map[int][]mig.Slice) (*gpu.Simulator, *gpu.NVML, error) {
	sim, err := gpu.NewSimulator(node, models...)
	if err != nil {
		return nil, nil, err
	}
	l, err := gpu.Open(sim.Interface())
	if err != nil {
		return nil, nil, err
	}
	for g, ss := range existing {
		for _, sl := range ss {
			if _, err := l.Create(g, sl.Profile, sl.Start); err != nil {
				return nil, nil, fmt.Errorf("node %s: existing slice %s on gpu %d: %w", node, sl, g, err)
			}
		}
	}
	return sim, l, nil
}

// Start creates the Node, serves PodResources, starts the device plugin
// and admits the pods bound to the node until ctx ends.
func Start(ctx context.Context, cs kubernetes.Interface, o Options) (*Node, error) {
	o = withDefaults(o)
	sim, plugin, err := NewGPUs(o.Name, o.Models, o.Slices)
	if err != nil {
		return nil, err
	}
	n := &Node{
		Name: o.Name, Sim: sim, Socket: filepath.Join(o.SocketDir, o.Name+".sock"),
		cs: cs, plugin: plugin, server: podresources.NewServer(), opts: o,
		queue: workqueue.NewTyped[string](), kick: make(chan struct{}, 1), gracePeriod: endpointStopGracePeriod,
		rng:       rand.New(rand.NewSource(o.Seed)),
		endpoints: map[string]*endpoint{}, pods: map[string]*podState{},
	}
	if err := n.server.Serve(n.Socket); err != nil {
		return nil, err
	}
	if err := n.createNode(ctx); err != nil {
		return nil, err
	}
	if !o.AgentPlugin {
		// The plugin comes up with the node: registered, and in the Node's
		// status before Start returns (the first status tick).
		uid, err := n.createPlugin(ctx)
		if err == nil && uid == "" {
			err = fmt.Errorf("node %s: a device-plugin pod %s/%s exists already", o.Name, DevicePluginNamespace, n.pluginName())
		}
		if err != nil {
			return nil, err
		}
		ids, err := Scan(n.plugin)
		if err != nil {
			return nil, err
		}
		n.register(uid, ids)
	}
	if err := n.writeNodeStatus(ctx); err != nil {
		return nil, err
	}
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
		lo.FieldSelector = "spec.nodeName=" + o.Name
	}))
	inf := factory.Core().V1().Pods().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.enqueue(obj, false) },
		UpdateFunc: func(_, obj any) { n.enqueue(obj, false) },
		DeleteFunc: func(obj any) { n.enqueue(obj, true) },
	}); err != nil {
		return nil, err
	}
	n.store = inf.GetStore()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	var phase time.Duration // of the status ticks: the node's own, from its seed
	if o.StatusUpdatePeriod > 0 {
		phase = time.Duration(rand.New(rand.NewSource(o.Seed + 1)).Int63n(int64(o.StatusUpdatePeriod)))
	}
	go n.run(ctx)
	go n.statusLoop(ctx, phase)
	go func() {
		<-ctx.Done()
		n.queue.ShutDown()
		n.server.Stop()
		_ = n.plugin.Close()
	}()
	return n, nil
}

func withDefaults(o Options) Options {
	def := func(d *time.Duration, v time.Duration) {
		switch {
		case *d == 0:
			*d = v
		case *d < 0:
			*d = -1
		}
	}
	def(&o.RegisterDelay, DefaultRegisterDelay)
	def(&o.StatusUpdatePeriod, DefaultStatusUpdatePeriod)
	def(&o.ProcessDelay, DefaultProcessDelay)
	o.RestartDelay = max(o.RestartDelay, 0)
	if o.Seed == 0 {
		h := fnv.New64a()
		_, _ = h.Write([]byte(o.Name))
		o.Seed = int64(h.Sum64() >> 1)
	}
	return o
}

// after is d, or 0 for "at once" (negative).
func after(d time.Duration) time.Duration { return max(d, 0) }

// enqueue queues a pod's key. A device-plugin pod that is going is seen
// here, at once (deleted says the informer deleted it): kubelet stops its
// container and the plugin's gRPC streams end, whatever comes next.
func (n *Node) enqueue(obj any, deleted bool) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	if pod, ok := obj.(*v1.Pod); ok && n.isPlugin(pod.Namespace, pod.Name) && (deleted || pod.DeletionTimestamp != nil) {
		n.pluginStopped(pod.UID)
	}
	n.queue.Add(key)
}

func (n *Node) createNode(ctx context.Context) error {
	labels := Labels(n.Name, n.plugin, n.opts.Models, n.opts.Labels)
	node, err := n.cs.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating node %s: %w", n.Name, err)
	}
	base := v1.ResourceList{v1.ResourceCPU: resource.MustParse("64"), v1.ResourceMemory: resource.MustParse("512Gi"), v1.ResourcePods: resource.MustParse("110")}
	node.Status = v1.NodeStatus{
		Capacity: base, Allocatable: base.DeepCopy(),
		Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now()}},
	}
	_, err = n.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// Labels are a node's labels: those GPU Feature Discovery and the GPU
// Operator set for its GPUs (l sees them), then its own.
func Labels(name string, l *gpu.NVML, models []string, own map[string]string) map[string]string {
	labels := map[string]string{
		"kubernetes.io/hostname":  name,
		"dynamig.io/partitioning": "mig",
		"nvidia.com/mig.strategy": "mixed",
		"nvidia.com/mig.capable":  "true",
		"nvidia.com/gpu.present":  "true",
		"nvidia.com/gpu.count":    fmt.Sprint(len(models)),
	}
	if gpus, err := l.GPUs(); err == nil && len(gpus) > 0 {
		labels["nvidia.com/gpu.product"] = strings.ReplaceAll(gpus[0].Name, " ", "-")
		labels["nvidia.com/gpu.memory"] = fmt.Sprint(gpus[0].MemoryMiB)
	}
	for k, v := range own {
		labels[k] = v
	}
	return labels
}

// Restarts counts device-plugin restarts.
func (n *Node) Restarts() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.restarts
}

// PauseDevicePlugin keeps a deleted device plugin from coming back until
// resumed, as a crash-looping plugin would.
func (n *Node) PauseDevicePlugin(paused bool) {
	n.mu.Lock()
	n.paused = paused
	n.mu.Unlock()
	if !paused {
		n.queue.Add(DevicePluginNamespace + "/" + n.pluginName())
	}
}

// Holding returns the device IDs a pod ("namespace/name") was given, by
// resource, while it holds them.
func (n *Node) Holding(pod string) map[string][]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string][]string{}
	if ps, ok := n.pods[pod]; ok && ps.active() {
		for r, ids := range ps.byResource() {
			out[r] = ids
		}
	}
	return out
}

// DeviceAt returns the MIG UUID of the slice at a placement of a GPU.
func (n *Node) DeviceAt(gpuIndex int, s mig.Slice) (string, error) {
	return DeviceAt(n.plugin, gpuIndex, s)
}

// DeviceAt returns the MIG UUID of the slice at a placement of a GPU that
// l sees.
func DeviceAt(l *gpu.NVML, gpuIndex int, s mig.Slice) (string, error) {
	ss, err := l.Slices(gpuIndex)
	if err != nil {
		return "", err
	}
	for _, x := range ss {
		if x.Profile == s.Profile && x.Start == s.Start && x.UUID != "" {
			return x.UUID, nil
		}
	}
	return "", fmt.Errorf("gpu %d has no slice %s", gpuIndex, s)
}

func (n *Node) pluginName() string { return "nvidia-device-plugin-" + n.Name }

func (n *Node) isPlugin(ns, name string) bool {
	return ns == DevicePluginNamespace && name == n.pluginName()
}

func (n *Node) run(ctx context.Context) {
	for {
		key, quit := n.queue.Get()
		if quit {
			return
		}
		if err := n.sync(ctx, key); err != nil && ctx.Err() == nil {
			klog.FromContext(ctx).V(2).Info("simulated kubelet: retrying", "node", n.Name, "pod", key, "err", err)
			go func() {
				time.Sleep(100 * time.Millisecond)
				n.queue.Add(key)
			}()
		}
		n.queue.Done(key)
	}
}

// sync does what kubelet does for one pod of the node.
func (n *Node) sync(ctx context.Context, key string) error {
	ns, name, _ := strings.Cut(key, "/")
	obj, exists, err := n.store.GetByKey(key)
	if err != nil {
		return err
	}
	if n.isPlugin(ns, name) && !n.opts.AgentPlugin {
		if !exists {
			n.startPlugin(ctx)
			return nil
		}
		if pod := obj.(*v1.Pod); pod.DeletionTimestamp != nil {
			return n.deletePod(ctx, pod)
		}
		return nil
	}
	if !exists {
		n.forget(ctx, key, "")
		return nil
	}
	pod := obj.(*v1.Pod)
	if pod.DeletionTimestamp != nil {
		n.forget(ctx, key, pod.UID)
		return n.deletePod(ctx, pod)
	}
	ps := n.state(ctx, key, pod.UID)
	if ps == nil {
		if pod.Status.Phase != v1.PodPending {
			return nil // not ours to admit: already decided elsewhere
		}
		return n.admit(ctx, pod)
	}
	n.finish(ctx, pod, ps)
	return n.writePodStatus(ctx, pod, ps)
}

// deletePod removes a terminating pod once its containers are stopped,
// as kubelet does (its grace period is spent at once here).
func (n *Node) deletePod(ctx context.Context, pod *v1.Pod) error {
	err := n.cs.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0), Preconditions: &metav1.Preconditions{UID: &pod.UID}})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// running is the status of containers that started at now and are ready.
func running(containers []v1.Container, now metav1.Time) []v1.ContainerStatus {
	out := make([]v1.ContainerStatus, len(containers))
	for i, c := range containers {
		out[i] = v1.ContainerStatus{Name: c.Name, Image: c.Image, Ready: true, Started: ptr.To(true),
			State: v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}}}
	}
	return out
}

// startPlugin brings the device plugin back, in the background, unless a
// plugin pod lives or one is being started: after RestartDelay its pod is
// created Running and Ready; RegisterDelay later the plugin scans NVML and
// registers the slices with kubelet, unless its pod went meanwhile.
func (n *Node) startPlugin(ctx context.Context) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.paused || n.starting || n.pluginUID != "" {
		return
	}
	n.starting = true
	go func() {
		defer func() {
			n.mu.Lock()
			n.starting = false
			n.mu.Unlock()
		}()
		if !sleep(ctx, n.opts.RestartDelay) {
			return
		}
		var uid types.UID
		for {
			var err error
			if uid, err = n.createPlugin(ctx); err == nil || ctx.Err() != nil {
				break
			}
			klog.FromContext(ctx).V(2).Info("simulated device plugin: retrying its start", "node", n.Name, "err", err)
			time.Sleep(100 * time.Millisecond)
		}
		if uid == "" {
			// The old pod still terminates. Its deletion may have been seen
			// while this start was under way (and found it starting): look
			// again shortly rather than wait for an event that came already.
			time.AfterFunc(100*time.Millisecond, func() { n.queue.Add(DevicePluginNamespace + "/" + n.pluginName()) })
			return
		}
		if !sleep(ctx, after(n.opts.RegisterDelay)) {
			return
		}
		for ctx.Err() == nil {
			ids, err := Scan(n.plugin)
			if err == nil {
				n.register(uid, ids)
				return
			}
			klog.FromContext(ctx).V(2).Info("simulated device plugin: retrying its NVML scan", "node", n.Name, "err", err)
			time.Sleep(100 * time.Millisecond)
		}
	}()
}

// sleep waits d or until ctx ends; false if it ended.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// createPlugin creates the device plugin's pod, Running and Ready, and
// returns its UID; "" if the old one still exists.
func (n *Node) createPlugin(ctx context.Context) (types.UID, error) {
	if _, err := n.cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: DevicePluginNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", err
	}
	pod, err := n.cs.CoreV1().Pods(DevicePluginNamespace).Create(ctx, &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: n.pluginName(), Labels: map[string]string{DevicePluginLabel: DevicePluginApp}},
		Spec:       v1.PodSpec{NodeName: n.Name, Containers: []v1.Container{{Name: "nvidia-device-plugin", Image: "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"}}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	n.mu.Lock()
	if n.started {
		n.restarts++
	}
	n.started, n.pluginUID = true, pod.UID
	n.mu.Unlock()
	now := metav1.Now()
	pod.Status = v1.PodStatus{Phase: v1.PodRunning, StartTime: &now, Conditions: []v1.PodCondition{{Type: v1.PodReady, Status: v1.ConditionTrue, LastTransitionTime: now}},
		ContainerStatuses: running(pod.Spec.Containers, now)}
	if _, err := n.cs.CoreV1().Pods(DevicePluginNamespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return pod.UID, fmt.Errorf("device-plugin pod %s status: %w", pod.Name, err)
	}
	return pod.UID, nil
}

// Scan lists the MIG devices as NVIDIA's device plugin (migStrategy mixed,
// deviceIDStrategy uuid) does when it starts: slices with one full-size
// compute instance, by MIG UUID, per resource; resources without devices
// are not registered (NewNVMLResourceManagers skips them).
func Scan(l *gpu.NVML) (map[string][]string, error) {
	gpus, err := l.GPUs()
	if err != nil {
		return nil, err
	}
	ids := map[string][]string{}
	for _, g := range gpus {
		if !g.MIG.Current {
			continue
		}
		ss, err := l.Slices(g.Index)
		if err != nil {
			return nil, err
		}
		for _, s := range ss {
			if s.Advertised() {
				r := s.Profile.ResourceName()
				ids[r] = append(ids[r], s.UUID)
			}
		}
	}
	return ids, nil
}
