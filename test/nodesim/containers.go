package nodesim

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
)

// This file is the container runtime with the NVIDIA container toolkit,
// and kubelet's container restarts and pod phase (pkg/kubelet/
// kubelet_pods.go getPhase).

// Back-off of kubelet's container restarts (its defaults).
const (
	backOffBase = 10 * time.Second
	backOffMax  = 300 * time.Second
)

// startErrorFormat is how containerd reports a container whose MIG device
// the NVIDIA runtime hook cannot find (nvidia-container-cli, legacy mode);
// the CDI path fails as "unresolvable CDI devices" instead.
const startErrorFormat = "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: " +
	"unable to start container process: error during container init: error running prestart hook #0: exit status 1, stdout: , " +
	"stderr: nvidia-container-cli: device error: %s: unknown device: unknown"

// processErrorFormat is what a CUDA process reports when the MIG device
// its container was given went before it started.
const processErrorFormat = "CUDA error: no CUDA-capable device is detected (MIG device %s no longer exists)"

type ctrKind int

const (
	regularInit ctrKind = iota
	sidecarInit
	appContainer
)

type ctrState int

const (
	notStarted ctrState = iota
	runningState
	waitingState // failed, waiting for its restart
	terminatedState
)

// ctr is a container as the runtime and kubelet hold it.
type ctr struct {
	name, image string
	kind        ctrKind
	devices     []string // its MIG devices, all resources, sorted
	state       ctrState
	since       time.Time
	term        *v1.ContainerStateTerminated // while terminatedState
	last        *v1.ContainerStateTerminated // the last termination
	waitReason  string
	waitMessage string
	restarts    int32
	backOff     time.Duration
	procs       []string // devices its CUDA process runs on
	gen         int      // bumped on every start and stop: older timers do nothing
}

// podState is a pod kubelet admitted (its devices and containers), or one
// it rejected, whose Failed status may still be to write.
type podState struct {
	key           string
	uid           types.UID
	restartPolicy v1.RestartPolicy
	runSeconds    float64
	requests      map[string]int64               // MIG requests by resource
	devices       map[string]map[string][]string // container → resource → device IDs (kubelet's podDevices)
	ctrs          []*ctr                         // init containers, then app containers, in spec order
	start         time.Time
	rejected      *v1.PodStatus // rejected at admission, with this status
	succeeded     bool          // finished after RunSecondsAnnotation
	done          bool          // released: no longer active for kubelet
	finishTimer   bool
	version       int // of the state; written: the version last written
	written       int
}

func newPodState(key string, pod *v1.Pod, now time.Time) *podState {
	ps := &podState{key: key, uid: pod.UID, restartPolicy: pod.Spec.RestartPolicy, requests: requests(pod), start: now, version: 1}
	if ps.restartPolicy == "" {
		ps.restartPolicy = v1.RestartPolicyAlways
	}
	if secs, err := strconv.ParseFloat(pod.Annotations[RunSecondsAnnotation], 64); err == nil && secs > 0 {
		ps.runSeconds = secs
	}
	for _, c := range pod.Spec.InitContainers {
		kind := regularInit
		if isSidecar(&c) {
			kind = sidecarInit
		}
		ps.ctrs = append(ps.ctrs, &ctr{name: c.Name, image: c.Image, kind: kind})
	}
	for _, c := range pod.Spec.Containers {
		ps.ctrs = append(ps.ctrs, &ctr{name: c.Name, image: c.Image, kind: appContainer})
	}
	return ps
}

// active: kubelet counts the pod's devices as allocated.
func (ps *podState) active() bool { return ps.rejected == nil && !ps.done }

// byResource is the pod's devices by resource, sorted.
func (ps *podState) byResource() map[string][]string {
	sets := map[string]map[string]bool{}
	for _, byRes := range ps.devices {
		for r, ids := range byRes {
			if sets[r] == nil {
				sets[r] = map[string]bool{}
			}
			for _, id := range ids {
				sets[r][id] = true
			}
		}
	}
	out := map[string][]string{}
	for r, ids := range sets {
		out[r] = slices.Sorted(maps.Keys(ids))
	}
	return out
}

