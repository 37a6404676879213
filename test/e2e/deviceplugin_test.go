package e2e

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/node-agent/cdi"
	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/local"
)

// The agent's device plugin against the real kubelet, on a node without
// NVIDIA's: registered with no devices, it advertises what it is given at
// once (PodResources GetAllocatableResources, no restart); a pod gets a
// device by its CDI name; a withdrawn device leaves what kubelet can
// allocate while its holder keeps it, and the other resources are not
// disturbed; after a kubelet restart the plugin registers again.
func TestAgentDevicePlugin(t *testing.T) {
	e := newEnv(t, "deviceplugin")
	sl := func(p string, start int) mig.Slice { return mig.Slice{Profile: mig.MustParseProfile(p), Start: start} }
	cdiDir := t.TempDir()
	n, err := cluster.AddKubeletNode(kubeletnode.Options{Name: "dp" + e.suffix, Models: []string{"A100-80GB"}, NoNVIDIAPlugin: true, CDIDir: cdiDir,
		Slices: map[int][]mig.Slice{0: {sl("1g.10gb", 0), sl("1g.10gb", 1), sl("3g.40gb", 4)}}})
	require.NoError(t, err)
	t.Cleanup(n.Stop)
	e.nodes = append(e.nodes, n)
	uuid := func(s mig.Slice) string {
		id, err := n.DeviceAt(0, s)
		require.NoError(t, err)
		return id
	}
	a, b, c := uuid(sl("1g.10gb", 0)), uuid(sl("1g.10gb", 1)), uuid(sl("3g.40gb", 4))
	specs, err := cdi.New(cdiDir, nil)
	require.NoError(t, err)
	require.NoError(t, specs.Sync([]string{a, b, c}), "the runtime resolves the devices' CDI names")
	const r1, r3 = "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"
	dev := func(ids ...string) []deviceplugin.Device {
		out := make([]deviceplugin.Device, len(ids))
		for i, id := range ids {
			out[i] = deviceplugin.Device{ID: id, CDIName: deviceplugin.CDIName(id)}
		}
		return out
	}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	p := deviceplugin.New(n.PluginDir())
	p.Set(map[string][]deviceplugin.Device{r1: nil, r3: nil})
	go func() { _ = p.Run(ctx) }()
	prc, err := podresources.Dial(n.Socket, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = prc.Close() })
	allocatable := func() map[string][]string {
		got, err := prc.Allocatable(ctx, "nvidia.com/")
		if err != nil {
			return nil
		}
		return got
	}
	nodeAllocatable := func(r string) (int64, bool) {
		node, err := cluster.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return 0, false
		}
		q, ok := node.Status.Allocatable[v1.ResourceName(r)]
		return q.Value(), ok
	}

	// Registered with no devices: the Node lists both resources at 0 at
	// kubelet's next status update (every 10 s).
	e.waitFor(25*time.Second, "both resources on the Node at 0", func() bool {
		n1, ok1 := nodeAllocatable(r1)
		n3, ok3 := nodeAllocatable(r3)
		return ok1 && ok3 && n1 == 0 && n3 == 0
	})
	assert.Empty(t, allocatable())

	start := time.Now()
	p.Set(map[string][]deviceplugin.Device{r1: dev(a, b), r3: dev(c)})
	want := map[string][]string{r1: sortedIDs(a, b), r3: {c}}
	e.waitFor(5*time.Second, "kubelet can allocate the new devices", func() bool { return assert.ObjectsAreEqual(want, allocatable()) })
	t.Logf("kubelet could allocate the devices %s after they were advertised", time.Since(start).Round(time.Millisecond))

	pod := local.Pod("holder", map[string]int64{r1: 1})
	pod.Namespace, pod.Spec.NodeName = e.ns, n.Name // bound by name: this node has no agent for the scheduler
	local.RunFor(pod, 600)
	_, err = cluster.Kube.CoreV1().Pods(e.ns).Create(ctx, pod, metav1.CreateOptions{})
	require.NoError(t, err)
	e.waitPhase(30*time.Second, v1.PodRunning, "holder")
	held := n.Holding(e.ns + "/holder")[r1]
	require.Len(t, held, 1, "the container was created with its device, by CDI name")
	free := a
	if held[0] == a {
		free = b
	}

	// Withdraw the free one, then the held one: kubelet stops offering
	// them; the holder keeps its device; 3g.40gb is not disturbed.
	p.Set(map[string][]deviceplugin.Device{r1: dev(held[0])})
	e.waitFor(5*time.Second, "the free device withdrawn", func() bool {
		return assert.ObjectsAreEqual(map[string][]string{r1: held, r3: {c}}, allocatable())
	})
	p.Set(map[string][]deviceplugin.Device{r1: nil})
	e.waitFor(5*time.Second, "the held device withdrawn", func() bool {
		return assert.ObjectsAreEqual(map[string][]string{r3: {c}}, allocatable())
	})
	assert.Equal(t, held, n.Holding(e.ns + "/holder")[r1], "its holder keeps it")
	assert.Equal(t, v1.PodRunning, e.phase("holder"))
	d, err := prc.Devices(ctx, "nvidia.com/", []string{e.ns + "/holder"})
	require.NoError(t, err)
	assert.Equal(t, e.ns+"/holder", d.Used[held[0]], "PodResources still shows the holder's device")

	// A kubelet restart deletes the plugin sockets: the plugin registers
	// again and kubelet can allocate 3g.40gb again.
	require.NoError(t, n.RestartKubelet(time.Second))
	e.waitFor(30*time.Second, "registered again after the kubelet restart", func() bool {
		return assert.ObjectsAreEqual(map[string][]string{r3: {c}}, allocatable())
	})
	p.Set(map[string][]deviceplugin.Device{r1: dev(free)})
	e.waitFor(5*time.Second, "advertised again after the restart", func() bool {
		return assert.ObjectsAreEqual(map[string][]string{r1: {free}, r3: {c}}, allocatable())
	})

	// A device advertised without its CDI spec does not resolve, and its
	// container is not created, as with containerd.
	require.NoError(t, specs.Sync([]string{c}))
	nospec := local.Pod("nospec", map[string]int64{r1: 1})
	nospec.Namespace, nospec.Spec.NodeName = e.ns, n.Name
	_, err = cluster.Kube.CoreV1().Pods(e.ns).Create(ctx, nospec, metav1.CreateOptions{})
	require.NoError(t, err)
	e.waitFor(30*time.Second, "the container of nospec refused", func() bool {
		for _, f := range n.Failures() {
			if f.Pod == e.ns+"/nospec" && f.Device == free {
				return assert.Contains(t, f.Message, "unresolvable CDI devices dynamig.io/gpu="+free)
			}
		}
		return false
	})
	e.invariants(e.ns + "/nospec")
}

