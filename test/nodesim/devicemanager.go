package nodesim

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	resourcehelper "k8s.io/component-helpers/resource"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
)

// This file is kubelet's device manager and admission, as in k8s.io/kubernetes
// v1.37.2 pkg/kubelet/cm/devicemanager/manager.go (ManagerImpl) and
// pkg/kubelet/lifecycle/predicate.go; function names below are theirs.

// endpointStopGracePeriod is how long kubelet keeps the resource of a
// plugin that went away (devicemanager/endpoint.go).
var endpointStopGracePeriod = 5 * time.Minute // a variable for tests; a Node reads it at Start

// endpoint is kubelet's state of one device-plugin resource: its
// endpoints entry and its healthyDevices and unhealthyDevices sets.
type endpoint struct {
	healthy   []string  // the plugin advertised them Healthy and is connected
	unhealthy []string  // its plugin went away (markResourceUnhealthy)
	stopped   time.Time // when its plugin went away; zero while connected
	// removed: its plugin stayed away past endpointStopGracePeriod and
	// GetCapacity dropped it; the Node lists it with capacity 0 for good.
	removed bool
}

// nodeStatus is the MIG part of Node capacity and allocatable.
type nodeStatus struct {
	capacity, allocatable map[string]int64
}

func (s nodeStatus) equal(o nodeStatus) bool {
	return maps.Equal(s.capacity, o.capacity) && maps.Equal(s.allocatable, o.allocatable)
}

// register is the plugin of pod uid registering its resources and sending
// their first ListAndWatch (PluginConnected, genericDeviceUpdateCallback):
// each registered resource's devices are replaced by the advertised ones,
// all healthy. A resource it does not register keeps its state: unhealthy
// since the previous plugin went, and dropped after the grace period. A
// plugin whose pod went before it registered registers nothing.
func (n *Node) register(uid types.UID, ids map[string][]string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if uid == "" || uid != n.pluginUID {
		return
	}
	n.registeredUID = uid
	n.advertiseLocked(ids)
}

// pluginStopped is kubelet losing the plugin of pod uid, whose container
// it stops as soon as the pod is deleted: PluginDisconnected, and
// markResourceUnhealthy for each of its resources. All their devices are
// unhealthy at once: GetAllocatableResources lists none of them, Node
// allocatable drops to 0 at the next status tick while capacity stays,
// and admitting a pod that asks for one fails until the next plugin
// registers.
func (n *Node) pluginStopped(uid types.UID) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if uid == "" {
		return
	}
	if uid == n.pluginUID {
		n.pluginUID = ""
	}
	if uid != n.registeredUID {
		return
	}
	n.registeredUID = ""
	now := time.Now()
	for r, e := range n.endpoints {
		if !e.stopped.IsZero() || e.removed {
			continue
		}
		e.unhealthy, e.healthy, e.stopped = append(e.unhealthy, e.healthy...), nil, now
		n.server.SetAllocatable(r, nil)
	}
	n.statusChanged()
	if n.opts.StatusUpdatePeriod < 0 { // no ticks: write the drop when it is due
		time.AfterFunc(n.gracePeriod+time.Millisecond, func() {
			n.mu.Lock()
			defer n.mu.Unlock()
			n.statusChanged()
		})
	}
}

// capacityLocked is what kubelet writes to the Node at a status tick
// (GetCapacity, and nodestatus.MachineInfo in pkg/kubelet/nodestatus/
// setters.go): capacity counts healthy and unhealthy devices, allocatable
// the healthy ones; a resource whose plugin has been gone longer than
// endpointStopGracePeriod is dropped and reads capacity 0 from then on;
// resources the Node lists already keep their key. Callers hold n.mu.
func (n *Node) capacityLocked(now time.Time) nodeStatus {
	out := nodeStatus{capacity: maps.Clone(n.nodeStatus.capacity), allocatable: map[string]int64{}}
	if out.capacity == nil {
		out.capacity = map[string]int64{}
	}
	for r, e := range n.endpoints {
		if !e.removed && !e.stopped.IsZero() && now.Sub(e.stopped) > n.gracePeriod {
			e.removed, e.unhealthy = true, nil
		}
		if e.removed {
			out.capacity[r] = 0
			continue
		}
		out.capacity[r] = int64(len(e.healthy) + len(e.unhealthy))
		out.allocatable[r] = int64(len(e.healthy))
	}
	for r, c := range out.capacity {
		if _, ok := out.allocatable[r]; !ok {
			out.allocatable[r] = c
		}
	}
	return out
}

// statusChanged says that the device manager changed; with a negative
// StatusUpdatePeriod the Node is written at once. Callers hold n.mu.
func (n *Node) statusChanged() {
	if n.opts.StatusUpdatePeriod < 0 {
		select {
		case n.kick <- struct{}{}:
		default:
		}
	}
}

