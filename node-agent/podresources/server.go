package podresources

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"

	"google.golang.org/grpc"
	v1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// Server serves the PodResources v1 API as kubelet does, from state its
// owner sets: the stand-in for kubelet in tests and the local cluster.
type Server struct {
	v1.UnimplementedPodResourcesListerServer

	mu          sync.Mutex
	allocatable map[string][]string                       // resource → device IDs
	pods        map[string]map[string]map[string][]string // "ns/name" → container → resource → IDs
	lists       int                                       // List calls served
	getOff      bool                                      // Get answers as with KubeletPodResourcesGet off

	grpc *grpc.Server
}

// NewServer returns a server with nothing allocatable.
func NewServer() *Server {
	return &Server{allocatable: map[string][]string{}, pods: map[string]map[string]map[string][]string{}}
}

// Serve listens on the unix socket (replacing a stale one) until Stop.
func (s *Server) Serve(socket string) error {
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("removing stale socket %s: %w", socket, err)
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", socket, err)
	}
	s.mu.Lock()
	s.grpc = grpc.NewServer()
	v1.RegisterPodResourcesListerServer(s.grpc, s)
	g := s.grpc
	s.mu.Unlock()
	go func() { _ = g.Serve(l) }()
	return nil
}

// Stop stops serving.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc != nil {
		s.grpc.Stop()
	}
}

// SetAllocatable replaces the device IDs of a resource that kubelet holds
// healthy, which GetAllocatableResources serves: what the device plugin
// advertises while kubelet has it registered and healthy, none while the
// plugin is down. nil or empty removes the resource.
func (s *Server) SetAllocatable(resource string, ids []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(ids) == 0 {
		delete(s.allocatable, resource)
		return
	}
	s.allocatable[resource] = append([]string(nil), ids...)
}

// AddPod records an active pod ("namespace/name") and the containers
// kubelet lists for it (app containers and sidecars), with no devices yet:
// kubelet's List shows every active pod, with or without devices.
func (s *Server) AddPod(pod string, containers ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pods[pod] == nil {
		s.pods[pod] = map[string]map[string][]string{}
	}
	for _, c := range containers {
		if s.pods[pod][c] == nil {
			s.pods[pod][c] = map[string][]string{}
		}
	}
}

// Allocate records that a pod's container holds device IDs of a resource.
// kubelet lists app containers and restartable init containers (sidecars)
// only: its owner must not record devices of a regular init container
// here (they are allocated to the pod all the same).
func (s *Server) Allocate(pod, container, resource string, ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pods[pod] == nil {
		s.pods[pod] = map[string]map[string][]string{}
	}
	if s.pods[pod][container] == nil {
		s.pods[pod][container] = map[string][]string{}
	}
	s.pods[pod][container][resource] = append(s.pods[pod][container][resource], ids...)
}

// Release forgets a pod ("namespace/name"), as kubelet does once it is gone.
func (s *Server) Release(pod string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pods, pod)
}

// List implements the API.
func (s *Server) List(context.Context, *v1.ListPodResourcesRequest) (*v1.ListPodResourcesResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lists++
	out := &v1.ListPodResourcesResponse{}
	for _, key := range slices.Sorted(maps.Keys(s.pods)) {
		out.PodResources = append(out.PodResources, s.podLocked(key))
	}
	return out, nil
}

// Get implements the API.
func (s *Server) Get(_ context.Context, req *v1.GetPodResourcesRequest) (*v1.GetPodResourcesResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.getOff {
		return nil, errors.New("PodResources API Get method disabled")
	}
	key := req.GetPodNamespace() + "/" + req.GetPodName()
	if _, ok := s.pods[key]; !ok {
		return nil, fmt.Errorf("pod %s in namespace %s not found", req.GetPodName(), req.GetPodNamespace()) // as kubelet says it: no NotFound code
	}
	return &v1.GetPodResourcesResponse{PodResources: s.podLocked(key)}, nil
}

// Lists counts the List calls served: a List makes kubelet rebuild its
// set of allocated devices.
func (s *Server) Lists() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lists
}

// SwitchGetOff makes Get fail as kubelet's does with the feature gate
// KubeletPodResourcesGet off (beta, on by default, in 1.34 and 1.35).
func (s *Server) SwitchGetOff() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.getOff = true
}

// GetAllocatableResources implements the API. Like kubelet
// (containerDevicesFromResourceDeviceInstances), it sends one entry per
// device, not one per resource.
func (s *Server) GetAllocatableResources(context.Context, *v1.AllocatableResourcesRequest) (*v1.AllocatableResourcesResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := &v1.AllocatableResourcesResponse{}
	for _, r := range slices.Sorted(maps.Keys(s.allocatable)) {
		out.Devices = append(out.Devices, perDevice(r, s.allocatable[r])...)
	}
	return out, nil
}

// perDevice is kubelet's wire form of a resource's devices: one
// ContainerDevices per device ID.
func perDevice(resource string, ids []string) []*v1.ContainerDevices {
	out := make([]*v1.ContainerDevices, 0, len(ids))
	for _, id := range ids {
		out = append(out, &v1.ContainerDevices{ResourceName: resource, DeviceIds: []string{id}})
	}
	return out
}

func (s *Server) podLocked(key string) *v1.PodResources {
	ns, name, _ := strings.Cut(key, "/")
	pr := &v1.PodResources{Namespace: ns, Name: name}
	for _, c := range slices.Sorted(maps.Keys(s.pods[key])) {
		cr := &v1.ContainerResources{Name: c}
		for _, r := range slices.Sorted(maps.Keys(s.pods[key][c])) {
			cr.Devices = append(cr.Devices, perDevice(r, s.pods[key][c][r])...)
		}
		pr.Containers = append(pr.Containers, cr)
	}
	return pr
}