// resourceOf names the resource the pod holds a device under.
func (ps *podState) resourceOf(id string) string {
	for r, ids := range ps.byResource() {
		if slices.Contains(ids, id) {
			return r
		}
	}
	return ""
}

// advanceLocked starts what can start: the regular init containers one by
// one (each completes at once here), then sidecars and app containers. A
// container that cannot start stops the sequence. Callers hold n.mu.
func (n *Node) advanceLocked(ps *podState) {
	for _, c := range ps.ctrs {
		if c.kind != regularInit || c.state == terminatedState && c.term.ExitCode == 0 {
			continue
		}
		if c.state != notStarted || !n.startLocked(ps, c) {
			return
		}
		c.state, c.term = terminatedState, &v1.ContainerStateTerminated{Reason: "Completed", StartedAt: metav1.NewTime(c.since), FinishedAt: metav1.NewTime(c.since)}
	}
	for _, c := range ps.ctrs {
		if c.kind != regularInit && c.state == notStarted {
			n.startLocked(ps, c)
		}
	}
	ps.version++
}

// startLocked starts a container, as the runtime with the NVIDIA hook
// does: a MIG device that does not exist fails the start (StartError); a
// device whose UUID now names a slice of another profile is not noticed
// by the runtime, only recorded. The CUDA process of a sidecar or app
// container starts ProcessDelay later. Callers hold n.mu.
func (n *Node) startLocked(ps *podState, c *ctr) bool {
	c.gen++
	now := time.Now()
	for _, id := range c.devices {
		_, s, ok := n.Sim.MIGDevice(id)
		if !ok {
			n.failLocked(ps, c, FailureContainerStart, id, 128, "StartError", "RunContainerError", fmt.Sprintf(startErrorFormat, id))
			return false
		}
		if r := ps.resourceOf(id); r != s.Profile.ResourceName() {
			n.failures = append(n.failures, Failure{Time: now, Kind: FailureWrongDevice, Pod: ps.key, Container: c.name, Resource: r, Device: id, Reason: "Started",
				Message: fmt.Sprintf("device %s, allocated as %s, is a %s now (its UUID was reused)", id, r, s)})
		}
	}
	c.state, c.since, c.waitReason, c.waitMessage = runningState, now, "", ""
	if c.kind != regularInit && len(c.devices) > 0 {
		gen := c.gen
		if n.opts.ProcessDelay < 0 {
			n.startProcessLocked(ps, c)
		} else {
			time.AfterFunc(n.opts.ProcessDelay, func() { n.onProcessStart(ps, c, gen) })
		}
	}
	return true
}

func (n *Node) onProcessStart(ps *podState, c *ctr, gen int) {
	n.mu.Lock()
	if n.pods[ps.key] != ps || !ps.active() || c.gen != gen || c.state != runningState {
		n.mu.Unlock()
		return
	}
	n.startProcessLocked(ps, c)
	n.mu.Unlock()
	n.queue.Add(ps.key)
}

// startProcessLocked starts the container's CUDA process on each of its
// devices; one that has gone fails it (the container exits with an
// error). Callers hold n.mu.
func (n *Node) startProcessLocked(ps *podState, c *ctr) {
	for _, id := range c.devices {
		if err := n.Sim.SetProcess(id, true); err != nil {
			n.stopProcessesLocked(ps, c)
			n.failLocked(ps, c, FailureProcessStart, id, 1, "Error", "CrashLoopBackOff", fmt.Sprintf(processErrorFormat, id)+": "+err.Error())
			return
		}
		c.procs = append(c.procs, id)
	}
}

// stopProcessesLocked stops the container's CUDA processes; a failure
// (its device went while a process ran, which NVML forbids) is recorded.
// Callers hold n.mu.
func (n *Node) stopProcessesLocked(ps *podState, c *ctr) {
	for _, id := range c.procs {
		if err := n.Sim.SetProcess(id, false); err != nil {
			n.failures = append(n.failures, Failure{Time: time.Now(), Kind: FailureProcessStop, Pod: ps.key, Container: c.name,
				Resource: ps.resourceOf(id), Device: id, Reason: "ProcessStop", Message: err.Error()})
		}
	}
	c.procs = nil
}

