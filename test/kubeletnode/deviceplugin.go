package kubeletnode

import (
	"context"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/test/nodesim"
)

// This file is the stand-in for NVIDIA's device plugin (k8s-device-plugin,
// migStrategy mixed, deviceIDStrategy uuid) as the GPU Operator runs it: a
// real device-plugin gRPC server per resource, registered with the real
// kubelet. Like NVIDIA's it lists the MIG devices once, when its container
// starts, and never again: a new layout is advertised only by a restart.
// It hands devices to containers as CDI names, as the Operator's default
// (CDI on) does.

// cdiKind is the CDI kind of NVIDIA's device plugin's devices.
const cdiKind = "k8s.device-plugin.nvidia.com/gpu"

// plugin is one run of the device plugin: started with its pod's
// container, stopped with it.
type plugin struct {
	n       *Node
	stop    chan struct{}
	stopped sync.Once
	// registered is closed once every endpoint registered the first time.
	registered   chan struct{}
	registerOnce sync.Once
	mu           sync.Mutex
	servers      []*grpc.Server
	socks        []string // the endpoints' socket paths
}

// startPlugin scans the node's GPUs RegisterDelay after the container
// started, then serves and registers one endpoint per resource. It keeps
// re-registering whenever kubelet.sock is made anew (a kubelet restart
// deletes every plugin socket), as NVIDIA's plugin does.
func (n *Node) startPlugin(ctx context.Context) *plugin {
	p := &plugin{n: n, stop: make(chan struct{}), registered: make(chan struct{})}
	go func() {
		logger := klog.FromContext(ctx).WithValues("node", n.Name)
		select {
		case <-p.stop:
			return
		case <-ctx.Done():
			return
		case <-time.After(n.opts.RegisterDelay):
		}
		var kubeletSock os.FileInfo
		for {
			// A new kubelet.sock may reuse the old one's inode (tmpfs
			// does): NVIDIA's plugin reacts to its creation, so the
			// stand-in goes by its modification time too, and by its own
			// sockets, which a starting kubelet deletes.
			if st, err := os.Stat(filepath.Join(n.pluginDir, "kubelet.sock")); err == nil &&
				(kubeletSock == nil || !os.SameFile(st, kubeletSock) || !st.ModTime().Equal(kubeletSock.ModTime()) || !p.socketsThere()) {
				if err := p.serve(ctx); err != nil {
					logger.Error(err, "stand-in device plugin: start failed, retrying")
				} else {
					kubeletSock = st
					p.registerOnce.Do(func() { close(p.registered) })
				}
			}
			select {
			case <-p.stop:
				return
			case <-ctx.Done():
				p.close()
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return p
}

// serve (re)starts every endpoint from a new NVML scan and registers it.
func (p *plugin) serve(ctx context.Context) error {
	ids, err := nodesim.Scan(p.n.nvml)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.stop:
		return nil // its container stopped meanwhile: serve nothing
	default:
	}
	p.stopServersLocked()
	p.socks = nil
	for _, r := range slices.Sorted(maps.Keys(ids)) {
		sock := "nvidia-" + strings.TrimPrefix(r, "nvidia.com/") + ".sock"
		path := filepath.Join(p.n.pluginDir, sock)
		p.socks = append(p.socks, path)
		_ = os.Remove(path)
		l, err := net.Listen("unix", path)
		if err != nil {
			return err
		}
		srv := grpc.NewServer()
		pluginapi.RegisterDevicePluginServer(srv, &endpoint{n: p.n, resource: r, ids: ids[r], stop: p.stop})
		go func() { _ = srv.Serve(l) }()
		p.servers = append(p.servers, srv)
		if err := deviceplugin.Register(ctx, filepath.Join(p.n.pluginDir, "kubelet.sock"), r, sock, &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true}); err != nil {
			return err
		}
	}
	klog.FromContext(ctx).V(2).Info("stand-in device plugin registered", "node", p.n.Name, "devices", ids)
	return nil
}

// socketsThere reports whether every endpoint's socket is still in the
// device-plugin directory.
func (p *plugin) socketsThere() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, sock := range p.socks {
		if _, err := os.Stat(sock); err != nil {
			return false
		}
	}
	return true
}

func (p *plugin) stopServersLocked() {
	for _, s := range p.servers {
		s.Stop()
	}
	p.servers = nil
}

// close stops the plugin: its streams end, and kubelet marks its devices
// unhealthy at once.
func (p *plugin) close() {
	p.stopped.Do(func() { close(p.stop) })
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopServersLocked()
}

// endpoint serves one resource.
type endpoint struct {
	pluginapi.UnimplementedDevicePluginServer
	n        *Node
	resource string
	ids      []string
	stop     chan struct{}
}

func (e *endpoint) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: true}, nil
}

// ListAndWatch sends the devices found at start, all healthy, once.
func (e *endpoint) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	devs := make([]*pluginapi.Device, 0, len(e.ids))
	for _, id := range e.ids {
		devs = append(devs, &pluginapi.Device{ID: id, Health: pluginapi.Healthy})
	}
	if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: devs}); err != nil {
		return err
	}
	select {
	case <-e.stop:
	case <-s.Context().Done():
	}
	return nil
}

// GetPreferredAllocation prefers a device a test pinned (Node.Prefer);
// otherwise it prefers nothing and kubelet picks.
func (e *endpoint) GetPreferredAllocation(_ context.Context, req *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	resp := &pluginapi.PreferredAllocationResponse{}
	for _, cr := range req.ContainerRequests {
		var ids []string
		if id := e.n.preferred(e.resource); id != "" && slices.Contains(cr.AvailableDeviceIDs, id) && cr.AllocationSize == 1 {
			ids = []string{id}
		}
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: ids})
	}
	return resp, nil
}

// Allocate names the devices as CDI devices; it neither checks nor
// creates anything, as NVIDIA's plugin does not. It answers after the
// node's allocate delay (SetAllocateDelay): meanwhile kubelet has chosen
// the devices but the pod is not in PodResources yet.
func (e *endpoint) Allocate(ctx context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(e.n.allocateDelay()):
	}
	resp := &pluginapi.AllocateResponse{}
	for _, cr := range req.ContainerRequests {
		e.n.allocated(e.resource, cr.DevicesIds)
		car := &pluginapi.ContainerAllocateResponse{}
		for _, id := range cr.DevicesIds {
			car.CdiDevices = append(car.CdiDevices, &pluginapi.CDIDevice{Name: cdiKind + "=" + id})
		}
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	return resp, nil
}

func (e *endpoint) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}
