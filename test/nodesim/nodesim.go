// Package nodesim plays, against a real API server, what kubelet and the
// NVIDIA device plugin do for one node whose GPUs are simulated: the Node
// with the labels GPU Feature Discovery sets; a device-plugin pod that,
// when deleted, comes back and only then re-scans NVML and advertises the
// node's MIG slices (as the real plugin discovers devices only at start);
// admission of bound pods onto specific free slices (Failed with
// "OutOf<resource>" when none is free, as kubelet does), which then run;
// release of the slices when pods finish or go; and the kubelet
// PodResources API on a unix socket. The integration tests, the end-to-end
// tests and the local cluster use it with the real agent.
package nodesim

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
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
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
	resourcehelper "k8s.io/component-helpers/resource"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Device-plugin pod defaults: the GPU Operator's namespace and label.
const (
	DevicePluginNamespace = "gpu-operator"
	DevicePluginLabel     = "app"
	DevicePluginApp       = "nvidia-device-plugin-daemonset"
)

// Options describe a simulated node.
type Options struct {
	Name   string
	Models []string // catalog models of its GPUs, MIG mode on, no slices
	Labels map[string]string
	// SocketDir holds the PodResources socket (keep the path short: unix
	// sockets are limited to 108 bytes).
	SocketDir string
	// RestartDelay is how long the device plugin takes to come back.
	RestartDelay time.Duration
	// Slices exist on the GPUs before anything starts: GPU index → slices.
	Slices map[int][]mig.Slice
}

// DevicesAnnotation on a pod names the device IDs ("MIG-…", comma
// separated) kubelet must give it, instead of any free ones.
const DevicesAnnotation = "dynamig.io/devices"

// RunSecondsAnnotation on a pod makes the stand-in kubelet finish it
// (Succeeded) that many seconds after it started running.
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

	mu          sync.Mutex
	starting    bool // a device-plugin start is under way
	pluginUID   types.UID
	restarts    int
	paused      bool
	allocations map[string]map[string][]string // pod key → resource → device IDs
	advertised  map[string][]string            // resource → device IDs
	holds       []Hold
}

// Hold is a device a pod held from admission until release; To is zero
// while it still holds it.
type Hold struct {
	Device, Pod string
	From, To    time.Time
}

// Holds returns every device hold so far, oldest first.
func (n *Node) Holds() []Hold {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]Hold(nil), n.holds...)
}

// Start creates the Node, serves PodResources, starts the device plugin
// and admits the pods bound to the node until ctx ends.
func Start(ctx context.Context, cs kubernetes.Interface, o Options) (*Node, error) {
	sim, err := gpu.NewSimulator(o.Name, o.Models...)
	if err != nil {
		return nil, err
	}
	plugin, err := gpu.Open(sim.Interface())
	if err != nil {
		return nil, err
	}
	n := &Node{
		Name: o.Name, Sim: sim, Socket: filepath.Join(o.SocketDir, o.Name+".sock"),
		cs: cs, plugin: plugin, server: podresources.NewServer(), opts: o,
		queue:       workqueue.NewTyped[string](),
		allocations: map[string]map[string][]string{}, advertised: map[string][]string{},
	}
	for g, slices := range o.Slices {
		for _, sl := range slices {
			if _, err := plugin.Create(g, sl.Profile, sl.Start); err != nil {
				return nil, fmt.Errorf("node %s: existing slice %s on gpu %d: %w", o.Name, sl, g, err)
			}
		}
	}
	if err := n.server.Serve(n.Socket); err != nil {
		return nil, err
	}
	if err := n.createNode(ctx); err != nil {
		return nil, err
	}
	if err := n.advertise(ctx); err != nil {
		return nil, err
	}
	if err := n.createPlugin(ctx); err != nil {
		return nil, err
	}
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
		lo.FieldSelector = "spec.nodeName=" + o.Name
	}))
	inf := factory.Core().V1().Pods().Informer()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			n.queue.Add(key)
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) }, DeleteFunc: enqueue,
	}); err != nil {
		return nil, err
	}
	n.store = inf.GetStore()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	go n.run(ctx)
	go func() {
		<-ctx.Done()
		n.queue.ShutDown()
		n.server.Stop()
		_ = n.plugin.Close()
	}()
	return n, nil
}

func (n *Node) createNode(ctx context.Context) error {
	labels := map[string]string{
		"kubernetes.io/hostname":  n.Name,
		"dynamig.io/partitioning": "mig",
		"nvidia.com/mig.strategy": "mixed",
		"nvidia.com/mig.capable":  "true",
		"nvidia.com/gpu.present":  "true",
		"nvidia.com/gpu.count":    fmt.Sprint(len(n.opts.Models)),
	}
	if gpus, err := n.plugin.GPUs(); err == nil && len(gpus) > 0 {
		labels["nvidia.com/gpu.product"] = strings.ReplaceAll(gpus[0].Name, " ", "-")
		labels["nvidia.com/gpu.memory"] = fmt.Sprint(gpus[0].MemoryMiB)
	}
	for k, v := range n.opts.Labels {
		labels[k] = v
	}
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

// Holding returns the device IDs a pod ("namespace/name") was given.
func (n *Node) Holding(pod string) map[string][]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string][]string{}
	for r, ids := range n.allocations[pod] {
		out[r] = append([]string(nil), ids...)
	}
	return out
}