// failLocked records a container that could not start or run because of
// a MIG device and does what kubelet then does: under restartPolicy Never
// the container stays terminated (the pod fails once nothing runs);
// otherwise it waits its back-off (10 s, doubling to 5 min) and restarts.
// Callers hold n.mu.
func (n *Node) failLocked(ps *podState, c *ctr, kind, device string, exitCode int32, reason, waitReason, msg string) {
	now := time.Now()
	n.failures = append(n.failures, Failure{Time: now, Kind: kind, Pod: ps.key, Container: c.name, Resource: ps.resourceOf(device), Device: device, Reason: reason, Message: msg})
	c.gen++
	term := &v1.ContainerStateTerminated{ExitCode: exitCode, Reason: reason, Message: msg, FinishedAt: metav1.NewTime(now)}
	if kind != FailureContainerStart { // a container that never started has no start time
		term.StartedAt = metav1.NewTime(c.since)
	}
	ps.version++
	if ps.restartPolicy == v1.RestartPolicyNever && c.kind != sidecarInit {
		c.state, c.term = terminatedState, term
		if p := phaseOf(ps); p == v1.PodFailed || p == v1.PodSucceeded {
			n.releaseLocked(context.Background(), ps)
		}
		return
	}
	c.state, c.last, c.waitReason, c.waitMessage = waitingState, term, waitReason, msg
	c.backOff = min(max(2*c.backOff, backOffBase), backOffMax)
	gen := c.gen
	time.AfterFunc(c.backOff, func() { n.onRestart(ps, c, gen) })
}

// onRestart restarts a failed container after its back-off.
func (n *Node) onRestart(ps *podState, c *ctr, gen int) {
	n.mu.Lock()
	if n.pods[ps.key] != ps || !ps.active() || c.gen != gen || c.state != waitingState {
		n.mu.Unlock()
		return
	}
	c.restarts++
	c.state = notStarted
	n.advanceLocked(ps)
	n.mu.Unlock()
	n.queue.Add(ps.key)
}

// finish marks a pod Succeeded once it has run for its
// RunSecondsAnnotation with all its containers running, and asks to be
// called again until then.
func (n *Node) finish(ctx context.Context, pod *v1.Pod, ps *podState) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !ps.active() || ps.runSeconds == 0 {
		return
	}
	end := ps.start.Add(time.Duration(ps.runSeconds * float64(time.Second)))
	if wait := time.Until(end); wait > 0 {
		if !ps.finishTimer {
			ps.finishTimer = true
			key := ps.key
			time.AfterFunc(wait, func() { n.queue.Add(key) })
		}
		return
	}
	for _, c := range ps.ctrs {
		if c.kind != regularInit && c.state != runningState {
			return // it never ran its workload through: not done
		}
	}
	now := metav1.Now()
	for _, c := range ps.ctrs {
		if c.kind != regularInit {
			c.state, c.term = terminatedState, &v1.ContainerStateTerminated{Reason: "Completed", StartedAt: metav1.NewTime(c.since), FinishedAt: now}
		}
	}
	ps.succeeded = true
	ps.version++
	n.releaseLocked(ctx, ps)
}

