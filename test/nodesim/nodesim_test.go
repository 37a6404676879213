package nodesim

import (
	"context"
	"fmt"
	"math/rand"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
)

// These tests run the stand-in on client-go's fake clientset, which is
// enough for what they check (the stand-in's own decisions); the
// integration and end-to-end tests run it on a real API server.

const r1g = "nvidia.com/mig-1g.10gb"

// seven 1g.10gb slices on an A100-80GB.
var sevenOnes = map[int][]mig.Slice{0: func() []mig.Slice {
	var out []mig.Slice
	for i := range 7 {
		out = append(out, mig.Slice{Profile: mig.MustParseProfile("1g.10gb"), Start: i})
	}
	return out
}()}

type harness struct {
	t    *testing.T
	cs   *fake.Clientset
	node *Node
	lib  *gpu.NVML // the agent's NVML session
	prc  *podresources.Client
}

func start(t *testing.T, o Options) *harness {
	t.Helper()
	cs := fake.NewClientset()
	var uids atomic.Int64
	cs.PrependReactor("create", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		p := a.(k8stesting.CreateAction).GetObject().(*v1.Pod)
		p.UID = types.UID(fmt.Sprintf("uid-%d", uids.Add(1)))
		p.Status.Phase = v1.PodPending // as the API server's pod strategy sets it
		return false, nil, nil
	})
	// The fake clientset's watch starts after its informer reports synced
	// and, unlike the API server's, does not replay what happened since the
	// list: start returns once the node's pod watch is on.
	watching := make(chan struct{})
	var once sync.Once
	cs.PrependWatchReactor("pods", func(a k8stesting.Action) (bool, watch.Interface, error) {
		w, err := cs.Tracker().Watch(a.GetResource(), a.GetNamespace(), a.(k8stesting.WatchActionImpl).ListOptions)
		if err != nil {
			return true, nil, err
		}
		once.Do(func() { close(watching) })
		return true, w, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if o.Name == "" {
		o.Name = "n1"
	}
	if o.Models == nil {
		o.Models = []string{"A100-80GB"}
	}
	o.SocketDir = t.TempDir()
	n, err := Start(ctx, cs, o)
	require.NoError(t, err)
	select {
	case <-watching:
	case <-time.After(10 * time.Second):
		t.Fatal("the node's pod watch did not start")
	}
	lib, err := gpu.Open(n.Sim.Interface())
	require.NoError(t, err)
	prc, err := podresources.Dial(n.Socket, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = prc.Close() })
	return &harness{t: t, cs: cs, node: n, lib: lib, prc: prc}
}

func gpuPod(name string, restart v1.RestartPolicy, limits map[string]int64) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "team"},
		Spec: v1.PodSpec{NodeName: "n1", RestartPolicy: restart,
			Containers: []v1.Container{{Name: "main", Image: "cuda", Resources: requirements(limits)}}},
	}
}

func requirements(limits map[string]int64) v1.ResourceRequirements {
	l := v1.ResourceList{}
	for r, n := range limits {
		l[v1.ResourceName(r)] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	return v1.ResourceRequirements{Limits: l, Requests: l.DeepCopy()}
}

func (h *harness) create(p *v1.Pod) {
	h.t.Helper()
	if p.Spec.NodeName == "" {
		p.Spec.NodeName = h.node.Name
	}
	_, err := h.cs.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{})
	require.NoError(h.t, err)
}

func (h *harness) pod(name string) *v1.Pod {
	h.t.Helper()
	p, err := h.cs.CoreV1().Pods("team").Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(h.t, err)
	return p
}

func (h *harness) waitFor(what string, timeout time.Duration, cond func() bool) {
	h.t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 10*time.Millisecond, timeout, true, func(context.Context) (bool, error) { return cond(), nil })
	require.NoError(h.t, err, "waiting for %s", what)
}

func (h *harness) waitPhase(name string, phase v1.PodPhase) *v1.Pod {
	h.t.Helper()
	var p *v1.Pod
	h.waitFor(fmt.Sprintf("pod %s %s", name, phase), 10*time.Second, func() bool {
		got, err := h.cs.CoreV1().Pods("team").Get(context.Background(), name, metav1.GetOptions{})
		p = got
		return err == nil && got.Status.Phase == phase
	})
	return p
}