// DeviceAt returns the MIG UUID of the slice at a placement of a GPU.
func (n *Node) DeviceAt(gpuIndex int, s mig.Slice) (string, error) {
	ss, err := n.plugin.Slices(gpuIndex)
	if err != nil {
		return "", err
	}
	for _, x := range ss {
		if x.Profile == s.Profile && x.Start == s.Start && x.UUID != "" {
			return x.UUID, nil
		}
	}
	return "", fmt.Errorf("node %s gpu %d has no slice %s", n.Name, gpuIndex, s)
}

func (n *Node) pluginName() string { return "nvidia-device-plugin-" + n.Name }

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
	isPlugin := ns == DevicePluginNamespace && name == n.pluginName()
	if !exists {
		n.release(key)
		if isPlugin {
			n.startPlugin(ctx)
		}
		return nil
	}
	pod := obj.(*v1.Pod)
	switch {
	case pod.DeletionTimestamp != nil:
		n.release(key)
		err := n.cs.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0), Preconditions: &metav1.Preconditions{UID: &pod.UID}})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil
		}
		return err
	case isPlugin:
		return nil
	case pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed:
		n.release(key)
		return nil
	case pod.Status.Phase == v1.PodPending:
		return n.admit(ctx, pod)
	case pod.Status.Phase == v1.PodRunning:
		return n.finish(ctx, pod)
	}
	return nil
}

