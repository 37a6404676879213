package integration

import (
	"context"
	"fmt"
	"maps"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/node-agent/agent"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/test/local"
	"github.com/dynamig/dynamig/test/nodesim"
)

// socketDir is a short directory for PodResources sockets (a unix socket
// path must fit in 108 bytes; t.TempDir() paths can be longer).
func socketDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "dm")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// simNode starts a simulated node: kubelet and device-plugin stand-in on
// simulated GPUs of the models.
func (c *cluster) simNode(t *testing.T, name string, restartDelay time.Duration, models ...string) *nodesim.Node {
	return c.simNodeWith(t, nodesim.Options{Name: name, Models: models, RestartDelay: restartDelay})
}

// simNodeWith is simNode with more of the simulation's options.
func (c *cluster) simNodeWith(t *testing.T, o nodesim.Options) *nodesim.Node {
	ctx, cancel := context.WithCancel(context.Background())
	o.SocketDir = socketDir(t)
	n, err := nodesim.Start(ctx, c.cs, o)
	require.NoError(t, err)
	t.Cleanup(func() {
		cancel()
		_ = c.cs.CoreV1().Nodes().Delete(context.Background(), o.Name, metav1.DeleteOptions{})
		_ = c.parts.Delete(context.Background(), o.Name, metav1.DeleteOptions{})
	})
	return n
}

// runningAgent is the real agent of a simulated node, in process.
type runningAgent struct {
	stop func()
}

// startRealAgent runs the node agent on the node's simulated GPUs (its
// own NVML session, as a separate process would have) until stopped.
func (c *cluster) startRealAgent(t *testing.T, n *nodesim.Node, devicePluginTimeout time.Duration) *runningAgent {
	return c.startAgentWithSocket(t, n, n.Socket, devicePluginTimeout)
}

// startAgentWithSocket is startRealAgent with another PodResources socket.
func (c *cluster) startAgentWithSocket(t *testing.T, n *nodesim.Node, socket string, devicePluginTimeout time.Duration) *runningAgent {
	cfg := local.AgentConfig(n.Name, devicePluginTimeout)
	cfg.ResyncPeriod = 300 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		assert.NoError(t, local.RunAgent(ctx, c.cfg, n.Sim, socket, cfg))
	}()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(stop)
	return &runningAgent{stop: stop}
}

// waitReported waits until the agent has created the node's NodePartition
// and reported its GPUs.
func (c *cluster) waitReported(t *testing.T, node string) *v1alpha1.NodePartition {
	t.Helper()
	var np *v1alpha1.NodePartition
	waitFor(t, 20*time.Second, "NodePartition "+node+" reported", func() (bool, error) {
		got, err := c.parts.Get(context.Background(), node, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		np = got
		return len(np.Status.GPUs) > 0, nil
	})
	return np
}

// publish writes a plan to the node's NodePartition spec, as the scheduler does.
func (c *cluster) publish(t *testing.T, node, plan string, layouts map[int32][]string) {
	spec := v1alpha1.NodePartitionSpec{PlanID: plan}
	idx := make([]int, 0, len(layouts))
	for i := range layouts {
		idx = append(idx, int(i))
	}
	sort.Ints(idx)
	for _, i := range idx {
		g := v1alpha1.GPULayout{Index: int32(i), Slices: []v1alpha1.Slice{}}
		for _, s := range layouts[int32(i)] {
			sl := mustSlice(s)
			g.Slices = append(g.Slices, v1alpha1.Slice{Profile: sl.Profile.String(), Start: int32(sl.Start)})
		}
		spec.GPUs = append(spec.GPUs, g)
	}
	// The agent writes the status meanwhile: retry on conflict, as the
	// scheduler's optimistic publish does.
	require.NoError(t, retry.RetryOnConflict(retry.DefaultRetry, func() error {
		np := c.partition(t, node)
		np.Spec = spec
		_, err := c.parts.Update(context.Background(), np, metav1.UpdateOptions{})
		return err
	}))
}

func mustSlice(s string) mig.Slice {
	var p string
	var start int
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '@' {
			p = s[:i]
			_, _ = fmt.Sscan(s[i+1:], &start)
			break
		}
	}
	return mig.Slice{Profile: mig.MustParseProfile(p), Start: start}
}