func sortedIDs(ids ...string) []string {
	out := slices.Clone(ids)
	slices.Sort(out)
	return out
}

// In agent mode the node's device plugin stops with the agent: the agent
// says so first (DevicePluginRestarting, which keeps the scheduler from
// binding MIG pods there), and the next agent clears it once kubelet has
// its devices again.
func TestAgentStopIsAnnounced(t *testing.T) {
	e := newEnv(t, "agentstop")
	e.agent, e.suffix = true, e.suffix+"-agent"
	n := e.node("stop", "A100-80GB")
	restarting := func() (metav1.ConditionStatus, string) {
		np, err := cluster.Partition(context.Background(), n.Name)
		if err != nil {
			return "", ""
		}
		c := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionRestarting)
		if c == nil {
			return "", ""
		}
		return c.Status, c.Message
	}
	cluster.StopAgent(n.Name)
	status, msg := restarting()
	assert.Equal(t, metav1.ConditionTrue, status)
	assert.Contains(t, msg, "the agent, this node's device plugin, is stopping")
	require.NoError(t, cluster.StartAgent(n.Name))
	e.waitFor(30*time.Second, "DevicePluginRestarting cleared by the next agent", func() bool {
		status, _ := restarting()
		return status == metav1.ConditionFalse
	})
}

// The scheduler binds on the agent's word: once the agent reports the new
// slice advertised (kubelet's PodResources lists it), the pod is bound
// while Node allocatable does not show the slice yet (this node's kubelet
// writes its status every 10 minutes), and the real kubelet admits it from
// its device manager — in agent mode, and in restart mode once NVIDIA's
// plugin is back with the slice. In agent mode the repartition never
// changes what kubelet can allocate of the node's other resource (restart
// mode restarts the plugin that advertises it).
func TestBindsOnTheAgentsWord(t *testing.T) { modes(t, "word", testBindsOnTheAgentsWord) }

