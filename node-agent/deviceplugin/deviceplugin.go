// Package deviceplugin is the agent's own device plugin, for nodes in
// agent mode (devicePlugin: agent): it advertises the node's GPU resources
// to the kubelet through the v1beta1 device-plugin API — one endpoint per
// resource name, each registered once and kept registered with or without
// devices (a resource to retire gets an empty list, never an
// unregistration) — and sends each endpoint's complete device list again
// whenever the agent changes it. It registers again whenever the kubelet
// makes kubelet.sock anew (a starting kubelet deletes every plugin socket).
//
// Device IDs are MIG UUIDs (GPU UUIDs for whole GPUs). Allocate hands a
// container its devices as CDI names, whose specs the agent wrote before
// it advertised the devices, and as NVIDIA_VISIBLE_DEVICES for clusters
// without CDI. Allocate creates nothing and cannot fail for a device the
// plugin advertises: a slice is created before it is advertised.
package deviceplugin

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// DefaultDir is where the kubelet looks for device plugins.
const DefaultDir = pluginapi.DevicePluginPath

// CDIKind is the CDI kind ("vendor/class") of the agent's devices; a
// device's CDI name is CDIKind=<its ID> (CDIName).
const CDIKind = "dynamig.io/gpu"

// CDIName is the fully qualified CDI name of a device.
func CDIName(id string) string { return CDIKind + "=" + id }

// Device is a device as the plugin advertises it.
type Device struct {
	// ID is the kubelet's device ID: the MIG UUID, or the GPU UUID.
	ID string
	// CDIName is the fully qualified CDI device name ("vendor/class=name")
	// whose spec gives a container the device; empty for none.
	CDIName string
}

// Plugin serves the resources of one node.
type Plugin struct {
	dir string

	mu        sync.Mutex
	endpoints map[string]*endpoint // by resource name
	changed   chan struct{}        // a resource was added
	kubelet   KubeletState
	kubeletCh chan struct{} // signalled when kubelet changes
}

// KubeletState is what the plugin knows of the kubelet's restarts.
type KubeletState struct {
	// Gone: a ListAndWatch stream ended — the kubelet went away (or
	// dropped the plugin) — and the plugin has not registered every
	// resource with a kubelet since.
	Gone bool
	// Back is when the plugin last finished registering every resource
	// with a kubelet after one had gone or made kubelet.sock anew; zero if
	// that has not happened since the plugin started.
	Back time.Time
}

// New returns a plugin that serves in dir (DefaultDir on a node).
func New(dir string) *Plugin {
	return &Plugin{dir: dir, endpoints: map[string]*endpoint{}, changed: make(chan struct{}, 1), kubeletCh: make(chan struct{}, 1)}
}

// Kubelet says what the plugin knows of the kubelet's restarts.
func (p *Plugin) Kubelet() KubeletState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kubelet
}

// KubeletChanged is signalled whenever Kubelet's answer changes.
func (p *Plugin) KubeletChanged() <-chan struct{} { return p.kubeletCh }

// setKubelet changes the kubelet state and signals KubeletChanged.
func (p *Plugin) setKubelet(change func(*KubeletState)) {
	p.mu.Lock()
	change(&p.kubelet)
	p.mu.Unlock()
	select {
	case p.kubeletCh <- struct{}{}:
	default:
	}
}

// Set makes devs the devices of each resource it names, and sends every
// changed list on its ListAndWatch streams. A resource not served yet is
// served and registered by Run; a resource served already and not in devs
// keeps its devices. Set(r, nil) withdraws every device of r.
func (p *Plugin) Set(devs map[string][]Device) {
	p.mu.Lock()
	defer p.mu.Unlock()
	added := false
	for r, list := range devs {
		e, ok := p.endpoints[r]
		if !ok {
			e = &endpoint{resource: r, update: make(chan struct{}), ended: p.streamEnded}
			p.endpoints[r] = e
			added = true
		}
		e.set(list)
	}
	if added {
		select {
		case p.changed <- struct{}{}:
		default:
		}
	}
}