func (h *harness) nodeResources(r string) (capacity, allocatable int64, listed bool) {
	h.t.Helper()
	node, err := h.cs.CoreV1().Nodes().Get(context.Background(), h.node.Name, metav1.GetOptions{})
	require.NoError(h.t, err)
	c, listed := node.Status.Capacity[v1.ResourceName(r)]
	a := node.Status.Allocatable[v1.ResourceName(r)]
	return c.Value(), a.Value(), listed
}

func (h *harness) deletePlugin() {
	h.t.Helper()
	require.NoError(h.t, h.cs.CoreV1().Pods(DevicePluginNamespace).Delete(context.Background(), h.node.pluginName(), metav1.DeleteOptions{}))
}

func (h *harness) allocatable() map[string][]string {
	h.t.Helper()
	got, err := h.prc.Allocatable(context.Background(), "nvidia.com/mig-")
	require.NoError(h.t, err)
	return got
}

// kubelet hands out free devices in no particular order: not the first
// free one, but the same ones for the same seed; the pinning annotation
// still decides when set.
func TestDeviceChoiceIsSeededAndUnordered(t *testing.T) {
	picks := func(seed int64) []string {
		h := start(t, Options{Slices: sevenOnes, Seed: seed, ProcessDelay: -1})
		var out []string
		for i := range 5 {
			name := fmt.Sprintf("p%d", i)
			h.create(gpuPod(name, "", map[string]int64{r1g: 1}))
			h.waitPhase(name, v1.PodRunning)
			got := h.node.Holding("team/" + name)[r1g]
			require.Len(t, got, 1)
			out = append(out, got[0])
		}
		return out
	}
	a, b := picks(7), picks(7)
	assert.Equal(t, a, b, "same seed, same devices")
	assert.NotEqual(t, a, picks(8), "another seed, other devices")
	sorted := slices.Clone(a)
	slices.Sort(sorted)
	assert.NotEqual(t, sorted, a, "not handed out in ID order")

	h := start(t, Options{Slices: sevenOnes, ProcessDelay: -1})
	want, err := h.node.DeviceAt(0, mig.Slice{Profile: mig.MustParseProfile("1g.10gb"), Start: 5})
	require.NoError(t, err)
	p := gpuPod("pinned", "", map[string]int64{r1g: 1})
	p.Annotations = map[string]string{DevicesAnnotation: want}
	h.create(p)
	h.waitPhase("pinned", v1.PodRunning)
	assert.Equal(t, []string{want}, h.node.Holding("team/pinned")[r1g])
	assert.Empty(t, h.node.Failures())
}

// From the moment the device-plugin pod is deleted until its successor
// registered, kubelet holds the plugin's devices unhealthy: a pod
// admitted then fails for good with UnexpectedAdmissionError; PodResources
// lists nothing allocatable; Node capacity stays while allocatable is 0.
func TestPluginRestartWindow(t *testing.T) {
	h := start(t, Options{Slices: sevenOnes, RestartDelay: 3 * time.Second, RegisterDelay: 2 * time.Second, StatusUpdatePeriod: -1, ProcessDelay: -1})
	h.create(gpuPod("before", "", map[string]int64{r1g: 1}))
	h.waitPhase("before", v1.PodRunning)
	held := h.node.Holding("team/before")[r1g]
	require.Len(t, h.allocatable()[r1g], 7)

	h.deletePlugin()
	h.waitFor("the plugin's devices unhealthy", 3*time.Second, func() bool { return len(h.allocatable()) == 0 })
	h.waitFor("Node allocatable 0", 3*time.Second, func() bool {
		c, a, _ := h.nodeResources(r1g)
		return c == 7 && a == 0
	})
	h.create(gpuPod("during", "", map[string]int64{r1g: 1}))
	p := h.waitPhase("during", v1.PodFailed)
	assert.Equal(t, "UnexpectedAdmissionError", p.Status.Reason)
	assert.Equal(t, "Pod was rejected: Allocate failed due to no healthy devices present; cannot allocate unhealthy devices nvidia.com/mig-1g.10gb, which is unexpected", p.Status.Message)
	assert.Equal(t, held, h.node.Holding("team/before")[r1g], "a running pod keeps its device")

	// The new plugin pod is Ready before the plugin registers.
	h.waitFor("a new plugin pod", 10*time.Second, func() bool {
		pp, err := h.cs.CoreV1().Pods(DevicePluginNamespace).Get(context.Background(), h.node.pluginName(), metav1.GetOptions{})
		return err == nil && pp.Status.Phase == v1.PodRunning
	})
	assert.Empty(t, h.allocatable(), "Ready is not registered")
	h.waitFor("re-registration", 10*time.Second, func() bool { return len(h.allocatable()[r1g]) == 7 })
	h.waitFor("Node allocatable back", 10*time.Second, func() bool {
		_, a, _ := h.nodeResources(r1g)
		return a == 7
	})
	assert.Equal(t, 1, h.node.Restarts())
	h.create(gpuPod("after", "", map[string]int64{r1g: 1}))
	h.waitPhase("after", v1.PodRunning)
	assert.NotEqual(t, held, h.node.Holding("team/after")[r1g], "a held device is not handed out again")
	assert.Equal(t, v1.PodFailed, h.pod("during").Status.Phase, "for good")

	failures := h.node.Failures()
	require.Len(t, failures, 1)
	assert.Equal(t, FailureAdmission, failures[0].Kind)
	assert.Equal(t, "team/during", failures[0].Pod)
	assert.Equal(t, r1g, failures[0].Resource)
}