// statusLoop writes Node capacity and allocatable at kubelet's status
// ticks, every StatusUpdatePeriod from a random phase (or, with a negative
// period, at every change).
func (n *Node) statusLoop(ctx context.Context, phase time.Duration) {
	logger := klog.FromContext(ctx)
	var t *time.Timer
	if n.opts.StatusUpdatePeriod >= 0 {
		t = time.NewTimer(phase)
		defer t.Stop()
	}
	for {
		var tick <-chan time.Time
		if t != nil {
			tick = t.C
		}
		select {
		case <-ctx.Done():
			return
		case <-n.kick: // only with a negative period (statusChanged)
		case <-tick:
			t.Reset(n.opts.StatusUpdatePeriod)
		}
		if err := n.writeNodeStatus(ctx); err != nil && ctx.Err() == nil {
			logger.Error(err, "simulated kubelet: node status", "node", n.Name)
			if t == nil { // no tick will come: ask again
				time.Sleep(100 * time.Millisecond)
				n.mu.Lock()
				n.statusChanged()
				n.mu.Unlock()
			}
		}
	}
}

// writeNodeStatus writes the device manager's capacity and allocatable to
// the Node if they changed.
func (n *Node) writeNodeStatus(ctx context.Context) error {
	n.mu.Lock()
	want := n.capacityLocked(time.Now())
	same := want.equal(n.nodeStatus)
	n.mu.Unlock()
	if same {
		return nil
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := n.cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if node.Status.Capacity == nil {
			node.Status.Capacity = v1.ResourceList{}
		}
		if node.Status.Allocatable == nil {
			node.Status.Allocatable = v1.ResourceList{}
		}
		for r, q := range want.capacity {
			node.Status.Capacity[v1.ResourceName(r)] = *resource.NewQuantity(q, resource.DecimalSI)
		}
		for r, q := range want.allocatable {
			node.Status.Allocatable[v1.ResourceName(r)] = *resource.NewQuantity(q, resource.DecimalSI)
		}
		_, err = n.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("writing the status of node %s: %w", n.Name, err)
	}
	n.mu.Lock()
	n.nodeStatus = want
	n.mu.Unlock()
	return nil
}

// allocatedLocked is kubelet's allocatedDevices: per resource, the
// devices active pods hold, including devices no plugin advertises any
// more (kubelet keeps them allocated to their pods). Callers hold n.mu.
func (n *Node) allocatedLocked() map[string]map[string]bool {
	out := map[string]map[string]bool{}
	for _, ps := range n.pods {
		if !ps.active() {
			continue
		}
		for _, byRes := range ps.devices {
			for r, ids := range byRes {
				for _, id := range ids {
					if out[r] == nil {
						out[r] = map[string]bool{}
					}
					out[r][id] = true
				}
			}
		}
	}
	return out
}

// allocateLocked is kubelet's device allocation at admission
// (ManagerImpl.Allocate for each init container, then each app container,
// and allocateContainerResources for each resource in its limits): the
// devices of each container, by resource. A regular init container's
// devices are reused by the containers after it; a sidecar's and an app
// container's are its own (devicesToReuse). The error is kubelet's, for
// the resource named. Callers hold n.mu.
func (n *Node) allocateLocked(pod *v1.Pod) (map[string]map[string][]string, string, error) {
	inUse := n.allocatedLocked()
	pinned := map[string]bool{}
	for _, id := range strings.Split(pod.Annotations[DevicesAnnotation], ",") {
		if id = strings.TrimSpace(id); id != "" {
			pinned[id] = true
		}
	}
	reuse := map[string]map[string]bool{}
	out := map[string]map[string][]string{}
	for i, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
		regularInit := i < len(pod.Spec.InitContainers) && !isSidecar(&c)
		for _, name := range slices.Sorted(maps.Keys(c.Resources.Limits)) {
			r, q := string(name), c.Resources.Limits[name]
			e := n.endpoints[r]
			// isDevicePluginResource: registered, or allocated before.
			if !mig.IsMIGResource(r) || ((e == nil || e.removed) && len(inUse[r]) == 0) {
				continue
			}
			ids, err := n.devicesToAllocateLocked(r, int(q.Value()), reuse[r], inUse[r], pinned)
			if err != nil {
				return nil, r, err
			}
			if len(ids) == 0 {
				continue
			}
			if out[c.Name] == nil {
				out[c.Name] = map[string][]string{}
			}
			out[c.Name][r] = ids
			if inUse[r] == nil {
				inUse[r] = map[string]bool{}
			}
			for _, id := range ids {
				inUse[r][id] = true
				if regularInit {
					if reuse[r] == nil {
						reuse[r] = map[string]bool{}
					}
					reuse[r][id] = true
				} else {
					delete(reuse[r], id)
				}
			}
		}
	}
	return out, "", nil
}

