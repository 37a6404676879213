package kubeletnode

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"

	v1 "k8s.io/api/core/v1"

	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/nodesim"
)

// This file is the container runtime with the NVIDIA container toolkit:
// k8s.io/cri-client's fake runtime, wrapped in process with a GPU hook.
// A container's MIG devices are the CDI names kubelet passes from the
// device plugin's Allocate. As with the NVIDIA runtime, a container whose
// device does not exist cannot be created; its CUDA process starts on the
// simulated GPU ProcessDelay after the container (NVML reports the device
// IN_USE only then), fails if the device went meanwhile, and stops with
// the container.

// createErrorFormat is how containerd reports a CDI device the NVIDIA
// device plugin named but whose MIG device does not exist.
const createErrorFormat = "failed to create containerd container: CDI device injection failed: unresolvable CDI devices %s=%s"

// processErrorFormat is what a CUDA process reports when the MIG device
// its container was given went before it started.
const processErrorFormat = "CUDA error: no CUDA-capable device is detected (MIG device %s no longer exists)"

// Labels kubelet puts on every container (pkg/kubelet/types/labels.go).
const (
	podNameLabel       = "io.kubernetes.pod.name"
	podNamespaceLabel  = "io.kubernetes.pod.namespace"
	containerNameLabel = "io.kubernetes.container.name"
)

// runtime is the fake CRI runtime service with the GPU hook.
type runtime struct {
	*fake.RemoteRuntime
	n *Node
}

// resolves reports whether a CDI device name resolves to a spec in the
// node's CDI directory, as a CDI-enabled runtime resolves it (the same
// library).
func (n *Node) resolves(name string) bool {
	if n.opts.CDIDir == "" {
		return false
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(n.opts.CDIDir), cdi.WithAutoRefresh(false))
	return err == nil && cache.GetDevice(name) != nil
}

// kubeletAllocation asks kubelet which resource each device of a pod was
// allocated as (PodResources Get, which leaves kubelet's allocated set
// alone, unlike List).
func (n *Node) kubeletAllocation(ctx context.Context, ns, name string) (map[string]string, error) {
	conn, err := grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := podresourcesapi.NewPodResourcesListerClient(conn).Get(ctx, &podresourcesapi.GetPodResourcesRequest{PodName: name, PodNamespace: ns})
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, c := range resp.GetPodResources().GetContainers() {
		for _, d := range c.GetDevices() {
			for _, id := range d.GetDeviceIds() {
				out[id] = d.GetResourceName()
			}
		}
	}
	return out, nil
}

// container is a created container as the hook tracks it.
type container struct {
	id, pod, name string
	devices       []string // MIG UUIDs from its CDI devices
	holds         []int    // its open entries in Node.holds
	procs         []string // devices its CUDA process runs on
	plugin        bool     // the device plugin's container
	ended         bool
}