// Node capacity and allocatable change only at kubelet's status ticks:
// after the plugin went, the Node shows the old allocatable until the
// next tick, here an hour away (the ticks' phase comes from the seed).
func TestNodeStatusAtTicks(t *testing.T) {
	const seed = 42
	phase := time.Duration(rand.New(rand.NewSource(seed + 1)).Int63n(int64(time.Hour)))
	require.Greater(t, phase, time.Minute, "this test needs the first tick late")
	h := start(t, Options{Slices: sevenOnes, Seed: seed, StatusUpdatePeriod: time.Hour, RestartDelay: time.Hour})
	_, a, _ := h.nodeResources(r1g)
	require.Equal(t, int64(7), a, "written when the node started")
	h.deletePlugin()
	h.waitFor("unhealthy in the device manager", 10*time.Second, func() bool { return len(h.allocatable()) == 0 })
	time.Sleep(300 * time.Millisecond)
	c, a, _ := h.nodeResources(r1g)
	assert.Equal(t, []int64{7, 7}, []int64{c, a}, "the Node lags until the next tick")

	// With ticks every 300 ms it follows within one.
	h = start(t, Options{Slices: sevenOnes, StatusUpdatePeriod: 300 * time.Millisecond, RestartDelay: time.Hour})
	h.deletePlugin()
	h.waitFor("the tick", 10*time.Second, func() bool {
		c, a, _ := h.nodeResources(r1g)
		return c == 7 && a == 0
	})
}

// Admission fails as kubelet's does: no free device of a registered
// resource is UnexpectedAdmissionError (the device manager runs before
// the predicates); a resource the Node lists with nothing left is
// OutOf<resource>; a resource neither a plugin nor the Node knows is
// dropped and the pod runs without it.
func TestAdmissionFailures(t *testing.T) {
	defer func(d time.Duration) { endpointStopGracePeriod = d }(endpointStopGracePeriod)
	endpointStopGracePeriod = 200 * time.Millisecond
	h := start(t, Options{Slices: map[int][]mig.Slice{0: {{Profile: mig.MustParseProfile("1g.10gb"), Start: 0}, {Profile: mig.MustParseProfile("3g.40gb"), Start: 4}}},
		StatusUpdatePeriod: -1, RestartDelay: time.Hour, ProcessDelay: -1})
	h.create(gpuPod("one", "", map[string]int64{r1g: 1}))
	h.waitPhase("one", v1.PodRunning)
	h.create(gpuPod("two", "", map[string]int64{r1g: 1}))
	p := h.waitPhase("two", v1.PodFailed)
	assert.Equal(t, "UnexpectedAdmissionError", p.Status.Reason)
	assert.Equal(t, "Pod was rejected: Allocate failed due to requested number of devices unavailable for nvidia.com/mig-1g.10gb. Requested: 1, Available: 0, which is unexpected", p.Status.Message)

	h.create(gpuPod("unknown", "", map[string]int64{"nvidia.com/mig-7g.80gb": 1}))
	h.waitPhase("unknown", v1.PodRunning)
	assert.Empty(t, h.node.Holding("team/unknown"))

	// The plugin goes and never comes back: after the grace period kubelet
	// drops its resources; the Node lists them at 0.
	h.deletePlugin()
	h.waitFor("3g.40gb dropped", 10*time.Second, func() bool {
		c, a, listed := h.nodeResources("nvidia.com/mig-3g.40gb")
		return listed && c == 0 && a == 0
	})
	h.create(gpuPod("gone", "", map[string]int64{"nvidia.com/mig-3g.40gb": 1}))
	p = h.waitPhase("gone", v1.PodFailed)
	assert.Equal(t, "OutOfnvidia.com/mig-3g.40gb", p.Status.Reason)
	assert.Equal(t, "Pod was rejected: Node didn't have enough resource: nvidia.com/mig-3g.40gb, requested: 1, used: 0, capacity: 0", p.Status.Message)
	h.create(gpuPod("held", "", map[string]int64{r1g: 1}))
	p = h.waitPhase("held", v1.PodFailed)
	assert.Equal(t, "Pod was rejected: Allocate failed due to cannot allocate unregistered device nvidia.com/mig-1g.10gb, which is unexpected", p.Status.Message,
		"a pod still holds a 1g.10gb, so kubelet still treats it as a device-plugin resource")

	var kinds []string
	for _, f := range h.node.Failures() {
		kinds = append(kinds, f.Kind+" "+f.Pod)
	}
	assert.Equal(t, []string{"Admission team/two", "AdmittedWithoutDevice team/unknown", "Admission team/gone", "Admission team/held"}, kinds)
}

