// Package local runs a whole dynamig cluster on this machine, on
// 127.0.0.1: etcd, kube-apiserver and kube-controller-manager as processes
// built from the Go modules, the CRDs, the dynamig scheduler with the
// shipped configuration, and per node the real node agent on simulated
// GPUs, with the real kubelet on a fake container runtime and a stand-in
// for NVIDIA's device plugin (test/kubeletnode), or, for the many-node
// benchmark, the light node model (test/nodesim). `make demo`
// (cmd/dynamig-local), the soak and the end-to-end tests run on it.
package local

import (
	"cmp"
	"context"

	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/manifests"
	"github.com/dynamig/dynamig/node-agent/cdi"
	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/client"
	"github.com/dynamig/dynamig/pkg/generated/clientset/versioned"
	dynamigv1alpha1 "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/typed/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/nodesim"
)

// Options configure a local cluster. The zero value works.
type Options struct {
	// Dir holds the kubeconfig, etcd's data, certificates and logs; a new
	// temporary directory, removed by Stop, if empty.
	Dir string
	// Bin holds the control-plane binaries, built there if missing or
	// older than go.mod; default <module>/bin.
	Bin string
	// Progress receives what the cluster is doing while it starts.
	Progress io.Writer
	// DevicePluginDelay is how long the device plugin takes to come back
	// after a restart; SliceDelay how long NVML takes per GPU instance created.
	DevicePluginDelay, SliceDelay time.Duration
	// DevicePluginTimeout is the agents' wait for re-advertisement (default 2m).
	DevicePluginTimeout time.Duration
	// KubernetesVersion picks kube-apiserver, kube-controller-manager and
	// kubelet: "" for this module's (Version), or one of OlderVersions.
	KubernetesVersion string
	// DevicePlugin is who advertises the nodes' GPU resources (the real
	// kubelet's and the light model's): DevicePluginNVIDIA (the stand-in
	// for NVIDIA's plugin, restarted by the agent after every change; the
	// default) or DevicePluginAgent (the agent's own plugin).
	DevicePlugin string
}

// The device-plugin modes of a node (Options.DevicePlugin).
const (
	DevicePluginNVIDIA = "nvidia"
	DevicePluginAgent  = "agent"
)

// Cluster is a running local cluster.
type Cluster struct {
	Dir        string
	Kubeconfig string
	Config     *rest.Config
	Kube       kubernetes.Interface
	Dynamig    versioned.Interface
	Partitions dynamigv1alpha1.NodePartitionInterface // Dynamig's NodePartitions

	opts    Options
	k8sBin  string // kube-apiserver, kube-controller-manager and kubelet
	tempDir bool
	cp      *controlPlane
	ctx     context.Context
	cancel  context.CancelFunc

	mu     sync.Mutex
	nodes  map[string]*node
	sched  *component
	socket string
}

// Node is what the tests read of a node, whichever kubelet runs it.
type Node interface {
	// Holds and Failures are the node's records of which pod held which
	// device, and of every failure a MIG device caused.
	Holds() []nodesim.Hold
	Failures() []nodesim.Failure
	// Holding names the devices a pod holds, by resource.
	Holding(pod string) map[string][]string
	// DeviceAt is the MIG UUID of the slice at a placement.
	DeviceAt(gpu int, s mig.Slice) (string, error)
	// PauseDevicePlugin keeps a deleted device plugin from coming back.
	PauseDevicePlugin(paused bool)
}

type node struct {
	Node
	sim    *gpu.Simulator
	socket string // PodResources
	// pluginDir is the kubelet's device-plugin directory where the agent
	// serves its own plugin (agent mode), and cdiDir where it writes the
	// devices' CDI specs; "" where NVIDIA's plugin serves.
	pluginDir, cdiDir string
	// simPlugin is the agent's plugin on a light-model node in agent mode.
	simPlugin *nodesim.AgentPlugin
	stop      func()
	agent     *component
}

// component is an in-process goroutine that runs until its context ends.
type component struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func run(ctx context.Context, name string, f func(context.Context) error) *component {
	ctx, cancel := context.WithCancel(ctx)
	c := &component{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		if err := f(ctx); err != nil && ctx.Err() == nil {
			klog.FromContext(ctx).Error(err, "component stopped", "component", name)
		}
	}()
	return c
}

