// Package podresources reads, and for tests and the local cluster serves,
// the kubelet PodResources v1 gRPC API: which device IDs kubelet has
// allocated to which pods, and which it can allocate. The agent asks it
// before destroying a MIG slice.
package podresources

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	v1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// DefaultSocket is where kubelet serves the API.
const DefaultSocket = "/var/lib/kubelet/pod-resources/kubelet.sock"

// Client talks to kubelet's PodResources API on its unix socket.
type Client struct {
	conn    *grpc.ClientConn
	api     v1.PodResourcesListerClient
	socket  string
	timeout time.Duration
	stop    context.CancelFunc

	mu       sync.Mutex
	restarts Restarts
	changed  chan struct{} // signalled when restarts changes
}

// Restarts is what the client knows of the kubelet's restarts.
type Restarts struct {
	// Gone: the connection to kubelet, once made, was lost (kubelet closed
	// it: it stopped or restarts), and has not been made again.
	Gone bool
	// Back is when the connection was last made again after it was lost;
	// zero if it never was.
	Back time.Time
}

// Dial prepares a client for the socket; it connects on first use, so a
// kubelet that is not up yet is an error of Devices, not of Dial. It
// watches the connection until Close (Restarts): when kubelet goes, it
// reconnects at once and then every 0.1–1 s, not at gRPC's default
// backoff (up to 2 min), so that it sees kubelet back within a second.
func Dial(socket string, timeout time.Duration) (*Client, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithIdleTimeout(0), // an idle channel is not a lost kubelet
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}}))
	if err != nil {
		return nil, fmt.Errorf("kubelet PodResources API at %s: %w", socket, err)
	}
	ctx, stop := context.WithCancel(context.Background())
	c := &Client{conn: conn, api: v1.NewPodResourcesListerClient(conn), socket: socket, timeout: timeout, stop: stop,
		changed: make(chan struct{}, 1)}
	go c.watch(ctx)
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	c.stop()
	return c.conn.Close()
}

// Restarts says what the client knows of the kubelet's restarts.
func (c *Client) Restarts() Restarts {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.restarts
}

// RestartsChanged is signalled whenever Restarts' answer changes.
func (c *Client) RestartsChanged() <-chan struct{} { return c.changed }

// watch follows the connection's state: a connection that leaves Ready
// was lost (kubelet closed it); one Ready again is kubelet back.
func (c *Client) watch(ctx context.Context) {
	ready := false
	for {
		st := c.conn.GetState()
		switch {
		case st == connectivity.Ready && !ready:
			ready = true
			if c.Restarts().Gone {
				c.setRestarts(Restarts{Back: time.Now()})
			}
		case st != connectivity.Ready && ready:
			ready = false
			c.setRestarts(Restarts{Gone: true, Back: c.Restarts().Back})
			c.conn.Connect()
		case st == connectivity.Idle && c.Restarts().Gone:
			c.conn.Connect()
		}
		if !c.conn.WaitForStateChange(ctx, st) {
			return
		}
	}
}

