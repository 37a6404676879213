// Package kubeletnode runs a node of the local cluster with the real
// kubelet (k8s.io/kubernetes/cmd/kubelet, built from the module like the
// control plane) on simulated GPUs:
//
//   - the kubelet as a process in a mount namespace of its own (unshare -m):
//     its device-plugin directory, fixed at /var/lib/kubelet/device-plugins,
//     and /var/log/containers are private directories bind-mounted there;
//   - a container runtime: k8s.io/cri-client's fake, served in process, with
//     a GPU hook that plays the NVIDIA container toolkit (runtime.go);
//   - a stand-in for NVIDIA's device plugin in the GPU Operator's restart
//     mode: a pod bound to the node (the DaemonSet's), whose container, once
//     kubelet starts it, serves the real device-plugin gRPC API for the MIG
//     devices it finds on the simulated GPUs at that moment (deviceplugin.go);
//     deleted, it comes back after RestartDelay, as the DaemonSet's would.
//
// Admission, device choice, the device-plugin restart window, Node status
// and PodResources are the kubelet's own. Every device a container held
// (Holds) and every failure a MIG device caused (Failures) is recorded
// for the tests, in the types of the light node model (test/nodesim),
// which stays where the real kubelet cannot go (hundreds of nodes).
//
// It needs root: mount namespaces and bind mounts.
package kubeletnode

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/nodesim"
)

// Options describe a node. Durations left zero take their default.
type Options struct {
	Name   string
	Models []string // catalog models of its GPUs, MIG mode on, no slices
	Labels map[string]string
	// Slices exist on the GPUs before anything starts: GPU index → slices.
	Slices map[int][]mig.Slice
	// Kubelet is the kubelet binary; Kubeconfig the cluster's.
	Kubelet, Kubeconfig string
	// Dir holds the kubelet's root, certificates, logs and configuration.
	Dir string
	// SocketDir holds the runtime's and device plugins' sockets (keep the
	// path short: unix sockets are limited to 108 bytes).
	SocketDir string
	// RestartDelay is how long the device plugin's pod takes to come back
	// once the old one is gone; RegisterDelay how long its container then
	// takes to scan NVML and register (default nodesim.DefaultRegisterDelay).
	RestartDelay, RegisterDelay time.Duration
	// ProcessDelay is how long a container with MIG devices takes from its
	// start to its CUDA process on them (default
	// nodesim.DefaultProcessDelay).
	ProcessDelay time.Duration
	// NoNVIDIAPlugin runs no stand-in for NVIDIA's device plugin: the
	// node's GPU resources are advertised by whoever registers in
	// PluginDir (agent mode: dynamig's agent).
	NoNVIDIAPlugin bool
	// CDIDir is the CDI spec directory the node's runtime reads: a
	// container given a device of the agent's CDI kind is created only if
	// a spec there resolves it, as with containerd.
	CDIDir string
	// NodeStatusUpdateFrequency is kubelet's nodeStatusUpdateFrequency
	// (0: kubelet's default, 10 s): how often it may write Node capacity
	// and allocatable.
	NodeStatusUpdateFrequency time.Duration
}

// Node is a running node.
type Node struct {
	Name   string
	Sim    *gpu.Simulator
	Socket string // kubelet's PodResources socket

	ctx       context.Context
	cancel    context.CancelFunc
	cs        kubernetes.Interface
	opts      Options
	nvml      *gpu.NVML // the device plugin's own NVML session
	rt        *fake.RemoteRuntime
	pluginDir string
	pods      cache.Indexer
	kubelet   *exec.Cmd
	exited    chan struct{}

	mu         sync.Mutex
	containers map[string]*container
	plugin     *plugin
	resourceOf map[string]string // device → the resource it was last allocated as
	prefer     map[string]string // resource → a device Allocate should prefer
	holds      []nodesim.Hold
	failures   []nodesim.Failure
	failed     map[types.UID]bool // pods whose admission failure is recorded
	paused     bool
	allocDelay time.Duration
}