func layoutStrings(l []mig.Slice) []string {
	out := []string{}
	for _, s := range l {
		out = append(out, s.String())
	}
	sort.Strings(out)
	return out
}

// condition returns a NodePartition condition, or an empty one.
func condition(np *v1alpha1.NodePartition, kind string) metav1.Condition {
	if c := meta.FindStatusCondition(np.Status.Conditions, kind); c != nil {
		return *c
	}
	return metav1.Condition{}
}

// waitApplied waits until the agent reports the plan applied.
func (c *cluster) waitApplied(t *testing.T, node, plan string) *v1alpha1.NodePartition {
	t.Helper()
	return c.waitDone(t, node, plan, v1alpha1.ConditionApplied)
}

// waitRefused waits until the agent is done with a plan it did not apply
// (observedPlanID moves, Failed is True) and returns the NodePartition.
func (c *cluster) waitRefused(t *testing.T, node, plan string) *v1alpha1.NodePartition {
	t.Helper()
	return c.waitDone(t, node, plan, v1alpha1.ConditionFailed)
}

// waitDone waits until observedPlanID is the plan and the condition True.
func (c *cluster) waitDone(t *testing.T, node, plan, cond string) *v1alpha1.NodePartition {
	t.Helper()
	var np *v1alpha1.NodePartition
	waitFor(t, 30*time.Second, fmt.Sprintf("plan %s on %s: %s", plan, node, cond), func() (bool, error) {
		np = c.partition(t, node)
		return np.Status.ObservedPlanID == plan && condition(np, cond).Status == metav1.ConditionTrue, nil
	})
	return np
}

// boundPod creates a pod bound to the node (no scheduler involved)
// requesting one slice of a profile, and waits for the stand-in kubelet
// to run it.
func (c *cluster) boundPod(t *testing.T, ns, name, node, profile string) {
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: v1.PodSpec{NodeName: node, Containers: []v1.Container{{Name: "main", Image: "cuda", Resources: v1.ResourceRequirements{
			Limits: v1.ResourceList{v1.ResourceName(mig.MustParseProfile(profile).ResourceName()): resource.MustParse("1")},
		}}}},
	}
	_, err := c.cs.CoreV1().Pods(ns).Create(context.Background(), pod, metav1.CreateOptions{})
	require.NoError(t, err)
	waitFor(t, 10*time.Second, "pod "+name+" running", func() (bool, error) {
		p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		return err == nil && p.Status.Phase == v1.PodRunning, err
	})
}

func (c *cluster) coreEvents(t *testing.T, kind, name, reason string) []v1.Event {
	sel := fields.Set{"involvedObject.kind": kind, "involvedObject.name": name, "reason": reason}.AsSelector().String()
	list, err := c.cs.CoreV1().Events("").List(context.Background(), metav1.ListOptions{FieldSelector: sel})
	require.NoError(t, err)
	return list.Items
}

func allocatable(t *testing.T, c *cluster, node string) map[string]int64 {
	n, err := c.cs.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
	require.NoError(t, err)
	out := map[string]int64{}
	for r, q := range n.Status.Allocatable {
		if mig.IsMIGResource(string(r)) && q.Value() > 0 {
			out[string(r)] = q.Value()
		}
	}
	return out
}

// waitAllocatable waits for the node's MIG allocatable to be want: up to
// two of the stand-in kubelet's 10 s status ticks.
func (c *cluster) waitAllocatable(t *testing.T, node string, want map[string]int64) {
	t.Helper()
	waitFor(t, 2*nodesim.DefaultStatusUpdatePeriod+5*time.Second, "Node allocatable "+fmt.Sprint(want), func() (bool, error) {
		return maps.Equal(allocatable(t, c, node), want), nil
	})
}

// destroyedUUIDs are the MIG devices whose compute instance the simulator destroyed.
func destroyedUUIDs(n *nodesim.Node) map[string]bool {
	out := map[string]bool{}
	for _, op := range n.Sim.Ops() {
		if op.Kind == "destroy-ci" {
			out[op.UUID] = true
		}
	}
	return out
}