func (c *Client) setRestarts(r Restarts) {
	c.mu.Lock()
	c.restarts = r
	c.mu.Unlock()
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// Devices is kubelet's view of the devices of the resources asked for.
type Devices struct {
	// Used maps a device ID to the pod ("namespace/name") holding it.
	Used map[string]string
	// Allocatable holds, per resource name, the device IDs kubelet can
	// allocate (Client.Allocatable).
	Allocatable map[string][]string
	// Pods holds every pod ("namespace/name") kubelet lists: those it
	// admitted, with devices or without.
	Pods map[string]bool
}

// Devices lists the pods kubelet knows (those it admitted or is
// admitting), and the allocated and allocatable device IDs of the
// resources whose names start with prefix ("nvidia.com/mig-"). IDs are as
// the device plugin advertised them, without a "::n" replica suffix.
//
// With pods nil it asks with List. Otherwise it asks about those pods
// ("namespace/name") only, with one Get each: List makes kubelet rebuild
// its set of allocated devices from the pods whose Allocate returned
// (devicemanager UpdateAllocatedDevices, k8s.io/kubernetes v1.37.2), so a
// List while a pod's Allocate is in flight can free that pod's devices for
// the next pod. Get does not rebuild it. A kubelet whose Get is switched
// off (feature gate KubeletPodResourcesGet) is asked with List.
func (c *Client) Devices(ctx context.Context, prefix string, pods []string) (Devices, error) {
	list, err := c.podResources(ctx, pods)
	if err != nil {
		return Devices{}, fmt.Errorf("listing pod resources from kubelet at %s: %w", c.socket, err)
	}
	allocatable, err := c.Allocatable(ctx, prefix)
	if err != nil {
		return Devices{}, err
	}
	d := Devices{Used: map[string]string{}, Allocatable: allocatable, Pods: map[string]bool{}}
	for _, pod := range list {
		d.Pods[pod.GetNamespace()+"/"+pod.GetName()] = true
		for _, ctr := range pod.GetContainers() {
			for _, dev := range ctr.GetDevices() {
				if strings.HasPrefix(dev.GetResourceName(), prefix) {
					for _, id := range dev.GetDeviceIds() {
						d.Used[baseID(id)] = pod.GetNamespace() + "/" + pod.GetName()
					}
				}
			}
		}
	}
	return d, nil
}

// podResources is List, or Get for each of pods when pods is not nil and
// kubelet serves Get; a pod kubelet does not know is left out.
func (c *Client) podResources(ctx context.Context, pods []string) ([]*v1.PodResources, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if pods != nil {
		out := make([]*v1.PodResources, 0, len(pods))
		for _, key := range pods {
			ns, name, _ := strings.Cut(key, "/")
			got, err := c.api.Get(ctx, &v1.GetPodResourcesRequest{PodNamespace: ns, PodName: name})
			switch {
			case err == nil:
				out = append(out, got.GetPodResources())
			case podUnknown(err):
			case getOff(err):
				return c.list(ctx)
			default:
				return nil, err
			}
		}
		return out, nil
	}
	return c.list(ctx)
}

func (c *Client) list(ctx context.Context) ([]*v1.PodResources, error) {
	list, err := c.api.List(ctx, &v1.ListPodResourcesRequest{})
	return list.GetPodResources(), err
}

// getOff reports whether a Get failed because kubelet does not serve it:
// the feature gate KubeletPodResourcesGet off ("PodResources API Get
// method disabled", 1.34 and 1.35), or an API without the method. Any
// other failure is an error, not a reason to List.
func getOff(err error) bool {
	s := status.Convert(err)
	return s.Code() == codes.Unimplemented || s.Code() == codes.Unknown && s.Message() == "PodResources API Get method disabled"
}

// podUnknown reports whether a Get failed because kubelet does not know the
// pod: kubelet says so in a plain error ("pod %s in namespace %s not
// found"), not a NotFound code.
func podUnknown(err error) bool {
	s := status.Convert(err)
	return s.Code() == codes.Unknown && strings.HasPrefix(s.Message(), "pod ") && strings.HasSuffix(s.Message(), " not found")
}

// Allocatable is kubelet's GetAllocatableResources for the resources whose
// names start with prefix: the device IDs, per resource name, that kubelet
// holds healthy from the device plugins now, allocated or not, sorted,
// without "::n" replica suffixes. It is what kubelet can hand to a pod at
// admission: a device the plugin no longer advertises, or one of a plugin
// that is down (kubelet marks all its devices unhealthy), is not in it. A
// resource without healthy devices is absent.
func (c *Client) Allocatable(ctx context.Context, prefix string) (map[string][]string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	alloc, err := c.api.GetAllocatableResources(ctx, &v1.AllocatableResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("listing allocatable resources from kubelet at %s: %w", c.socket, err)
	}
	sets := map[string]map[string]bool{}
	for _, dev := range alloc.GetDevices() {
		r := dev.GetResourceName()
		if !strings.HasPrefix(r, prefix) {
			continue
		}
		// kubelet sends one entry per device (and NUMA node), not one per
		// resource: collect them all.
		for _, id := range dev.GetDeviceIds() {
			if sets[r] == nil {
				sets[r] = map[string]bool{}
			}
			sets[r][baseID(id)] = true
		}
	}
	out := map[string][]string{}
	for r, ids := range sets {
		out[r] = slices.Sorted(maps.Keys(ids))
	}
	return out, nil
}

// baseID strips the "::n" suffix of a shared (time-sliced or MPS) replica.
func baseID(id string) string {
	if i := strings.Index(id, "::"); i >= 0 {
		return id[:i]
	}
	return id
}