// phaseOf is kubelet's getPhase for the pod's containers.
func phaseOf(ps *podState) v1.PodPhase {
	if ps.succeeded {
		return v1.PodSucceeded
	}
	pendingInit, failedInit := 0, 0
	var running, waiting, stopped, succeeded int
	for _, c := range ps.ctrs {
		switch c.kind {
		case regularInit:
			switch {
			case c.state == terminatedState && c.term.ExitCode == 0:
			case c.state == terminatedState, c.state == waitingState:
				failedInit++
			default:
				pendingInit++
			}
		case sidecarInit:
			switch c.state {
			case runningState:
				running++
			case notStarted:
				waiting++
			}
		default:
			switch c.state {
			case runningState:
				running++
			case terminatedState:
				stopped++
				if c.term.ExitCode == 0 {
					succeeded++
				}
			case waitingState:
				stopped++
			default:
				waiting++
			}
		}
	}
	switch {
	case failedInit > 0 && ps.restartPolicy == v1.RestartPolicyNever:
		return v1.PodFailed
	case pendingInit > 0 || failedInit > 0 || waiting > 0:
		return v1.PodPending
	case running > 0:
		return v1.PodRunning
	case stopped > 0 && ps.restartPolicy == v1.RestartPolicyAlways:
		return v1.PodRunning // all restarting
	case stopped > 0 && stopped == succeeded:
		return v1.PodSucceeded
	case stopped > 0:
		return v1.PodFailed
	}
	return v1.PodPending
}

// statusLocked is the pod status kubelet reports for the state. Callers
// hold n.mu.
func statusLocked(ps *podState, base v1.PodStatus) v1.PodStatus {
	if ps.rejected != nil {
		return v1.PodStatus{Phase: ps.rejected.Phase, Reason: ps.rejected.Reason, Message: ps.rejected.Message, QOSClass: base.QOSClass}
	}
	st := base
	st.Phase, st.Reason, st.Message = phaseOf(ps), "", ""
	st.StartTime = ptr.To(metav1.NewTime(ps.start))
	st.InitContainerStatuses, st.ContainerStatuses = nil, nil
	ready := st.Phase == v1.PodRunning
	for _, c := range ps.ctrs {
		cs := v1.ContainerStatus{Name: c.name, Image: c.image, RestartCount: c.restarts, Started: ptr.To(false)}
		switch c.state {
		case runningState:
			cs.Started, cs.Ready = ptr.To(true), c.kind != regularInit
			cs.State.Running = &v1.ContainerStateRunning{StartedAt: metav1.NewTime(c.since)}
		case terminatedState:
			cs.State.Terminated = c.term.DeepCopy()
		case waitingState:
			cs.State.Waiting = &v1.ContainerStateWaiting{Reason: c.waitReason, Message: c.waitMessage}
		default:
			reason := "ContainerCreating"
			if c.kind == appContainer && phaseOf(ps) == v1.PodPending {
				reason = "PodInitializing"
			}
			cs.State.Waiting = &v1.ContainerStateWaiting{Reason: reason}
		}
		if c.last != nil {
			cs.LastTerminationState.Terminated = c.last.DeepCopy()
		}
		if c.kind != regularInit && !cs.Ready {
			ready = false
		}
		if c.kind == appContainer {
			st.ContainerStatuses = append(st.ContainerStatuses, cs)
		} else {
			st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
		}
	}
	cond := v1.PodCondition{Type: v1.PodReady, Status: v1.ConditionFalse, LastTransitionTime: metav1.Now()}
	switch {
	case ready:
		cond.Status = v1.ConditionTrue
	case st.Phase == v1.PodSucceeded:
		cond.Reason = "PodCompleted"
	default:
		cond.Reason = "ContainersNotReady"
	}
	for _, old := range base.Conditions {
		if old.Type == v1.PodReady && old.Status == cond.Status && old.Reason == cond.Reason {
			cond.LastTransitionTime = old.LastTransitionTime
		}
	}
	st.Conditions = []v1.PodCondition{cond}
	return st
}

// writePodStatus writes the pod's status if its state changed since.
func (n *Node) writePodStatus(ctx context.Context, pod *v1.Pod, ps *podState) error {
	n.mu.Lock()
	if ps.written == ps.version {
		n.mu.Unlock()
		return nil
	}
	version := ps.version
	status := statusLocked(ps, pod.Status)
	n.mu.Unlock()
	updated := pod.DeepCopy()
	updated.Status = status
	if _, err := n.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return err
	}
	n.mu.Lock()
	ps.written = max(ps.written, version)
	n.mu.Unlock()
	return nil
}