// The CUDA process starts ProcessDelay after the container: until then
// NVML does not report the device in use and it can be destroyed; the
// process then fails and the container restarts with back-off (restart
// policy Always) or the pod fails (Never). Once it runs, NVML refuses
// the destroy, and the process stops with the pod.
func TestProcessStartsLate(t *testing.T) {
	one := mig.MustParseProfile("1g.10gb")
	h := start(t, Options{Slices: map[int][]mig.Slice{0: {{Profile: one, Start: 0}, {Profile: one, Start: 1}}}, ProcessDelay: 2 * time.Second})
	p := gpuPod("late", "", map[string]int64{r1g: 1})
	h.create(p)
	h.waitPhase("late", v1.PodRunning)
	id := h.node.Holding("team/late")[r1g][0]
	gpuIdx, s, ok := h.node.Sim.MIGDevice(id)
	require.True(t, ok)
	require.Zero(t, h.processes(id))
	require.NoError(t, h.lib.Destroy(gpuIdx, s.Profile, s.Start), "no process yet: NVML lets it go")
	h.waitFor("the process failing", 10*time.Second, func() bool { return len(h.node.Failures()) == 1 })
	f := h.node.Failures()[0]
	assert.Equal(t, FailureProcessStart, f.Kind)
	assert.Equal(t, id, f.Device)
	h.waitFor("the container waiting for its restart", 5*time.Second, func() bool {
		cs := h.pod("late").Status.ContainerStatuses
		return len(cs) == 1 && cs[0].State.Waiting != nil && cs[0].LastTerminationState.Terminated != nil
	})
	got := h.pod("late")
	assert.Equal(t, v1.PodRunning, got.Status.Phase, "kubelet's phase for a container that restarts (Always)")
	assert.Equal(t, "CrashLoopBackOff", got.Status.ContainerStatuses[0].State.Waiting.Reason)
	assert.Contains(t, got.Status.ContainerStatuses[0].LastTerminationState.Terminated.Message, id)
	assert.Equal(t, id, h.node.Holding("team/late")[r1g][0], "kubelet keeps the device allocated to the pod")

	h.create(gpuPod("busy", v1.RestartPolicyNever, map[string]int64{r1g: 1}))
	h.waitPhase("busy", v1.PodRunning)
	busy := h.node.Holding("team/busy")[r1g][0]
	_, bs, ok := h.node.Sim.MIGDevice(busy)
	require.True(t, ok)
	h.waitFor("its process", 10*time.Second, func() bool { return h.processes(busy) == 1 })
	require.ErrorIs(t, h.lib.Destroy(0, bs.Profile, bs.Start), gpu.ErrInUse, "its process runs")
	require.NoError(t, h.cs.CoreV1().Pods("team").Delete(context.Background(), "busy", metav1.DeleteOptions{}))
	h.waitFor("the process stopped", 10*time.Second, func() bool { return h.processes(busy) == 0 })
	require.NoError(t, h.lib.Destroy(0, bs.Profile, bs.Start))
	assert.Len(t, h.node.Failures(), 1)
}

// processes counts the CUDA processes on a MIG device.
func (h *harness) processes(id string) int { return h.node.Sim.Processes(id) }