func (c *component) stop() {
	if c != nil {
		c.cancel()
		<-c.done
	}
}

// Start starts the control plane, installs the CRDs and starts the
// scheduler. Stop it with Stop.
func Start(ctx context.Context, o Options) (*Cluster, error) {
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.DevicePluginTimeout == 0 {
		o.DevicePluginTimeout = 2 * time.Minute
	}
	if o.Bin == "" {
		o.Bin = filepath.Join(moduleRoot(), "bin")
	}
	switch o.DevicePlugin {
	case "", DevicePluginNVIDIA, DevicePluginAgent:
	default:
		return nil, fmt.Errorf("device plugin %q: want %s or %s", o.DevicePlugin, DevicePluginNVIDIA, DevicePluginAgent)
	}
	c := &Cluster{opts: o, nodes: map[string]*node{}}
	if o.Dir == "" {
		dir, err := os.MkdirTemp("", "dynamig-local-")
		if err != nil {
			return nil, err
		}
		o.Dir, c.tempDir = dir, true
	} else if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	c.Dir = o.Dir
	// Unix socket paths are limited to 108 bytes: keep them short.
	sockets, err := os.MkdirTemp("", "dmsock")
	if err != nil {
		return nil, err
	}
	c.socket = sockets
	if err := EnsureBinaries(ctx, o.Bin, o.KubernetesVersion, o.Progress); err != nil {
		return nil, err
	}
	if c.k8sBin, err = binDir(o.Bin, o.KubernetesVersion); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Progress, "starting etcd, kube-apiserver and kube-controller-manager %s (logs in %s)\n", cmp.Or(o.KubernetesVersion, Version()), c.Dir)
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	if c.cp, err = startControlPlane(ctx, c.Dir, o.Bin, c.k8sBin); err != nil {
		c.Stop()
		return nil, err
	}
	c.Kubeconfig, c.Config = c.cp.kubeconfig, c.cp.config
	if c.Kube, err = kubernetes.NewForConfig(c.Config); err == nil {
		if c.Dynamig, err = client.New(c.Config); err == nil {
			c.Partitions = c.Dynamig.DynamigV1alpha1().NodePartitions()
		}
	}
	if err == nil {
		err = InstallCRDs(ctx, c.Config)
	}
	if err == nil {
		err = c.StartScheduler()
	}
	if err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// StartScheduler starts dynamig-scheduler with the shipped configuration.
func (c *Cluster) StartScheduler() error {
	return c.StartSchedulerWithConfig(manifests.SchedulerConfig)
}

// StartSchedulerWithConfig starts dynamig-scheduler with a
// KubeSchedulerConfiguration.
func (c *Cluster) StartSchedulerWithConfig(config []byte) error {
	file := filepath.Join(c.Dir, "scheduler-config.yaml")
	if err := os.WriteFile(file, config, 0o644); err != nil {
		return err
	}
	s, err := NewScheduler(c.ctx, c.Config, file)
	if err != nil {
		return fmt.Errorf("building dynamig-scheduler: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sched = run(c.ctx, "scheduler", s.Run)
	return nil
}

// StopScheduler stops the scheduler, as a crash would.
func (c *Cluster) StopScheduler() {
	c.mu.Lock()
	s := c.sched
	c.sched = nil
	c.mu.Unlock()
	s.stop()
}

// AddNode starts a node with the real kubelet (test/kubeletnode) and its
// agent: name, GPU models, labels and existing slices come from o; the
// cluster sets the rest. The node is in agent mode (the agent is its
// device plugin) if the cluster's DevicePlugin says so or o.NoNVIDIAPlugin.
func (c *Cluster) AddNode(o kubeletnode.Options) (*kubeletnode.Node, error) {
	agentMode := o.NoNVIDIAPlugin || c.opts.DevicePlugin == DevicePluginAgent
	o.NoNVIDIAPlugin = agentMode
	if agentMode {
		o.CDIDir = filepath.Join(c.Dir, "nodes", o.Name, "cdi")
	}
	n, err := c.AddKubeletNode(o)
	if err != nil {
		return nil, err
	}
	nd := &node{Node: n, sim: n.Sim, socket: n.Socket, stop: n.Stop}
	if agentMode {
		nd.pluginDir, nd.cdiDir = n.PluginDir(), o.CDIDir
	}
	return n, c.addNode(o.Name, nd)
}

// AddKubeletNode starts a node with the real kubelet, without an agent:
// the cluster sets the kubelet binary, directories and device-plugin
// restart delay; the caller stops it (Node.Stop).
func (c *Cluster) AddKubeletNode(o kubeletnode.Options) (*kubeletnode.Node, error) {
	o.Kubelet, o.Kubeconfig = filepath.Join(c.k8sBin, "kubelet"), c.Kubeconfig
	o.Dir = filepath.Join(c.Dir, "nodes", o.Name)
	sockets, err := os.MkdirTemp(c.socket, "n")
	if err != nil {
		return nil, err
	}
	o.SocketDir, o.RestartDelay = sockets, c.opts.DevicePluginDelay
	n, err := kubeletnode.Start(c.ctx, c.Kube, o)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", o.Name, err)
	}
	n.Sim.SetLatency(gpu.MethodCreateGPUInstance, c.opts.SliceDelay)
	return n, nil
}

// AddSimNode starts a node of the light node model (test/nodesim), where
// the real kubelet cannot go (many nodes), and its agent.
func (c *Cluster) AddSimNode(o nodesim.Options) (*nodesim.Node, error) {
	o.SocketDir, o.RestartDelay = c.socket, c.opts.DevicePluginDelay
	o.AgentPlugin = o.AgentPlugin || c.opts.DevicePlugin == DevicePluginAgent
	n, err := nodesim.Start(c.ctx, c.Kube, o)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", o.Name, err)
	}
	n.Sim.SetLatency(gpu.MethodCreateGPUInstance, c.opts.SliceDelay)
	return n, c.addNode(o.Name, &node{Node: n, sim: n.Sim, socket: n.Socket, simPlugin: n.AgentPlugin(), stop: func() {}})
}