// Start starts the runtime and kubelet, waits until the Node is Ready,
// and starts the device plugin's pod.
func Start(ctx context.Context, cs kubernetes.Interface, o Options) (*Node, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("a node with the real kubelet needs root (mount namespaces, bind mounts)")
	}
	if o.RegisterDelay == 0 {
		o.RegisterDelay = nodesim.DefaultRegisterDelay
	}
	if o.ProcessDelay == 0 {
		o.ProcessDelay = nodesim.DefaultProcessDelay
	}
	sim, nv, err := nodesim.NewGPUs(o.Name, o.Models, o.Slices)
	if err != nil {
		return nil, err
	}
	root := filepath.Join(o.Dir, "root")
	n := &Node{
		Name: o.Name, Sim: sim, Socket: filepath.Join(root, "pod-resources", "kubelet.sock"),
		cs: cs, opts: o, nvml: nv, pluginDir: filepath.Join(o.SocketDir, "dp"),
		containers: map[string]*container{}, resourceOf: map[string]string{}, prefer: map[string]string{},
		failed: map[types.UID]bool{}, exited: make(chan struct{}),
	}
	n.ctx, n.cancel = context.WithCancel(ctx)
	ok := false
	defer func() {
		if !ok {
			n.Stop()
		}
	}()
	for _, d := range []string{root, filepath.Join(o.Dir, "logs"), filepath.Join(o.Dir, "pod-logs"), n.pluginDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	n.rt = fake.NewFakeRemoteRuntime()
	n.rt.ImageService.SetFakeImageSize(1 << 20)
	if err := n.serveRuntime(filepath.Join(o.SocketDir, "cri.sock")); err != nil {
		return nil, err
	}
	go n.clearCalls(n.ctx)
	n.watchPods()
	if err := n.startKubelet(); err != nil {
		return nil, err
	}
	if err := n.waitReady(n.ctx); err != nil {
		return nil, err
	}
	if !o.NoNVIDIAPlugin {
		if err := n.createPlugin(n.ctx); err != nil {
			return nil, err
		}
		// The plugin comes up with the node: registered with kubelet before
		// Start returns, so that a pod bound at once gets its devices.
		if err := n.waitRegistered(n.ctx); err != nil {
			return nil, err
		}
	}
	ok = true
	return n, nil
}

// PluginDir is the node's device-plugin directory: its kubelet's
// /var/lib/kubelet/device-plugins, seen from outside its mount namespace.
func (n *Node) PluginDir() string { return n.pluginDir }

// serveRuntime serves the fake runtime, with the GPU hook in front of its
// runtime service, on a unix socket.
func (n *Node) serveRuntime(sock string) error {
	// Runtime and network ready, as the fake's own Start would say.
	n.rt.RuntimeService.FakeStatus = &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{
		{Type: runtimeapi.RuntimeReady, Status: true}, {Type: runtimeapi.NetworkReady, Status: true},
	}}
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(srv, &runtime{RemoteRuntime: n.rt, n: n})
	runtimeapi.RegisterImageServiceServer(srv, n.rt)
	go func() { _ = srv.Serve(l) }()
	go func() {
		<-n.ctx.Done()
		srv.Stop()
	}()
	return nil
}

// watchPods keeps the pods bound to the node in an informer: the hook
// reads their specs, and an admission failure for a MIG resource is
// recorded.
func (n *Node) watchPods() {
	f := informers.NewSharedInformerFactoryWithOptions(n.cs, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", n.Name).String()
	}))
	inf := f.Core().V1().Pods().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.observe(obj) },
		UpdateFunc: func(_, obj any) { n.observe(obj) },
	})
	n.pods = inf.GetIndexer()
	f.Start(n.ctx.Done())
}

// RejectedForMIG reports whether kubelet rejected a pod at admission for
// a reason a MIG device can cause.
func RejectedForMIG(p *v1.Pod) bool {
	if p.Status.Phase != v1.PodFailed {
		return false
	}
	return p.Status.Reason == "UnexpectedAdmissionError" || strings.HasPrefix(p.Status.Reason, "OutOf") && strings.Contains(p.Status.Reason, "nvidia.com")
}

func (n *Node) observe(obj any) {
	p, ok := obj.(*v1.Pod)
	if !ok || !RejectedForMIG(p) {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.failed[p.UID] {
		return
	}
	n.failed[p.UID] = true
	n.failures = append(n.failures, nodesim.Failure{Time: time.Now(), Kind: nodesim.FailureAdmission, Pod: p.Namespace + "/" + p.Name,
		Reason: p.Status.Reason, Message: p.Status.Message})
}

// pod returns a pod ("namespace/name") bound to the node, from the
// informer or, if it lags kubelet, from the API server; nil if gone.
func (n *Node) pod(ctx context.Context, key string) *v1.Pod {
	if obj, ok, err := n.pods.GetByKey(key); err == nil && ok {
		return obj.(*v1.Pod)
	}
	ns, name, _ := strings.Cut(key, "/")
	p, err := n.cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return p
}

func (n *Node) waitReady(ctx context.Context) error {
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		select {
		case <-n.exited:
			return false, fmt.Errorf("kubelet exited (log: %s)", n.logFile())
		default:
		}
		node, err := n.cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, c := range node.Status.Conditions {
			if c.Type == v1.NodeReady && c.Status == v1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("node %s not Ready: %w", n.Name, err)
	}
	return nil
}

func (n *Node) waitRegistered(ctx context.Context) error {
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		n.mu.Lock()
		p := n.plugin
		n.mu.Unlock()
		if p == nil {
			return false, nil
		}
		select {
		case <-p.registered:
			return true, nil
		default:
			return false, nil
		}
	})
	if err != nil {
		return fmt.Errorf("node %s: the device plugin did not register: %w", n.Name, err)
	}
	return nil
}