// kubeletPoll is how often Run looks for a new kubelet.sock. A restarted
// kubelet admits the pods already on its node again about a second after
// it opens kubelet.sock, and fails any whose resource has no registered
// plugin by then (UnexpectedAdmissionError) — running pods included once
// its sources are ready: plugins must be back well within that second.
const kubeletPoll = 100 * time.Millisecond

// retryEvery spaces the retries of a failed registration (and its log).
const retryEvery = time.Second

// streamEnded marks the kubelet gone: it keeps a ListAndWatch stream
// open to every registered resource while it runs.
func (p *Plugin) streamEnded() {
	p.setKubelet(func(k *KubeletState) { k.Gone = true })
}

// Run serves every resource and registers it with the kubelet until ctx
// ends: a new resource as soon as Set names it, all of them again when
// kubelet.sock is made anew. A failed registration is retried. Once every
// resource is registered again after the kubelet went or restarted,
// Kubelet says since when.
func (p *Plugin) Run(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	kubeletSock := filepath.Join(p.dir, filepath.Base(pluginapi.KubeletSocket))
	registered := map[string]bool{}
	failed := map[string]time.Time{} // when a resource's registration last failed
	var seen os.FileInfo
	restarted := false // kubelet.sock was made anew: a new kubelet to register with
	lost := false      // a stream ended: every resource registers again
	defer p.stopAll()
	for {
		st, err := os.Stat(kubeletSock)
		if err == nil && (seen == nil || !os.SameFile(st, seen) || !st.ModTime().Equal(seen.ModTime())) {
			if seen != nil {
				logger.Info("kubelet.sock was made anew: registering every resource again")
				restarted = true
			}
			seen, registered, failed = st, map[string]bool{}, map[string]time.Time{}
		}
		if p.Kubelet().Gone && !lost {
			// The kubelet dropped the plugin (it stopped, or ended a
			// stream): it uses none of its endpoints until they register
			// again, which fails until a kubelet listens.
			logger.Info("the kubelet closed a device-plugin stream: registering every resource again")
			lost, registered = true, map[string]bool{}
		}
		if err == nil {
			all := true
			for _, e := range p.snapshot() {
				// A starting kubelet deletes every socket in the directory
				// (the new kubelet.sock may even reuse the old one's inode).
				if _, err := os.Stat(filepath.Join(p.dir, SocketName(e.resource))); err != nil {
					registered[e.resource] = false
				}
				if registered[e.resource] {
					continue
				}
				all = false
				if time.Since(failed[e.resource]) < retryEvery {
					continue
				}
				if err := p.serve(ctx, e, kubeletSock); err != nil {
					failed[e.resource] = time.Now()
					logger.Error(err, "Registering a resource with the kubelet; retrying", "resource", e.resource, "in", retryEvery)
					continue
				}
				registered[e.resource] = true
				logger.V(2).Info("Registered with the kubelet", "resource", e.resource)
			}
			if all && (restarted || lost) {
				restarted, lost = false, false
				p.setKubelet(func(k *KubeletState) { *k = KubeletState{Back: time.Now()} })
				logger.Info("Every resource is registered with the kubelet again")
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-p.changed:
		case <-time.After(kubeletPoll):
		}
	}
}

func (p *Plugin) snapshot() []*endpoint {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*endpoint, 0, len(p.endpoints))
	for _, r := range slices.Sorted(maps.Keys(p.endpoints)) {
		out = append(out, p.endpoints[r])
	}
	return out
}

func (p *Plugin) stopAll() {
	for _, e := range p.snapshot() {
		e.stopServer()
	}
}

// SocketName is the socket file of a resource's endpoint.
func SocketName(resource string) string {
	return "dynamig-" + strings.NewReplacer("/", "-", ".", "-").Replace(resource) + ".sock"
}