// A container whose MIG device is gone when it starts fails as the NVIDIA
// runtime fails it (StartError, naming the device); under restartPolicy
// Never the pod fails. The plugin advertised the device from its start,
// so kubelet still handed it out.
func TestContainerStartFailure(t *testing.T) {
	h := start(t, Options{Slices: map[int][]mig.Slice{0: {{Profile: mig.MustParseProfile("1g.10gb"), Start: 0}}}, ProcessDelay: -1})
	id, err := h.node.DeviceAt(0, mig.Slice{Profile: mig.MustParseProfile("1g.10gb"), Start: 0})
	require.NoError(t, err)
	require.NoError(t, h.lib.Destroy(0, mig.MustParseProfile("1g.10gb"), 0))
	h.create(gpuPod("stale", v1.RestartPolicyNever, map[string]int64{r1g: 1}))
	p := h.waitPhase("stale", v1.PodFailed)
	require.Len(t, p.Status.ContainerStatuses, 1)
	term := p.Status.ContainerStatuses[0].State.Terminated
	require.NotNil(t, term)
	assert.Equal(t, "StartError", term.Reason)
	assert.Equal(t, int32(128), term.ExitCode)
	assert.Contains(t, term.Message, "nvidia-container-cli: device error: "+id+": unknown device")
	failures := h.node.Failures()
	require.Len(t, failures, 1)
	assert.Equal(t, FailureContainerStart, failures[0].Kind)
	assert.Equal(t, id, failures[0].Device)
	assert.Empty(t, h.node.Holding("team/stale"), "a Failed pod holds nothing")
}

// The devices kubelet allocates to a pod with init containers: an init
// container's devices are reused by the containers after it, so the pod
// holds what demand.Of says; a device held only by a regular init
// container is allocated (no one else gets it) but not in PodResources
// List, which leaves regular init containers out.
func TestInitContainers(t *testing.T) {
	h := start(t, Options{Slices: sevenOnes, ProcessDelay: -1})
	cases := []struct {
		name       string
		init, app  int64
		sidecar    int64
		listedMain int
	}{
		{name: "reuse", init: 1, app: 1, listedMain: 1},
		{name: "initonly", init: 1, app: 0, listedMain: 0},
		{name: "moreinit", init: 2, app: 1, listedMain: 1},
		{name: "sidecar", init: 1, sidecar: 1, app: 1, listedMain: 1},
	}
	for _, c := range cases {
		p := gpuPod(c.name, "", map[string]int64{r1g: c.app})
		p.Spec.InitContainers = []v1.Container{{Name: "init", Image: "cuda", Resources: requirements(map[string]int64{r1g: c.init})}}
		if c.sidecar > 0 {
			p.Spec.InitContainers = append(p.Spec.InitContainers, v1.Container{Name: "side", Image: "cuda", RestartPolicy: ptr.To(v1.ContainerRestartPolicyAlways),
				Resources: requirements(map[string]int64{r1g: c.sidecar})})
		}
		h.create(p)
		h.waitPhase(c.name, v1.PodRunning)
		d, err := demand.Of(p)
		require.NoError(t, err)
		assert.Len(t, h.node.Holding("team/" + c.name)[r1g], d[mig.MustParseProfile("1g.10gb")], "%s: devices held = demand.Of", c.name)
	}
	list, err := podresourcesv1.NewPodResourcesListerClient(dialRaw(t, h.node.Socket)).List(context.Background(), &podresourcesv1.ListPodResourcesRequest{})
	require.NoError(t, err)
	listed := map[string]int{}
	for _, pr := range list.GetPodResources() {
		for _, ctr := range pr.GetContainers() {
			assert.NotEqual(t, "init", ctr.GetName(), "regular init containers are not listed")
			for _, d := range ctr.GetDevices() {
				listed[pr.GetName()+"/"+ctr.GetName()] += len(d.GetDeviceIds())
			}
		}
	}
	for _, c := range cases {
		assert.Equal(t, c.listedMain, listed[c.name+"/main"], c.name)
	}
	assert.Equal(t, 1, listed["sidecar/side"])
	d, err := h.prc.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.NoError(t, err)
	initOnly := h.node.Holding("team/initonly")[r1g][0]
	assert.NotContains(t, d.Used, initOnly, "held, yet invisible in PodResources")
	assert.Contains(t, d.Allocatable[r1g], initOnly)
	// 1 + 1 + 2 + 2 of 7 are held: one more pod of 1 fits, a second not.
	h.create(gpuPod("fits", "", map[string]int64{r1g: 1}))
	h.waitPhase("fits", v1.PodRunning)
	h.create(gpuPod("full", "", map[string]int64{r1g: 1}))
	assert.Equal(t, "UnexpectedAdmissionError", h.waitPhase("full", v1.PodFailed).Status.Reason)
	for _, f := range h.node.Failures() {
		assert.Equal(t, "team/full", f.Pod, "only the pod that did not fit failed: %s", f)
	}
}