func (r *runtime) CreateContainer(ctx context.Context, req *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	n := r.n
	labels := req.GetConfig().GetLabels()
	c := &container{pod: labels[podNamespaceLabel] + "/" + labels[podNameLabel], name: labels[containerNameLabel]}
	c.plugin = labels[podNamespaceLabel] == nodesim.DevicePluginNamespace && req.GetSandboxConfig().GetLabels()[nodesim.DevicePluginLabel] == nodesim.DevicePluginApp
	kinds := map[string]string{} // device → its CDI kind
	for _, d := range req.GetConfig().GetCDIDevices() {
		kind, id, _ := strings.Cut(d.GetName(), "=")
		if kind == cdiKind || kind == deviceplugin.CDIKind {
			c.devices, kinds[id] = append(c.devices, id), kind
		}
	}
	if slices.Contains(slices.Collect(maps.Values(kinds)), deviceplugin.CDIKind) {
		// The agent's plugin does not tell the hook what it allocated:
		// kubelet does.
		byID, err := n.kubeletAllocation(ctx, labels[podNamespaceLabel], labels[podNameLabel])
		if err != nil {
			return nil, fmt.Errorf("asking kubelet for the pod's devices: %w", err)
		}
		for id, r := range byID {
			n.allocated(r, []string{id})
		}
	}
	pod := n.pod(ctx, c.pod)
	n.mu.Lock()
	defer n.mu.Unlock()
	now := time.Now()
	for _, id := range c.devices {
		_, s, ok := n.Sim.MIGDevice(id)
		if ok && kinds[id] == deviceplugin.CDIKind {
			ok = n.resolves(deviceplugin.CDIName(id))
		}
		if !ok {
			msg := fmt.Sprintf(createErrorFormat, kinds[id], id)
			n.failures = append(n.failures, nodesim.Failure{Time: now, Kind: nodesim.FailureContainerStart, Pod: c.pod, Container: c.name,
				Resource: n.resourceOf[id], Device: id, Reason: "CreateContainerError", Message: msg})
			return nil, fmt.Errorf("%s", msg)
		}
		if r := n.resourceOf[id]; r != s.Profile.ResourceName() {
			n.failures = append(n.failures, nodesim.Failure{Time: now, Kind: nodesim.FailureWrongDevice, Pod: c.pod, Container: c.name, Resource: r, Device: id, Reason: "Created",
				Message: fmt.Sprintf("device %s, allocated as %s, is a %s now (its UUID was reused)", id, r, s)})
		}
	}
	if pod != nil && len(c.devices) < wanted(pod, c.name) {
		n.failures = append(n.failures, nodesim.Failure{Time: now, Kind: nodesim.FailureNoDevice, Pod: c.pod, Container: c.name, Reason: "Created",
			Message: fmt.Sprintf("container created with %d MIG devices, asks for %d", len(c.devices), wanted(pod, c.name))})
	}
	resp, err := r.RemoteRuntime.CreateContainer(ctx, req)
	if err != nil {
		return nil, err
	}
	c.id = resp.ContainerId
	// Report the log path, as real runtimes do: kubelet removes the files
	// matching "<log path>*" when it cleans a container up, which with
	// the fake's empty path would be every file in its working directory.
	rs := r.RuntimeService
	rs.Lock()
	if fc, ok := rs.Containers[c.id]; ok {
		fc.LogPath = filepath.Join(req.GetSandboxConfig().GetLogDirectory(), req.GetConfig().GetLogPath())
	}
	rs.Unlock()
	for _, id := range c.devices {
		c.holds = append(c.holds, len(n.holds))
		n.holds = append(n.holds, nodesim.Hold{Device: id, Pod: c.pod, Resource: n.resourceOf[id], From: now})
	}
	n.containers[c.id] = c
	return resp, nil
}

// wanted counts the MIG devices a container of a pod asks for.
func wanted(pod *v1.Pod, name string) int {
	var total int64
	for _, cs := range [][]v1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ctr := range cs {
			if ctr.Name != name {
				continue
			}
			for r, q := range ctr.Resources.Limits {
				if mig.IsMIGResource(string(r)) {
					total += q.Value()
				}
			}
		}
	}
	return int(total)
}

func (r *runtime) StartContainer(ctx context.Context, req *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	resp, err := r.RemoteRuntime.StartContainer(ctx, req)
	if err != nil {
		return nil, err
	}
	n := r.n
	n.mu.Lock()
	c := n.containers[req.ContainerId]
	n.mu.Unlock()
	if c == nil {
		return resp, nil
	}
	pod := n.pod(ctx, c.pod)
	switch {
	case c.plugin:
		n.mu.Lock()
		if n.plugin != nil {
			n.plugin.close()
		}
		n.plugin = n.startPlugin(n.ctx)
		n.mu.Unlock()
	case pod != nil && isRegularInit(pod, c.name):
		// A regular init container runs to completion at once.
		n.exit(c, 0, "Completed", "")
		return resp, nil
	}
	if len(c.devices) > 0 {
		time.AfterFunc(max(n.opts.ProcessDelay, 0), func() { n.startProcess(c) })
	}
	if pod != nil {
		if secs, err := strconv.ParseFloat(pod.Annotations[nodesim.RunSecondsAnnotation], 64); err == nil && secs > 0 {
			time.AfterFunc(time.Duration(secs*float64(time.Second)), func() { n.exit(c, 0, "Completed", "") })
		}
	}
	return resp, nil
}