// finish marks a running pod Succeeded once it has run for its
// RunSecondsAnnotation, and asks to be called again until then.
func (n *Node) finish(ctx context.Context, pod *v1.Pod) error {
	secs, err := strconv.ParseFloat(pod.Annotations[RunSecondsAnnotation], 64)
	if err != nil || secs <= 0 || pod.Status.StartTime == nil {
		return nil
	}
	end := pod.Status.StartTime.Add(time.Duration(secs * float64(time.Second)))
	if wait := time.Until(end); wait > 0 {
		key := pod.Namespace + "/" + pod.Name
		time.AfterFunc(wait, func() { n.queue.Add(key) })
		return nil
	}
	n.release(pod.Namespace + "/" + pod.Name)
	updated := pod.DeepCopy()
	updated.Status.Phase = v1.PodSucceeded
	now := metav1.Now()
	updated.Status.Conditions = []v1.PodCondition{{Type: v1.PodReady, Status: v1.ConditionFalse, Reason: "PodCompleted", LastTransitionTime: now}}
	for i := range updated.Status.ContainerStatuses {
		cs := &updated.Status.ContainerStatuses[i]
		cs.Ready, cs.Started = false, ptr.To(false)
		cs.State = v1.ContainerState{Terminated: &v1.ContainerStateTerminated{Reason: "Completed", StartedAt: *pod.Status.StartTime, FinishedAt: now}}
	}
	_, err = n.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// admit gives a bound pod specific free devices of each MIG resource it
// requests and runs it, or fails it as kubelet does when none is free.
func (n *Node) admit(ctx context.Context, pod *v1.Pod) error {
	key := pod.Namespace + "/" + pod.Name
	want, bad := requests(pod)
	n.mu.Lock()
	held := map[string]bool{}
	for _, a := range n.allocations {
		for _, ids := range a {
			for _, id := range ids {
				held[id] = true
			}
		}
	}
	pinned := map[string]bool{}
	for _, id := range strings.Split(pod.Annotations[DevicesAnnotation], ",") {
		if id != "" {
			pinned[id] = true
		}
	}
	got := map[string][]string{}
	short := bad
	for _, r := range slices.Sorted(maps.Keys(want)) {
		for _, id := range n.advertised[r] {
			if len(got[r]) < int(want[r]) && !held[id] && (len(pinned) == 0 || pinned[id]) {
				got[r] = append(got[r], id)
			}
		}
		if len(got[r]) < int(want[r]) && short == "" {
			short = r
		}
	}
	if short == "" && len(want) > 0 {
		n.allocations[key] = got
		for _, ids := range got {
			for _, id := range ids {
				n.holds = append(n.holds, Hold{Device: id, Pod: key, From: time.Now()})
			}
		}
	}
	n.mu.Unlock()

	status := pod.Status.DeepCopy()
	now := metav1.Now()
	if short != "" {
		status.Phase, status.Reason = v1.PodFailed, "OutOf"+short
		status.Message = fmt.Sprintf("Pod was rejected: Node didn't have enough resource: %s, requested: %d, free: %d", short, want[short], len(got[short]))
	} else {
		for r, ids := range got {
			n.server.Allocate(key, pod.Spec.Containers[0].Name, r, ids...)
			for _, id := range ids {
				_ = n.Sim.SetProcess(id, true) // the container runs on the device
			}
		}
		status.Phase, status.StartTime = v1.PodRunning, &now
		status.Conditions = []v1.PodCondition{{Type: v1.PodReady, Status: v1.ConditionTrue, LastTransitionTime: now}}
		status.ContainerStatuses = running(pod.Spec.Containers, now)
	}
	updated := pod.DeepCopy()
	updated.Status = *status
	_, err := n.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
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

// requests is the pod's MIG demand (demand.Of) by resource name. A MIG
// resource that names no profile is returned as bad: no device plugin
// advertises it, so kubelet rejects the pod for it.
func requests(pod *v1.Pod) (map[string]int64, string) {
	d, err := demand.Of(pod)
	if err != nil {
		for r := range resourcehelper.PodRequests(pod, resourcehelper.PodResourcesOptions{}) {
			if _, perr := mig.ParseResourceName(string(r)); mig.IsMIGResource(string(r)) && perr != nil {
				return nil, string(r)
			}
		}
	}
	out := map[string]int64{}
	for prof, n := range d {
		out[prof.ResourceName()] = int64(n)
	}
	return out, ""
}

func (n *Node) release(key string) {
	n.mu.Lock()
	a, ok := n.allocations[key]
	delete(n.allocations, key)
	for i := range n.holds {
		if n.holds[i].Pod == key && n.holds[i].To.IsZero() {
			n.holds[i].To = time.Now()
		}
	}
	n.mu.Unlock()
	if !ok {
		return
	}
	n.server.Release(key)
	for _, ids := range a {
		for _, id := range ids {
			_ = n.Sim.SetProcess(id, false)
		}
	}
}

// startPlugin brings the device plugin back, in the background, after
// RestartDelay: it scans NVML, advertises the slices (PodResources and
// Node status), and its pod is created Running and Ready.
func (n *Node) startPlugin(ctx context.Context) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.paused || n.starting {
		return
	}
	n.starting = true
	go func() {
		defer func() {
			n.mu.Lock()
			n.starting = false
			n.mu.Unlock()
		}()
		select {
		case <-ctx.Done():
			return
		case <-time.After(n.opts.RestartDelay):
		}
		for ctx.Err() == nil {
			err := n.advertise(ctx)
			if err == nil {
				err = n.createPlugin(ctx)
			}
			if err == nil {
				return
			}
			klog.FromContext(ctx).V(2).Info("simulated device plugin: retrying its start", "node", n.Name, "err", err)
			time.Sleep(100 * time.Millisecond)
		}
	}()
}

// createPlugin creates the device plugin's pod, Running and Ready.
func (n *Node) createPlugin(ctx context.Context) error {
	if _, err := n.cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: DevicePluginNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	pod, err := n.cs.CoreV1().Pods(DevicePluginNamespace).Create(ctx, &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: n.pluginName(), Labels: map[string]string{DevicePluginLabel: DevicePluginApp}},
		Spec:       v1.PodSpec{NodeName: n.Name, Containers: []v1.Container{{Name: "nvidia-device-plugin", Image: "nvcr.io/nvidia/k8s-device-plugin:v0.17.0"}}},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil // the old one is still terminating: its deletion comes back here
	}
	if err != nil {
		return err
	}
	now := metav1.Now()
	pod.Status = v1.PodStatus{Phase: v1.PodRunning, StartTime: &now, Conditions: []v1.PodCondition{{Type: v1.PodReady, Status: v1.ConditionTrue, LastTransitionTime: now}},
		ContainerStatuses: running(pod.Spec.Containers, now)}
	if _, err := n.cs.CoreV1().Pods(DevicePluginNamespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		return err
	}
	n.mu.Lock()
	if n.pluginUID != "" {
		n.restarts++
	}
	n.pluginUID = pod.UID
	n.mu.Unlock()
	return nil
}

// advertise scans NVML as the device plugin does at start (slices with
// one full-size compute instance, by MIG UUID) and publishes them to
// PodResources and to Node capacity and allocatable.
func (n *Node) advertise(ctx context.Context) error {
	gpus, err := n.plugin.GPUs()
	if err != nil {
		return err
	}
	ids := map[string][]string{}
	for _, g := range gpus {
		if !g.MIG.Current {
			continue
		}
		ss, err := n.plugin.Slices(g.Index)
		if err != nil {
			return err
		}
		for _, s := range ss {
			if s.Advertised() {
				r := s.Profile.ResourceName()
				ids[r] = append(ids[r], s.UUID)
			}
		}
	}
	n.mu.Lock()
	for r := range n.advertised {
		if _, ok := ids[r]; !ok {
			n.server.SetAllocatable(r, nil)
		}
	}
	n.advertised = ids
	n.mu.Unlock()
	for r, list := range ids {
		n.server.SetAllocatable(r, list)
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := n.cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, list := range []v1.ResourceList{node.Status.Capacity, node.Status.Allocatable} {
			for r := range list {
				if mig.IsMIGResource(string(r)) {
					delete(list, r)
				}
			}
			for r, l := range ids {
				list[v1.ResourceName(r)] = *resource.NewQuantity(int64(len(l)), resource.DecimalSI)
			}
		}
		_, err = n.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
}