// A destroyed slice's UUID can come back on a slice of another profile;
// a pod pinned to the old UUID by a stale device plugin then starts on the
// wrong slice, which the runtime cannot tell: recorded as WrongDevice.
func TestReusedUUIDIsRecorded(t *testing.T) {
	one := mig.MustParseProfile("1g.10gb")
	h := start(t, Options{Slices: map[int][]mig.Slice{0: {{Profile: one, Start: 0}}}, ProcessDelay: -1})
	id, err := h.node.DeviceAt(0, mig.Slice{Profile: one, Start: 0})
	require.NoError(t, err)
	require.NoError(t, h.lib.Destroy(0, one, 0))
	s, err := h.lib.Create(0, mig.MustParseProfile("3g.40gb"), 4)
	require.NoError(t, err)
	require.Equal(t, id, s.UUID, "NVML reused the GPU-instance ID")
	h.create(gpuPod("confused", "", map[string]int64{r1g: 1}))
	h.waitPhase("confused", v1.PodRunning)
	failures := h.node.Failures()
	require.Len(t, failures, 1)
	assert.Equal(t, FailureWrongDevice, failures[0].Kind)
	assert.True(t, strings.Contains(failures[0].Message, "3g.40gb@4"), failures[0].Message)
}

func dialRaw(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	c, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// In agent mode there is no NVIDIA plugin: the agent's plugin registers
// what it was given when it runs, a new list takes effect at once (no
// restart window), a device left out is no longer allocatable while its
// holder keeps it, a pod is admitted from the device manager before Node
// allocatable shows its device, and when the plugin stops its resources
// turn unhealthy as for any plugin.
func TestAgentPlugin(t *testing.T) {
	h := start(t, Options{AgentPlugin: true, Slices: sevenOnes, StatusUpdatePeriod: time.Hour, ProcessDelay: -1})
	_, err := h.cs.CoreV1().Pods(DevicePluginNamespace).Get(context.Background(), h.node.pluginName(), metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "no NVIDIA plugin pod")
	assert.Empty(t, h.allocatable())
	ids, err := Scan(h.node.plugin)
	require.NoError(t, err)
	all := ids[r1g]
	require.Len(t, all, 7)
	devices := func(ids ...string) map[string][]deviceplugin.Device {
		out := map[string][]deviceplugin.Device{r1g: nil}
		for _, id := range ids {
			out[r1g] = append(out[r1g], deviceplugin.Device{ID: id})
		}
		return out
	}

	p := h.node.AgentPlugin()
	require.NotNil(t, p)
	p.Set(devices(all[:2]...))
	assert.Empty(t, h.allocatable(), "not registered before it runs")
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		assert.NoError(t, p.Run(ctx))
	}()
	h.waitFor("registered", 3*time.Second, func() bool { return len(h.allocatable()[r1g]) == 2 })
	h.create(gpuPod("first", "", map[string]int64{r1g: 1}))
	h.waitPhase("first", v1.PodRunning)
	_, nodeAllocatable, _ := h.nodeResources(r1g)
	assert.Zero(t, nodeAllocatable, "admitted before Node allocatable shows the device (next status tick in an hour)")
	held := h.node.Holding("team/first")[r1g]
	require.Len(t, held, 1)

	p.Set(devices(all[2]))
	h.waitFor("the new list", time.Second, func() bool { return slices.Equal(h.allocatable()[r1g], []string{all[2]}) })
	assert.Equal(t, held, h.node.Holding("team/first")[r1g], "its holder keeps a device left out")

	cancel()
	<-stopped
	assert.Empty(t, h.allocatable(), "unhealthy once the plugin is gone")
	h.create(gpuPod("after", "", map[string]int64{r1g: 1}))
	assert.Equal(t, "UnexpectedAdmissionError", h.waitPhase("after", v1.PodFailed).Status.Reason)
}