// isSidecar reports a restartable init container.
func isSidecar(c *v1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == v1.ContainerRestartPolicyAlways
}

// devicesToAllocateLocked is kubelet's devicesToAllocate for one
// container and resource: fail for a resource no plugin has registered
// (or that was dropped), or without any healthy device (its plugin is
// down, kubelet's restart window); take the pod's reusable devices first;
// then free healthy devices in no particular order. kubelet takes them
// from unordered sets, or asks the plugin (GetPreferredAllocation); the
// NVIDIA plugin's distributedAlloc for MIG devices ranks every candidate
// equal and takes them in Go map order. So the choice is pseudo-random
// here, from the node's seed. Callers hold n.mu.
func (n *Node) devicesToAllocateLocked(r string, required int, reusable, inUse, pinned map[string]bool) ([]string, error) {
	e := n.endpoints[r]
	if e == nil || e.removed {
		return nil, fmt.Errorf("cannot allocate unregistered device %s", r)
	}
	if len(e.healthy) == 0 {
		return nil, fmt.Errorf("no healthy devices present; cannot allocate unhealthy devices %s", r)
	}
	needed := required
	var got []string
	for _, id := range n.shuffleLocked(slices.Sorted(maps.Keys(reusable))) {
		if needed == 0 {
			break
		}
		got = append(got, id)
		needed--
	}
	if needed <= 0 {
		return got, nil
	}
	var available []string
	for _, id := range e.healthy {
		if !inUse[id] && !slices.Contains(got, id) && (len(pinned) == 0 || pinned[id]) {
			available = append(available, id)
		}
	}
	if len(available) < needed {
		return nil, fmt.Errorf("requested number of devices unavailable for %s. Requested: %d, Available: %d", r, needed, len(available))
	}
	slices.Sort(available)
	return append(got, n.shuffleLocked(available)[:needed]...), nil
}

// shuffleLocked permutes ids with the node's random source. Callers hold n.mu.
func (n *Node) shuffleLocked(ids []string) []string {
	n.rng.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	return ids
}

// fitsLocked is kubelet's predicate admission after the device manager
// allocated (predicateAdmitHandler.Admit): Node allocatable is raised to
// the devices kubelet has allocated if this pod got any
// (UpdatePluginResources, sanitizeNodeAllocatable); a MIG resource the
// Node does not list is dropped from the pod (removeMissingExtendedResources:
// the pod runs without it); for the others the pod's request and those of
// the active pods must fit. It returns the resource that does not fit and
// kubelet's message, and the resources dropped. Callers hold n.mu.
func (n *Node) fitsLocked(requests map[string]int64, devices map[string]map[string][]string) (string, string, []string) {
	allocated := n.allocatedLocked()
	for _, byRes := range devices {
		for r, ids := range byRes {
			if allocated[r] == nil {
				allocated[r] = map[string]bool{}
			}
			for _, id := range ids {
				allocated[r][id] = true
			}
		}
	}
	var dropped []string
	for _, r := range slices.Sorted(maps.Keys(requests)) {
		capacity, listed := n.nodeStatus.allocatable[r]
		if len(devices) > 0 && int64(len(allocated[r])) > capacity {
			capacity, listed = int64(len(allocated[r])), true
		}
		if !listed {
			dropped = append(dropped, r)
			continue
		}
		var used int64
		for _, ps := range n.pods {
			if ps.active() {
				used += ps.requests[r]
			}
		}
		if used+requests[r] > capacity {
			return r, fmt.Sprintf("Node didn't have enough resource: %s, requested: %d, used: %d, capacity: %d", r, requests[r], used, capacity), dropped
		}
	}
	return "", "", dropped
}

// requests is the pod's MIG request by resource name, as kubelet's
// predicates count it: demand.Of, the one function for a pod's MIG demand.
// kubelet does not parse resource names: a MIG resource that names no
// profile is counted as it stands (PodRequests).
func requests(pod *v1.Pod) map[string]int64 {
	out := map[string]int64{}
	if d, err := demand.Of(pod); err == nil {
		for prof, n := range d {
			out[prof.ResourceName()] = int64(n)
		}
		return out
	}
	for r, q := range resourcehelper.PodRequests(pod, resourcehelper.PodResourcesOptions{}) {
		if mig.IsMIGResource(string(r)) && !q.IsZero() {
			out[string(r)] = q.Value()
		}
	}
	return out
}