func (c *Cluster) addNode(name string, n *node) error {
	c.mu.Lock()
	c.nodes[name] = n
	c.mu.Unlock()
	return c.StartAgent(name)
}

// Node returns a node.
func (c *Cluster) Node(name string) Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n, ok := c.nodes[name]; ok {
		return n.Node
	}
	return nil
}

// StartAgent starts the node agent of a node.
func (c *Cluster) StartAgent(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, ok := c.nodes[name]
	if !ok {
		return fmt.Errorf("no node %s", name)
	}
	if n.agent != nil {
		return fmt.Errorf("the agent of node %s is running", name)
	}
	cfg := AgentConfig(name, c.opts.DevicePluginTimeout)
	if n.pluginDir != "" {
		specs, err := cdi.New(n.cdiDir, nil)
		if err != nil {
			return err
		}
		cfg.Plugin, cfg.CDI = deviceplugin.New(n.pluginDir), specs
	}
	if n.simPlugin != nil {
		cfg.Plugin = n.simPlugin
	}
	n.agent = run(c.ctx, "agent "+name, func(ctx context.Context) error {
		return RunAgent(ctx, c.Config, n.sim, n.socket, cfg)
	})
	return nil
}

// StopAgent stops the node agent of a node, as a crash would: mid-step
// if it is in the middle of one.
func (c *Cluster) StopAgent(name string) {
	c.mu.Lock()
	n, ok := c.nodes[name]
	var a *component
	if ok {
		a, n.agent = n.agent, nil
	}
	c.mu.Unlock()
	a.stop()
}

// RestartAPIServer stops kube-apiserver and starts it again on the same
// port and etcd, waiting until it is ready.
func (c *Cluster) RestartAPIServer(ctx context.Context) error {
	c.cp.apiserver.stop()
	return c.cp.startAPIServer(ctx)
}

// Stop stops every component and process, and removes a temporary Dir.
func (c *Cluster) Stop() {
	c.mu.Lock()
	var comps []*component
	var nodes []*node
	for _, n := range c.nodes {
		comps = append(comps, n.agent)
		n.agent = nil
		nodes = append(nodes, n)
	}
	comps = append(comps, c.sched)
	c.sched = nil
	c.mu.Unlock()
	for _, comp := range comps {
		comp.stop()
	}
	for _, n := range nodes {
		n.stop()
	}
	if c.cancel != nil {
		c.cancel()
	}
	if c.cp != nil {
		c.cp.stop()
	}
	_ = os.RemoveAll(c.socket)
	if c.tempDir {
		_ = os.RemoveAll(c.Dir)
	}
}