// serve (re)starts a resource's gRPC server on its socket and registers it.
func (p *Plugin) serve(ctx context.Context, e *endpoint, kubeletSock string) error {
	sock := SocketName(e.resource)
	path := filepath.Join(p.dir, sock)
	e.stopServer()
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, e)
	go func() { _ = srv.Serve(l) }()
	e.mu.Lock()
	e.server = srv
	e.mu.Unlock()
	return Register(ctx, kubeletSock, e.resource, sock, &pluginapi.DevicePluginOptions{})
}

// Register registers a device-plugin endpoint (a socket file name in the
// kubelet's device-plugin directory) for a resource with the kubelet.
func Register(ctx context.Context, kubeletSock, resource, endpoint string, options *pluginapi.DevicePluginOptions) error {
	conn, err := grpc.NewClient("unix://"+kubeletSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resource, Options: options,
	})
	if err != nil {
		return fmt.Errorf("registering %s with the kubelet at %s: %w", resource, kubeletSock, err)
	}
	return nil
}

// endpoint serves one resource.
type endpoint struct {
	pluginapi.UnimplementedDevicePluginServer
	resource string

	mu      sync.Mutex
	devices []Device
	update  chan struct{} // closed and replaced when devices change
	server  *grpc.Server
	stops   int    // how often stopServer ran
	ended   func() // a ListAndWatch stream ended, its server not stopped by the plugin
}

func (e *endpoint) set(devs []Device) {
	devs = slices.Clone(devs)
	slices.SortFunc(devs, func(a, b Device) int { return strings.Compare(a.ID, b.ID) })
	e.mu.Lock()
	defer e.mu.Unlock()
	if slices.Equal(devs, e.devices) && e.devices != nil {
		return
	}
	if devs == nil {
		devs = []Device{}
	}
	e.devices = devs
	close(e.update)
	e.update = make(chan struct{})
}

func (e *endpoint) snapshot() ([]Device, chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.devices, e.update
}

func (e *endpoint) stopCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stops
}

func (e *endpoint) stopServer() {
	e.mu.Lock()
	srv := e.server
	e.server = nil
	e.stops++
	e.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
}

func (e *endpoint) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

// ListAndWatch sends the complete device list, all healthy, at once and
// after every change. The kubelet keeps the stream open while it runs:
// when it ends, the kubelet is gone (ended).
func (e *endpoint) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	stops := e.stopCount()
	defer func() {
		if e.stopCount() == stops { // not the plugin's own restart of the server
			e.ended()
		}
	}()
	for {
		devs, update := e.snapshot()
		resp := &pluginapi.ListAndWatchResponse{Devices: make([]*pluginapi.Device, 0, len(devs))}
		for _, d := range devs {
			resp.Devices = append(resp.Devices, &pluginapi.Device{ID: d.ID, Health: pluginapi.Healthy})
		}
		if err := s.Send(resp); err != nil {
			return err
		}
		select {
		case <-update:
		case <-s.Context().Done():
			return nil
		}
	}
}

// errNotAdvertised is Allocate's answer for a device the plugin does not
// advertise (any more): kubelet then fails the pod's admission.
var errNotAdvertised = errors.New("not advertised by dynamig's device plugin")

// Allocate names the devices: their CDI names, and NVIDIA_VISIBLE_DEVICES
// for runtimes without CDI.
func (e *endpoint) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	devs, _ := e.snapshot()
	byID := map[string]Device{}
	for _, d := range devs {
		byID[d.ID] = d
	}
	resp := &pluginapi.AllocateResponse{}
	for _, cr := range req.ContainerRequests {
		car := &pluginapi.ContainerAllocateResponse{}
		for _, id := range cr.DevicesIds {
			d, ok := byID[id]
			if !ok {
				return nil, fmt.Errorf("%s device %s: %w", e.resource, id, errNotAdvertised)
			}
			if d.CDIName != "" {
				car.CdiDevices = append(car.CdiDevices, &pluginapi.CDIDevice{Name: d.CDIName})
			}
		}
		car.Envs = map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(cr.DevicesIds, ",")}
		resp.ContainerResponses = append(resp.ContainerResponses, car)
	}
	return resp, nil
}

func (e *endpoint) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}