// pluginPod is the device plugin's pod, as the GPU Operator's DaemonSet
// would create it on the node.
func (n *Node) pluginPod() *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "nvidia-device-plugin-" + n.Name, Namespace: nodesim.DevicePluginNamespace,
			Labels: map[string]string{nodesim.DevicePluginLabel: nodesim.DevicePluginApp}},
		Spec: v1.PodSpec{NodeName: n.Name, Containers: []v1.Container{{Name: "nvidia-device-plugin", Image: "nvcr.io/nvidia/k8s-device-plugin:v0.18.0"}},
			Tolerations: []v1.Toleration{{Operator: v1.TolerationOpExists}}, PriorityClassName: "system-node-critical"},
	}
}

// createPlugin creates the device plugin's pod and keeps it there: when
// it is deleted, a new one follows RestartDelay after the old one is gone,
// unless paused.
func (n *Node) createPlugin(ctx context.Context) error {
	if _, err := n.cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nodesim.DevicePluginNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	pod := n.pluginPod()
	if _, err := n.cs.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the device plugin's pod: %w", err)
	}
	go n.keepPlugin(ctx)
	return nil
}

// keepPlugin plays the DaemonSet controller for the device plugin's pod.
func (n *Node) keepPlugin(ctx context.Context) {
	pods := n.cs.CoreV1().Pods(nodesim.DevicePluginNamespace)
	name := n.pluginPod().Name
	for ctx.Err() == nil {
		_, err := pods.Get(ctx, name, metav1.GetOptions{})
		n.mu.Lock()
		paused := n.paused
		n.mu.Unlock()
		if apierrors.IsNotFound(err) && !paused {
			if !sleep(ctx, n.opts.RestartDelay) {
				return
			}
			if _, err := pods.Create(ctx, n.pluginPod(), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) && ctx.Err() == nil {
				klog.FromContext(ctx).V(2).Info("stand-in device plugin: recreating its pod", "node", n.Name, "err", err)
			}
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// PauseDevicePlugin keeps a deleted device plugin from coming back until
// resumed, as a crash-looping plugin would.
func (n *Node) PauseDevicePlugin(paused bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.paused = paused
}

// SetAllocateDelay makes the device plugin's Allocate take d, as a
// plugin under load does (0: at once).
func (n *Node) SetAllocateDelay(d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.allocDelay = d
}

func (n *Node) allocateDelay() time.Duration {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.allocDelay
}

// PluginRunning reports whether the device plugin's container runs.
func (n *Node) PluginRunning() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.plugin != nil
}

// Prefer makes the device plugin prefer a device of a resource when
// kubelet asks which one to give a one-device container (an empty id
// removes it): how a test places a pod on a given slice.
func (n *Node) Prefer(resource, id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if id == "" {
		delete(n.prefer, resource)
	} else {
		n.prefer[resource] = id
	}
}

func (n *Node) preferred(resource string) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.prefer[resource]
}

// allocated records the resource kubelet allocated devices as.
func (n *Node) allocated(resource string, ids []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, id := range ids {
		n.resourceOf[id] = resource
	}
}

// Holds returns every device a container held, from its creation until
// it stopped, oldest first.
func (n *Node) Holds() []nodesim.Hold {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]nodesim.Hold(nil), n.holds...)
}

// Failures returns every failure a MIG device caused, oldest first.
func (n *Node) Failures() []nodesim.Failure {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]nodesim.Failure(nil), n.failures...)
}

// Holding returns the device IDs a pod's running containers hold, by
// resource.
func (n *Node) Holding(pod string) map[string][]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string][]string{}
	for _, c := range n.containers {
		if c.pod != pod || c.ended {
			continue
		}
		for _, id := range c.devices {
			r := n.resourceOf[id]
			if !slices.Contains(out[r], id) {
				out[r] = append(out[r], id)
			}
		}
	}
	return out
}

// DeviceAt returns the MIG UUID of the slice at a placement of a GPU.
func (n *Node) DeviceAt(gpuIndex int, s mig.Slice) (string, error) {
	return nodesim.DeviceAt(n.nvml, gpuIndex, s)
}

// RestartKubelet kills the kubelet, leaves the node without one for down
// (PodResources unreachable, nothing admitted), and starts it again on
// the same root directory: it deletes the plugin sockets, reads its
// checkpoint back, and the device plugin registers again.
func (n *Node) RestartKubelet(down time.Duration) error {
	n.KillKubelet()
	if !sleep(n.ctx, down) {
		return n.ctx.Err()
	}
	return n.StartKubelet()
}

// StartKubelet starts a killed kubelet again (RestartKubelet).
func (n *Node) StartKubelet() error {
	n.exited = make(chan struct{})
	return n.startKubelet()
}

// KillKubelet kills the kubelet (SIGKILL) and waits until it is gone; the
// runtime, its containers and the device plugin stay.
func (n *Node) KillKubelet() {
	if n.kubelet != nil && n.kubelet.Process != nil {
		_ = n.kubelet.Process.Signal(syscall.SIGKILL)
		<-n.exited
	}
}

// Stop kills the kubelet and stops the runtime and plugin. The Node
// object stays.
func (n *Node) Stop() {
	n.cancel()
	n.KillKubelet()
	n.mu.Lock()
	if n.plugin != nil {
		n.plugin.close()
	}
	n.mu.Unlock()
}