// TestNodeAgent runs the real node agent on simulated GPUs against a real
// API server, with a kubelet and device-plugin stand-in per node.
func TestNodeAgent(t *testing.T) {
	c := startCluster(t)
	t.Run("agent manifests and least privilege", c.testAgentManifests)
	t.Run("helm chart", c.testHelmChart)

	t.Run("reports a freshly labelled node", func(t *testing.T) {
		n := c.simNode(t, "report", 0, "A100-80GB", "H100-80GB")
		n.Sim.SetMIGMode(1, false, false)
		c.startRealAgent(t, n, 10*time.Second)
		np := c.waitReported(t, "report")
		require.Len(t, np.Status.GPUs, 2)
		node, err := c.cs.CoreV1().Nodes().Get(context.Background(), "report", metav1.GetOptions{})
		require.NoError(t, err)
		require.Len(t, np.OwnerReferences, 1)
		assert.Equal(t, node.UID, np.OwnerReferences[0].UID, "owned by its Node")
		g := np.Status.GPUs[0]
		assert.Equal(t, "A100-80GB", g.Model)
		assert.Equal(t, v1alpha1.MIGEnabled, g.MIGMode)
		assert.Regexp(t, "^GPU-", g.UUID)
		names := []string{}
		require.Len(t, np.Status.Models, 1, "the profiles of the GPU with MIG on, once per model")
		assert.Equal(t, "A100-80GB", np.Status.Models[0].Name)
		for _, p := range np.Status.Models[0].Profiles {
			names = append(names, p.Name)
		}
		assert.ElementsMatch(t, []string{"1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"}, names, "profiles discovered through NVML")
		assert.Empty(t, g.Profiles, "its model's")
		assert.Equal(t, v1alpha1.MIGDisabled, np.Status.GPUs[1].MIGMode)
		assert.Empty(t, np.Status.GPUs[1].Profiles)
		assert.Equal(t, agent.ReasonNoPlan, condition(np, v1alpha1.ConditionApplied).Reason)
		waitFor(t, 10*time.Second, "MIG mode event on the node", func() (bool, error) {
			return len(c.coreEvents(t, "Node", "report", agent.ReasonMIGDisabled)) > 0, nil
		})

		// A plan for the GPU with MIG off is refused with the fix in words.
		c.publish(t, "report", "p-off", map[int32][]string{1: {"1g.10gb@0"}})
		waitFor(t, 10*time.Second, "MIG mode condition", func() (bool, error) {
			np = c.partition(t, "report")
			return condition(np, v1alpha1.ConditionFailed).Reason == agent.ReasonMIGDisabled, nil
		})
		assert.Contains(t, condition(np, v1alpha1.ConditionFailed).Message, "nvidia-smi -i 1 -mig 1")
		assert.Equal(t, "p-off", np.Status.ObservedPlanID, "the agent is done with a plan it cannot apply")
	})

	t.Run("applies a plan at its placements and waits for the device plugin", func(t *testing.T) {
		n := c.simNode(t, "apply", 500*time.Millisecond, "A100-80GB")
		c.startRealAgent(t, n, 20*time.Second)
		c.waitReported(t, "apply")
		pluginBefore := c.devicePluginUID(t, "apply")
		start := time.Now()
		c.publish(t, "apply", "p-1", map[int32][]string{0: {"1g.10gb@0", "1g.10gb@1", "3g.40gb@4"}})
		np := c.waitApplied(t, "apply", "p-1")
		took := time.Since(start)
		// Applied is reported only once kubelet can allocate the new
		// slices: the status marks them advertised; Node allocatable
		// follows at kubelet's next status update.
		assert.Equal(t, map[string]int64{"nvidia.com/mig-1g.10gb": 2, "nvidia.com/mig-3g.40gb": 1}, partition.Decode(np).Advertised)
		c.waitAllocatable(t, "apply", map[string]int64{"nvidia.com/mig-1g.10gb": 2, "nvidia.com/mig-3g.40gb": 1})
		assert.Equal(t, []string{"1g.10gb@0", "1g.10gb@1", "3g.40gb@4"}, layoutStrings(n.Sim.Layout(0)))
		assert.GreaterOrEqual(t, took, 500*time.Millisecond, "the agent waited for the restarted device plugin")
		assert.NotEqual(t, pluginBefore, c.devicePluginUID(t, "apply"), "device plugin pod replaced")
		assert.Equal(t, 1, n.Restarts())
		for _, s := range np.Status.GPUs[0].Slices {
			assert.Regexp(t, "^MIG-", s.UUID)
			assert.False(t, s.Used)
		}
		waitFor(t, 10*time.Second, "LayoutApplied event", func() (bool, error) {
			return len(c.coreEvents(t, "NodePartition", "apply", agent.ReasonApplied)) > 0, nil
		})
		t.Logf("plan p-1 (3 slices, 0.5 s device-plugin restart) applied and advertised %v after publishing", took.Round(time.Millisecond))

		// A second plan changes only what differs.
		opsBefore := len(n.Sim.Ops())
		c.publish(t, "apply", "p-2", map[int32][]string{0: {"1g.10gb@0", "2g.20gb@2", "3g.40gb@4"}})
		c.waitApplied(t, "apply", "p-2")
		var kinds []string
		for _, op := range n.Sim.Ops()[opsBefore:] {
			kinds = append(kinds, op.Kind+" "+op.Slice.String())
		}
		assert.Equal(t, []string{"destroy-ci 1g.10gb@1", "destroy 1g.10gb@1", "create 2g.20gb@2", "create-ci 2g.20gb@2"}, kinds)

		// A reboot removes every slice; the agent re-creates the spec's.
		n.Sim.Reboot()
		waitFor(t, 20*time.Second, "slices re-created after reboot", func() (bool, error) {
			return fmt.Sprint(layoutStrings(n.Sim.Layout(0))) == "[1g.10gb@0 2g.20gb@2 3g.40gb@4]", nil
		})
		c.waitApplied(t, "apply", "p-2")
	})

	t.Run("a used slice in the way is not destroyed", func(t *testing.T) {
		ns := c.namespace(t, "agent-used")
		n := c.simNode(t, "used", 0, "A100-80GB")
		c.startRealAgent(t, n, 20*time.Second)
		c.waitReported(t, "used")
		c.publish(t, "used", "p-1", map[int32][]string{0: {"1g.10gb@0", "1g.10gb@1"}})
		c.waitApplied(t, "used", "p-1")
		c.boundPod(t, ns, "holder", "used", "1g.10gb")
		held := n.Holding(ns + "/holder")["nvidia.com/mig-1g.10gb"]
		require.Len(t, held, 1)
		waitFor(t, 10*time.Second, "slice reported used", func() (bool, error) {
			for _, s := range c.partition(t, "used").Status.GPUs[0].Slices {
				if s.UUID == held[0] {
					return s.Used, nil
				}
			}
			return false, nil
		})

		c.publish(t, "used", "p-2", map[int32][]string{0: {"7g.80gb@0"}})
		np := c.waitRefused(t, "used", "p-2")
		failed := condition(np, v1alpha1.ConditionFailed)
		assert.Equal(t, metav1.ConditionTrue, failed.Status)
		assert.Equal(t, agent.ReasonSliceInUse, failed.Reason)
		assert.Contains(t, failed.Message, "used by pod "+ns+"/holder")
		assert.Equal(t, metav1.ConditionFalse, condition(np, v1alpha1.ConditionApplied).Status)
		assert.Equal(t, []string{"1g.10gb@0", "1g.10gb@1"}, layoutStrings(n.Sim.Layout(0)), "the GPU is left as it was")
		assert.False(t, destroyedUUIDs(n)[held[0]])
		waitFor(t, 10*time.Second, "SliceInUse event", func() (bool, error) {
			return len(c.coreEvents(t, "NodePartition", "used", agent.ReasonSliceInUse)) == 1, nil
		})

		// Once the pod is gone the slice is free, but the refused plan is
		// never pursued (it was made for pods that may be long gone): the
		// scheduler plans again from the status, and a new plan is applied.
		require.NoError(t, c.cs.CoreV1().Pods(ns).Delete(context.Background(), "holder", metav1.DeleteOptions{}))
		waitFor(t, 10*time.Second, "the slice reported free", func() (bool, error) {
			for _, s := range c.partition(t, "used").Status.GPUs[0].Slices {
				if s.Used {
					return false, nil
				}
			}
			return true, nil
		})
		time.Sleep(2 * time.Second) // two resyncs of the agent
		assert.Equal(t, []string{"1g.10gb@0", "1g.10gb@1"}, layoutStrings(n.Sim.Layout(0)), "refused plan p-2 not applied later")
		c.publish(t, "used", "p-3", map[int32][]string{0: {"7g.80gb@0"}})
		c.waitApplied(t, "used", "p-3")
		assert.Equal(t, []string{"7g.80gb@0"}, layoutStrings(n.Sim.Layout(0)))
	})

	t.Run("an NVML fault in the middle of a plan is retried", func(t *testing.T) {
		n := c.simNode(t, "fault", 0, "H100-80GB")
		c.startRealAgent(t, n, 20*time.Second)
		c.waitReported(t, "fault")
		n.Sim.FailCall(gpu.MethodCreateGPUInstance, 2, gpu.FaultUnknown)
		n.Sim.FailCall(gpu.MethodCreateComputeInstance, 3, gpu.FaultUnknown)
		c.publish(t, "fault", "p-1", map[int32][]string{0: {"2g.20gb@0", "2g.20gb@2", "3g.40gb@4"}})
		c.waitApplied(t, "fault", "p-1")
		assert.Equal(t, []string{"2g.20gb@0", "2g.20gb@2", "3g.40gb@4"}, layoutStrings(n.Sim.Layout(0)))
		assert.Positive(t, counter(t, "dynamig_agent_nvml_errors_total", map[string]string{"operation": "create", "code": "UNKNOWN"}))
		waitFor(t, 10*time.Second, "NVMLError event", func() (bool, error) {
			return len(c.coreEvents(t, "NodePartition", "fault", agent.ReasonNVMLError)) > 0, nil
		})
	})

	t.Run("agent killed mid-plan converges after restart; nothing used destroyed", func(t *testing.T) {
		ns := c.namespace(t, "agent-restart")
		n := c.simNode(t, "restart", 0, "A100-80GB", "A100-80GB")
		a := c.startRealAgent(t, n, 20*time.Second)
		c.waitReported(t, "restart")
		c.publish(t, "restart", "p-1", map[int32][]string{0: {"3g.40gb@0", "3g.40gb@4"}, 1: {"3g.40gb@4"}})
		c.waitApplied(t, "restart", "p-1")
		c.boundPod(t, ns, "busy", "restart", "3g.40gb")
		busy := n.Holding(ns + "/busy")["nvidia.com/mig-3g.40gb"][0]

		n.Sim.SetLatency(gpu.MethodCreateGPUInstance, 300*time.Millisecond)
		opsBefore := len(n.Sim.Ops())
		// Keep the held slice wherever kubelet put it; change everything else.
		keep := map[int32][]string{}
		for _, g := range c.partition(t, "restart").Status.GPUs {
			keep[g.Index] = []string{"1g.10gb@0", "1g.10gb@1", "2g.20gb@2", "2g.20gb@4", "1g.10gb@6"}
			for _, s := range g.Slices {
				if s.UUID != busy {
					continue
				}
				half := 4 - s.Start // the other half of the GPU
				keep[g.Index] = []string{fmt.Sprintf("3g.40gb@%d", s.Start)}
				for i := half; i < half+3; i++ {
					keep[g.Index] = append(keep[g.Index], fmt.Sprintf("1g.10gb@%d", i))
				}
			}
		}
		c.publish(t, "restart", "p-2", keep)
		waitFor(t, 10*time.Second, "the plan under way", func() (bool, error) {
			for _, op := range n.Sim.Ops()[opsBefore:] {
				if op.Kind == "create" {
					return true, nil
				}
			}
			return false, nil
		})
		a.stop()
		assert.NotEqual(t, "p-2", c.partition(t, "restart").Status.ObservedPlanID, "killed before the plan was done")
		n.Sim.SetLatency(gpu.MethodCreateGPUInstance, 0)
		c.startRealAgent(t, n, 20*time.Second)
		c.waitApplied(t, "restart", "p-2")
		for gi, want := range keep {
			assert.ElementsMatch(t, want, layoutStrings(n.Sim.Layout(int(gi))), "gpu %d", gi)
		}
		assert.False(t, destroyedUUIDs(n)[busy], "the used slice was never destroyed")
	})

	t.Run("device plugin that does not come back ends in a condition, then recovers", func(t *testing.T) {
		n := c.simNode(t, "plugin", 0, "A30")
		c.startRealAgent(t, n, time.Second)
		c.waitReported(t, "plugin")
		n.PauseDevicePlugin(true)
		c.publish(t, "plugin", "p-1", map[int32][]string{0: {"2g.12gb@0", "1g.6gb@2", "1g.6gb@3"}})
		var np *v1alpha1.NodePartition
		waitFor(t, 10*time.Second, "device-plugin timeout condition", func() (bool, error) {
			np = c.partition(t, "plugin")
			return condition(np, v1alpha1.ConditionFailed).Reason == agent.ReasonDevicePluginTimeout, nil
		})
		assert.Contains(t, condition(np, v1alpha1.ConditionFailed).Message, "did not re-advertise the slices within 1s")
		assert.NotEqual(t, "p-1", np.Status.ObservedPlanID, "not applied while the slices are not advertised")
		assert.Len(t, np.Status.GPUs[0].Slices, 3, "the status says what exists")
		n.PauseDevicePlugin(false)
		np = c.waitApplied(t, "plugin", "p-1")
		assert.Equal(t, map[string]int64{"nvidia.com/mig-1g.6gb": 2, "nvidia.com/mig-2g.12gb": 1}, partition.Decode(np).Advertised)
		c.waitAllocatable(t, "plugin", map[string]int64{"nvidia.com/mig-1g.6gb": 2, "nvidia.com/mig-2g.12gb": 1})
	})

	t.Run("a device plugin slower than the timeout is waited for, not restarted again", func(t *testing.T) {
		n := c.simNodeWith(t, nodesim.Options{Name: "slowplugin", Models: []string{"A30"}, RegisterDelay: 2 * time.Second})
		c.startRealAgent(t, n, time.Second)
		c.waitReported(t, "slowplugin")
		before := n.Restarts()
		c.publish(t, "slowplugin", "p-1", map[int32][]string{0: {"2g.12gb@0", "1g.6gb@2", "1g.6gb@3"}})
		np := c.waitApplied(t, "slowplugin", "p-1")
		assert.Equal(t, 1, n.Restarts()-before, "the agent restarts the plugin once per change, however long it takes to come up")
		assert.Equal(t, map[string]int64{"nvidia.com/mig-1g.6gb": 2, "nvidia.com/mig-2g.12gb": 1}, partition.Decode(np).Advertised)
	})

	t.Run("the seed end to end: scheduler, agent, device plugin, kubelet", func(t *testing.T) {
		ns := c.namespace(t, "agent-seed")
		n := c.simNode(t, "seed", 200*time.Millisecond, "A100-80GB")
		c.startRealAgent(t, n, 20*time.Second)
		c.waitReported(t, "seed")
		c.startScheduler(t)
		start := time.Now()
		template := migPod(ns, "", "nvidia.com/mig-1g.10gb")
		template.Labels = map[string]string{"app": "seed"}
		_, err := c.cs.AppsV1().Deployments(ns).Create(context.Background(), &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "seed"},
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr.To[int32](5),
				Selector: &metav1.LabelSelector{MatchLabels: template.Labels},
				Template: v1.PodTemplateSpec{ObjectMeta: template.ObjectMeta, Spec: template.Spec},
			},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		var pods []v1.Pod
		waitFor(t, 60*time.Second, "5 pods of the Deployment running", func() (bool, error) {
			list, err := c.cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "app=seed"})
			if err != nil {
				return false, err
			}
			pods = list.Items
			running := 0
			for _, p := range pods {
				if p.Status.Phase == v1.PodRunning {
					running++
				}
			}
			return running == 5 && len(pods) == 5, nil
		})
		t.Logf("5 × 1g.10gb on an empty A100-80GB: all Running %v after the Deployment was created", time.Since(start).Round(time.Millisecond))
		devices := map[string]bool{}
		for _, p := range pods {
			held := n.Holding(ns + "/" + p.Name)["nvidia.com/mig-1g.10gb"]
			require.Len(t, held, 1, "pod %s holds one slice", p.Name)
			devices[held[0]] = true
		}
		assert.Len(t, devices, 5, "five distinct MIG devices")
		waitFor(t, 10*time.Second, "the status reports the plan applied and five slices used", func() (bool, error) {
			np := c.partition(t, "seed")
			used := 0
			for _, s := range np.Status.GPUs[0].Slices {
				if s.Used {
					used++
				}
			}
			return np.Spec.PlanID == np.Status.ObservedPlanID && used == 5, nil
		})
		m, err := mig.ModelByName("A100-80GB")
		require.NoError(t, err)
		require.NoError(t, m.Validate(n.Sim.Layout(0)), "the GPU holds a valid layout")
		require.NoError(t, c.cs.AppsV1().Deployments(ns).Delete(context.Background(), "seed", metav1.DeleteOptions{}))
	})

	t.Run("kubelet unreachable: slices are created, none destroyed, every slice counts as used", func(t *testing.T) {
		n := c.simNode(t, "nokubelet", 0, "A100-80GB")
		c.startAgentWithSocket(t, n, n.Socket+".absent", 10*time.Second)
		c.waitReported(t, "nokubelet")
		c.publish(t, "nokubelet", "p-1", map[int32][]string{0: {"1g.10gb@0", "1g.10gb@1"}})
		// The slices are created, but without kubelet neither who holds
		// them nor what it can allocate is known: they are reported used,
		// and the plan is not confirmed applied.
		var np *v1alpha1.NodePartition
		waitFor(t, 30*time.Second, "p-1's slices reported, used", func() (bool, error) {
			np = c.partition(t, "nokubelet")
			slices := np.Status.GPUs[0].Slices
			return len(slices) == 2 && slices[0].Used && slices[1].Used, nil
		})
		assert.Equal(t, []string{"1g.10gb@0", "1g.10gb@1"}, layoutStrings(n.Sim.Layout(0)))
		assert.NotEqual(t, "p-1", np.Status.ObservedPlanID, "not confirmed without kubelet")
		assert.Equal(t, agent.ReasonKubeletUnreachable, condition(np, v1alpha1.ConditionFailed).Reason)
		c.publish(t, "nokubelet", "p-2", map[int32][]string{0: {"7g.80gb@0"}})
		np = c.waitRefused(t, "nokubelet", "p-2")
		assert.Equal(t, agent.ReasonKubeletUnreachable, condition(np, v1alpha1.ConditionFailed).Reason)
		assert.Equal(t, []string{"1g.10gb@0", "1g.10gb@1"}, layoutStrings(n.Sim.Layout(0)))
	})

	t.Run("an invalid plan is refused with a reason", func(t *testing.T) {
		n := c.simNode(t, "invalid", 0, "A100-40GB")
		c.startRealAgent(t, n, 10*time.Second)
		c.waitReported(t, "invalid")
		// 3g.40gb is an A100-80GB profile; this GPU offers 3g.20gb.
		c.publish(t, "invalid", "p-1", map[int32][]string{0: {"3g.40gb@0"}})
		np := c.waitRefused(t, "invalid", "p-1")
		assert.Equal(t, agent.ReasonInvalidSpec, condition(np, v1alpha1.ConditionFailed).Reason)
		assert.Contains(t, condition(np, v1alpha1.ConditionFailed).Message, "3g.40gb")
		assert.Empty(t, n.Sim.Layout(0))
	})
}

// devicePluginUID is the UID of the node's device-plugin pod.
func (c *cluster) devicePluginUID(t *testing.T, node string) string {
	pods, err := c.cs.CoreV1().Pods(nodesim.DevicePluginNamespace).List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	require.NoError(t, err)
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			return string(p.UID)
		}
	}
	return ""
}