func isRegularInit(pod *v1.Pod, name string) bool {
	for _, c := range pod.Spec.InitContainers {
		if c.Name == name {
			return c.RestartPolicy == nil || *c.RestartPolicy != v1.ContainerRestartPolicyAlways
		}
	}
	return false
}

func (r *runtime) StopContainer(ctx context.Context, req *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	r.n.end(req.ContainerId)
	return r.RemoteRuntime.StopContainer(ctx, req)
}

func (r *runtime) RemoveContainer(ctx context.Context, req *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	r.n.end(req.ContainerId)
	resp, err := r.RemoteRuntime.RemoveContainer(ctx, req)
	r.n.mu.Lock()
	delete(r.n.containers, req.ContainerId)
	r.n.mu.Unlock()
	return resp, err
}

// startProcess starts the container's CUDA process on its devices; a
// device gone meanwhile fails the process, and the container exits.
func (n *Node) startProcess(c *container) {
	n.mu.Lock()
	if c.ended {
		n.mu.Unlock()
		return
	}
	for _, id := range c.devices {
		if err := n.Sim.SetProcess(id, true); err != nil {
			msg := fmt.Sprintf(processErrorFormat, id)
			n.failures = append(n.failures, nodesim.Failure{Time: time.Now(), Kind: nodesim.FailureProcessStart, Pod: c.pod, Container: c.name,
				Resource: n.resourceOf[id], Device: id, Reason: "Error", Message: msg})
			n.mu.Unlock()
			n.exit(c, 1, "Error", msg)
			return
		}
		c.procs = append(c.procs, id)
	}
	n.mu.Unlock()
}

// exit ends a running container on its own (its process finished or
// failed): kubelet sees it at its next relist.
func (n *Node) exit(c *container, code int32, reason, msg string) {
	n.end(c.id)
	rs := n.rt.RuntimeService
	rs.Lock()
	defer rs.Unlock()
	if fc, ok := rs.Containers[c.id]; ok && fc.State == runtimeapi.ContainerState_CONTAINER_RUNNING {
		fc.State, fc.FinishedAt, fc.ExitCode, fc.Reason, fc.Message = runtimeapi.ContainerState_CONTAINER_EXITED, time.Now().UnixNano(), code, reason, msg
	}
}

// end stops a container's process and plugin and closes its holds.
func (n *Node) end(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := n.containers[id]
	if c == nil || c.ended {
		return
	}
	c.ended = true
	now := time.Now()
	for _, dev := range c.procs {
		if err := n.Sim.SetProcess(dev, false); err != nil {
			n.failures = append(n.failures, nodesim.Failure{Time: now, Kind: nodesim.FailureProcessStop, Pod: c.pod, Container: c.name,
				Resource: n.resourceOf[dev], Device: dev, Reason: "Error", Message: fmt.Sprintf("stopping its CUDA process: %v", err)})
		}
	}
	c.procs = nil
	for _, h := range c.holds {
		n.holds[h].To = now
	}
	if c.plugin && n.plugin != nil {
		n.plugin.close()
		n.plugin = nil
	}
}

// clearCalls empties the fake runtime's record of calls now and then: it
// grows without bound.
func (n *Node) clearCalls(ctx context.Context) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			n.rt.RuntimeService.Lock()
			n.rt.RuntimeService.Called = nil
			n.rt.RuntimeService.Unlock()
			n.rt.ImageService.Lock()
			n.rt.ImageService.Called = nil
			n.rt.ImageService.Unlock()
		}
	}
}