// admit is kubelet admitting a pod bound to the node (HandlePodAdditions):
// the device manager allocates each container's devices, then the
// predicates check resources. A rejected pod is Failed for good, as
// kubelet's rejectPod writes it: UnexpectedAdmissionError when the device
// manager fails ("Allocate failed due to …, which is unexpected",
// admission.GetPodAdmitResult), OutOf<resource> when a predicate does. An
// admitted pod's containers start.
func (n *Node) admit(ctx context.Context, pod *v1.Pod) error {
	key := pod.Namespace + "/" + pod.Name
	now := time.Now()
	n.mu.Lock()
	ps := newPodState(key, pod, now)
	devices, failed, err := n.allocateLocked(pod)
	if err != nil {
		n.rejectLocked(ps, failed, "UnexpectedAdmissionError", fmt.Sprintf("Allocate failed due to %v, which is unexpected", err))
	} else if r, msg, dropped := n.fitsLocked(ps.requests, devices); r != "" {
		n.rejectLocked(ps, r, "OutOf"+r, msg)
	} else {
		for _, r := range dropped {
			n.failures = append(n.failures, Failure{Time: now, Kind: FailureNoDevice, Pod: key, Resource: r, Reason: "Admitted",
				Message: fmt.Sprintf("admitted without a device of %s: neither a device plugin nor the Node knows it", r)})
		}
		n.pods[key] = ps
		n.acceptLocked(ps, pod, devices)
	}
	n.pods[key] = ps
	n.mu.Unlock()
	klog.FromContext(ctx).V(2).Info("simulated kubelet: admission", "node", n.Name, "pod", key, "admitted", ps.active(), "devices", ps.byResource())
	return n.writePodStatus(ctx, pod, ps)
}

// rejectLocked fails a pod at admission and records it. Callers hold n.mu.
func (n *Node) rejectLocked(ps *podState, r, reason, msg string) {
	ps.rejected = &v1.PodStatus{Phase: v1.PodFailed, Reason: reason, Message: "Pod was rejected: " + msg}
	n.failures = append(n.failures, Failure{Time: ps.start, Kind: FailureAdmission, Pod: ps.key, Resource: r, Reason: reason, Message: ps.rejected.Message})
}

// acceptLocked gives an admitted pod its devices (holds, PodResources:
// its sidecars and app containers, as kubelet's List shows them) and
// starts its containers. Callers hold n.mu.
func (n *Node) acceptLocked(ps *podState, pod *v1.Pod, devices map[string]map[string][]string) {
	ps.devices = devices
	for r, ids := range ps.byResource() {
		for _, id := range ids {
			n.holds = append(n.holds, Hold{Device: id, Pod: ps.key, Resource: r, From: ps.start})
		}
	}
	var listed []string
	for _, c := range ps.ctrs {
		if c.kind != regularInit {
			listed = append(listed, c.name)
		}
	}
	n.server.AddPod(ps.key, listed...)
	for _, c := range ps.ctrs {
		if c.kind == regularInit {
			continue // kubelet's List leaves regular init containers out
		}
		for r, ids := range devices[c.name] {
			n.server.Allocate(ps.key, c.name, r, ids...)
		}
	}
	for _, c := range ps.ctrs {
		for _, ids := range devices[c.name] {
			c.devices = append(c.devices, ids...)
		}
		slices.Sort(c.devices)
	}
	n.advanceLocked(ps)
}

// state is the pod's state if kubelet knows this pod (same UID); an
// older pod of the same name is forgotten.
func (n *Node) state(ctx context.Context, key string, uid types.UID) *podState {
	n.mu.Lock()
	defer n.mu.Unlock()
	ps := n.pods[key]
	if ps != nil && ps.uid != uid {
		n.releaseLocked(ctx, ps)
		delete(n.pods, key)
		return nil
	}
	return ps
}

// forget releases a pod that is going or gone (uid "": any) and forgets it.
func (n *Node) forget(ctx context.Context, key string, uid types.UID) {
	n.mu.Lock()
	defer n.mu.Unlock()
	ps := n.pods[key]
	if ps == nil || (uid != "" && ps.uid != uid) {
		return
	}
	n.releaseLocked(ctx, ps)
	delete(n.pods, key)
}

// releaseLocked stops a pod's processes and frees its devices, as kubelet
// does once the pod is no longer active (terminal or gone). Callers hold n.mu.
func (n *Node) releaseLocked(ctx context.Context, ps *podState) {
	if ps.done || ps.rejected != nil {
		ps.done = true
		return
	}
	ps.done = true
	for _, c := range ps.ctrs {
		c.gen++
		n.stopProcessesLocked(ps, c)
	}
	now := time.Now()
	for i := range n.holds {
		if n.holds[i].Pod == ps.key && n.holds[i].To.IsZero() {
			n.holds[i].To = now
		}
	}
	n.server.Release(ps.key)
	klog.FromContext(ctx).V(3).Info("simulated kubelet: released", "node", n.Name, "pod", ps.key)
}