func testBindsOnTheAgentsWord(e *env) {
	t := e.t
	big := mig.Slice{Profile: mig.MustParseProfile("3g.40gb"), Start: 4}
	n := e.nodeWith(kubeletnode.Options{Name: "word", Models: []string{"A100-80GB"}, Slices: map[int][]mig.Slice{0: {big}},
		NodeStatusUpdateFrequency: 10 * time.Minute})
	const r1, r3 = "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"
	c, err := n.DeviceAt(0, big)
	require.NoError(t, err)
	prc, err := podresources.Dial(n.Socket, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = prc.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e.waitFor(30*time.Second, "kubelet can allocate the 3g.40gb", func() bool {
		got, err := prc.Allocatable(ctx, r3)
		return err == nil && slices.Equal(got[r3], []string{c})
	})

	// Sample what kubelet can allocate of 3g.40gb all through the repartition.
	var disturbed []string
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for ctx.Err() == nil {
			if got, err := prc.Allocatable(ctx, r3); err == nil && !slices.Equal(got[r3], []string{c}) {
				disturbed = append(disturbed, fmt.Sprint(got[r3]))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	start := time.Now()
	e.pod("word", 0, map[string]int64{r1: 1})
	var boundAt time.Duration
	var nodeShowed int64
	e.waitFor(60*time.Second, "the pod bound", func() bool {
		p, err := cluster.Kube.CoreV1().Pods(e.ns).Get(ctx, "word", metav1.GetOptions{})
		if err != nil || p.Spec.NodeName == "" {
			return false
		}
		boundAt = time.Since(start)
		node, err := cluster.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		require.NoError(t, err)
		q := node.Status.Allocatable[r1]
		nodeShowed = q.Value()
		return true
	})
	assert.Zero(t, nodeShowed, "bound while Node allocatable did not show the new 1g.10gb")
	e.waitPhase(30*time.Second, v1.PodRunning, "word")
	t.Logf("1g.10gb created, advertised, bound after %v and Running after %v, Node allocatable %s: %d",
		boundAt.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), r1, nodeShowed)
	require.Len(t, n.Holding(e.ns + "/word")[r1], 1, "kubelet admitted the pod with its device")
	cancel()
	<-sampled
	if e.agent {
		assert.Empty(t, disturbed, "kubelet could allocate the 3g.40gb, and only it, throughout")
	}
	e.invariants()
}

// A kubelet restart in agent mode: the restarted kubelet restores every
// device holder from its checkpoint — those of pods deleted while it was
// down too — and releases them only once it has read its pods from the
// API server (about a second after it starts); it admits that first
// batch before, so a pod bound to the node meanwhile is refused
// ("Requested: 1, Available: 0") for good. The agent keeps MIG pods off
// the node from when its kubelet goes until kubeletSettle after it is
// back (guard kubelet-restart). Here the
// node's two 3g.40gb are held, one holder is deleted while kubelet is
// down, and a third pod comes the moment the agent reports the slices
// allocatable again: it is bound once kubelet has settled and runs on the
// freed slice. With the guard off it is bound at once and is refused
// ("Requested: 1, Available: 0"), or, if kubelet has read its pods by
// then, given the freed slice while the deleted pod's container still
// runs on it (kubelet stops such orphans in its housekeeping, which waits
// for its sources too).
func TestKubeletRestartKeepsMIGPodsOff(t *testing.T) {
	e := newEnv(t, "kubeletrestart")
	e.agent, e.suffix = true, e.suffix+"-agent"
	const r3 = "nvidia.com/mig-3g.40gb"
	n := e.nodeWith(kubeletnode.Options{Name: "kr", Models: []string{"A100-80GB"},
		Slices: map[int][]mig.Slice{0: {
			{Profile: mig.MustParseProfile("3g.40gb"), Start: 0}, {Profile: mig.MustParseProfile("3g.40gb"), Start: 4}}}})
	e.pod("a", 0, map[string]int64{r3: 1})
	e.pod("b", 0, map[string]int64{r3: 1})
	e.waitPhase(60*time.Second, v1.PodRunning, "a", "b")
	freed := n.Holding(e.ns + "/a")[r3]
	require.Len(t, freed, 1)
	ctx := context.Background()
	advertised := func() int {
		np, err := cluster.Partition(ctx, n.Name)
		if err != nil || len(np.Status.GPUs) == 0 {
			return -1
		}
		count := 0
		for _, s := range np.Status.GPUs[0].Slices {
			if s.Advertised {
				count++
			}
		}
		return count
	}

	n.KillKubelet()
	require.NoError(t, cluster.Kube.CoreV1().Pods(e.ns).Delete(ctx, "a", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}))
	e.waitFor(10*time.Second, "the agent reports kubelet gone", func() bool { return advertised() == 0 })
	require.NoError(t, n.StartKubelet())
	start := time.Now()
	e.waitFor(30*time.Second, "kubelet can allocate both slices again", func() bool { return advertised() == 2 })
	t.Logf("agent reports the slices allocatable %v after kubelet started", time.Since(start).Round(time.Millisecond))
	e.pod("c", 0, map[string]int64{r3: 1})
	e.waitFor(60*time.Second, "c Running or Failed", func() bool {
		return e.phase("c") == v1.PodRunning || e.phase("c") == v1.PodFailed
	})
	c, err := cluster.Kube.CoreV1().Pods(e.ns).Get(ctx, "c", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, v1.PodRunning, c.Status.Phase, "%s: %s", c.Status.Reason, c.Status.Message)
	t.Logf("c Running %v after kubelet started", time.Since(start).Round(time.Millisecond))
	assert.Equal(t, freed, n.Holding(e.ns + "/c")[r3], "c has the slice a had")
	assert.Equal(t, v1.PodRunning, e.phase("b"))
	np, err := cluster.Partition(ctx, n.Name)
	require.NoError(t, err)
	assert.True(t, meta.IsStatusConditionFalse(np.Status.Conditions, v1alpha1.ConditionRestarting), "the node is open again")
	e.invariants()
}
