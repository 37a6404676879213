// Package e2e runs dynamig end to end on the local cluster (test/local):
// etcd, kube-apiserver and kube-controller-manager processes built from the
// Go modules, the dynamig scheduler, and per node the real kubelet on a
// fake container runtime with a stand-in for NVIDIA's device plugin, and
// the real node agent on simulated GPUs (test/kubeletnode). Each test
// asserts what a user would see: pods Running, NodePartitions, events.
package e2e

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/local"
)

// cluster is shared by the tests of the package; each test uses its own
// nodes (selected by the label "e2e") and namespace.
var cluster *local.Cluster

func TestMain(m *testing.M) {
	ctx := context.Background()
	// The components log to a file: E2E_LOG=path keeps it (default: discarded
	// with the cluster's directory); E2E_V sets the verbosity.
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("v", cmp.Or(os.Getenv("E2E_V"), "2"))
	_ = klogFlags.Set("logtostderr", "false")
	_ = klogFlags.Set("stderrthreshold", "FATAL")
	logFile, err := os.Create(cmp.Or(os.Getenv("E2E_LOG"), os.DevNull))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	klog.SetOutput(logFile)
	cluster, err = local.Start(ctx, local.Options{Progress: os.Stderr, DevicePluginDelay: 200 * time.Millisecond, SliceDelay: 20 * time.Millisecond, DevicePluginTimeout: 20 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the local cluster:", err)
		os.Exit(1)
	}
	code := m.Run()
	cluster.Stop()
	os.Exit(code)
}

// env is one test's slice of the cluster.
type env struct {
	t      *testing.T
	ns     string
	group  string
	suffix string // of the namespace and node names after the first run (go test -count=N)
	nodes  []*kubeletnode.Node
	agent  bool // nodes in agent mode: the agent is their device plugin
}

// modes runs a test once for nodes whose GPU resources NVIDIA's device
// plugin advertises (restarted after every change), and once for nodes
// in agent mode.
func modes(t *testing.T, name string, test func(e *env)) {
	for _, mode := range []string{local.DevicePluginNVIDIA, local.DevicePluginAgent} {
		t.Run(mode, func(t *testing.T) {
			if mode == local.DevicePluginNVIDIA {
				test(newEnv(t, name))
				return
			}
			e := newEnv(t, name+"-agent")
			e.agent, e.suffix = true, e.suffix+"-agent"
			test(e)
		})
	}
}

// runs counts each test's runs in this process, so that -count=N gives
// every run its own namespace and nodes.
var runs = map[string]int{}

func newEnv(t *testing.T, name string) *env {
	ctx := context.Background()
	runs[name]++
	suffix := ""
	if runs[name] > 1 {
		suffix = fmt.Sprintf("-r%d", runs[name])
	}
	name += suffix
	_, err := cluster.Kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = cluster.Kube.CoreV1().Pods(name).DeleteCollection(context.Background(), metav1.DeleteOptions{}, metav1.ListOptions{})
	})
	return &env{t: t, ns: name, group: name, suffix: suffix}
}

// node adds a node of the test's group, with the real kubelet, and waits
// until its agent reports it. Its name has the run's suffix.
func (e *env) node(name string, models ...string) *kubeletnode.Node {
	return e.nodeWith(kubeletnode.Options{Name: name, Models: models})
}

// nodeWith is node with existing slices or labels.
func (e *env) nodeWith(o kubeletnode.Options) *kubeletnode.Node {
	o.Name += e.suffix
	o.Labels = map[string]string{"e2e": e.group}
	o.NoNVIDIAPlugin = e.agent
	n, err := cluster.AddNode(o)
	require.NoError(e.t, err)
	e.nodes = append(e.nodes, n)
	e.waitFor(30*time.Second, "node "+o.Name+" reported", func() bool {
		np, err := cluster.Partition(context.Background(), o.Name)
		return err == nil && len(np.Status.GPUs) == len(o.Models)
	})
	return n
}

// pod creates a pod of the test asking for profiles, for its nodes;
// runFor > 0 makes it finish after running that long.
func (e *env) pod(name string, runFor time.Duration, requests map[string]int64) *v1.Pod {
	p := local.Pod(name, requests)
	p.Namespace = e.ns
	p.Spec.NodeSelector = map[string]string{"e2e": e.group}
	if runFor > 0 {
		local.RunFor(p, runFor.Seconds())
	}
	created, err := cluster.Kube.CoreV1().Pods(e.ns).Create(context.Background(), p, metav1.CreateOptions{})
	require.NoError(e.t, err)
	return created
}

func (e *env) waitFor(timeout time.Duration, what string, cond func() bool) {
	e.t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	if err != nil {
		e.dump()
	}
	require.NoError(e.t, err, "waiting for %s", what)
}

// dump logs what a user would look at: the test's pods and their
// scheduling conditions, and its nodes' NodePartitions.
func (e *env) dump() {
	ctx := context.Background()
	if pods, err := cluster.Kube.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{}); err == nil {
		for _, p := range pods.Items {
			msg := ""
			for _, c := range p.Status.Conditions {
				if c.Type == v1.PodScheduled {
					msg = c.Reason + ": " + c.Message
				}
			}
			e.t.Logf("pod %s: %s on %q nominated %q %s", p.Name, p.Status.Phase, p.Spec.NodeName, p.Status.NominatedNodeName, msg)
		}
	}
	for _, n := range e.nodes {
		if np, err := cluster.Partition(ctx, n.Name); err == nil {
			e.t.Logf("nodepartition %s: spec %s %s; status observed %s %+v %+v", n.Name, np.Spec.PlanID, local.Layout(np.Spec.GPUs), np.Status.ObservedPlanID, np.Status.GPUs, np.Status.Conditions)
		}
		e.t.Logf("node %s simulator: %v %v", n.Name, n.Sim.Layout(0), n.Sim.Ops())
	}
}

func (e *env) phase(name string) v1.PodPhase {
	p, err := cluster.Kube.CoreV1().Pods(e.ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return ""
	}
	return p.Status.Phase
}

func (e *env) waitPhase(timeout time.Duration, phase v1.PodPhase, names ...string) {
	e.t.Helper()
	e.waitFor(timeout, fmt.Sprintf("pods %v %s", names, phase), func() bool {
		for _, n := range names {
			if e.phase(n) != phase {
				return false
			}
		}
		return true
	})
}

// invariants checks the test's nodes with local.Violations: no device
// destroyed while held, none held twice, no pod failed because of a MIG
// device (but the pods named, which the test fails on purpose).
func (e *env) invariants(expected ...string) {
	e.t.Helper()
	destroyed := 0
	for _, n := range e.nodes {
		for _, v := range local.Violations(n.Name, n.Sim, n, expected...) {
			e.t.Error(v)
		}
		for _, op := range n.Sim.Ops() {
			if op.Kind == "destroy-ci" {
				destroyed++
			}
		}
	}
	e.t.Logf("%d MIG devices destroyed, none while held", destroyed)
}

func TestSeed(t *testing.T) { modes(t, "seed", testSeed) }

func testSeed(e *env) {
	t := e.t
	n := e.node("seed-1", "A100-80GB")
	start := time.Now()
	var names []string
	for i := range 5 {
		names = append(names, fmt.Sprintf("seed-%d", i))
		e.pod(names[i], 0, map[string]int64{"nvidia.com/mig-1g.10gb": 1})
	}
	e.waitPhase(60*time.Second, v1.PodRunning, names...)
	t.Logf("5 × 1g.10gb on an empty A100-80GB: all Running %v after creation", time.Since(start).Round(time.Millisecond))
	devices := map[string]bool{}
	for _, name := range names {
		for _, id := range n.Holding(e.ns + "/" + name)["nvidia.com/mig-1g.10gb"] {
			devices[id] = true
		}
	}
	assert.Len(t, devices, 5, "five distinct slices")
	e.waitFor(20*time.Second, "NodePartition applied and reporting 5 used slices", func() bool {
		np, err := cluster.Partition(context.Background(), n.Name)
		if err != nil || np.Status.ObservedPlanID != np.Spec.PlanID {
			return false
		}
		used := 0
		for _, s := range np.Status.GPUs[0].Slices {
			if s.Used {
				used++
			}
		}
		return used == 5
	})
	m, _ := mig.ModelByName("A100-80GB")
	require.NoError(t, m.Validate(n.Sim.Layout(0)))
	assert.Len(t, n.Sim.Layout(0), 5, "exactly the slices the pods need: %v", n.Sim.Layout(0))
	e.invariants()
}

// A day in the life: pods of mixed profiles arrive and finish over time on
// three nodes of three GPU models; every pod runs, and no slice a pod
// holds is ever destroyed.
func TestDayInTheLife(t *testing.T) { modes(t, "day", testDayInTheLife) }

func testDayInTheLife(e *env) {
	e.node("day-a100", "A100-80GB")
	e.node("day-h100", "H100-80GB")
	e.node("day-a30", "A30")
	profiles := []string{"1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb", "1g.6gb", "2g.12gb", "4g.24gb"}
	r := rand.New(rand.NewPCG(7, 11))
	var names []string
	for i := range 24 {
		prof := mig.MustParseProfile(profiles[r.IntN(len(profiles))])
		name := fmt.Sprintf("day-%02d-%s", i, strings.ReplaceAll(prof.String(), ".", "-"))
		names = append(names, name)
		e.pod(name, time.Duration(1+r.IntN(4))*time.Second, map[string]int64{prof.ResourceName(): 1})
		time.Sleep(time.Duration(r.IntN(400)) * time.Millisecond)
	}
	e.waitPhase(3*time.Minute, v1.PodSucceeded, names...)
	e.invariants()
}

// In-use protection under churn: a long-running pod holds a 3g.40gb while
// waves of small pods come and go on the rest of the same GPU.
func TestInUseProtectionUnderChurn(t *testing.T) { modes(t, "churn", testInUseProtectionUnderChurn) }

func testInUseProtectionUnderChurn(e *env) {
	t := e.t
	n := e.node("churn-1", "A100-80GB")
	e.pod("long", 0, map[string]int64{"nvidia.com/mig-3g.40gb": 1})
	e.waitPhase(30*time.Second, v1.PodRunning, "long")
	held := n.Holding(e.ns + "/long")["nvidia.com/mig-3g.40gb"]
	require.Len(t, held, 1)
	waves := [][]string{{"1g.10gb", "1g.10gb", "1g.10gb"}, {"2g.20gb", "1g.10gb"}, {"4g.40gb"}, {"1g.20gb", "2g.20gb"}}
	for w, wave := range waves {
		var names []string
		for i, p := range wave {
			name := fmt.Sprintf("w%d-%d", w, i)
			names = append(names, name)
			e.pod(name, time.Second, map[string]int64{mig.MustParseProfile(p).ResourceName(): 1})
		}
		e.waitPhase(60*time.Second, v1.PodSucceeded, names...)
	}
	assert.Equal(t, v1.PodRunning, e.phase("long"))
	assert.Equal(t, held, n.Holding(e.ns + "/long")["nvidia.com/mig-3g.40gb"], "the long pod keeps its slice")
	e.invariants()
}

// Faults: an NVML create failing once, the agent killed mid-plan, the API
// server restarted, the scheduler restarted — everything converges and
// nothing in use is destroyed.
func TestFaults(t *testing.T) { modes(t, "faults", testFaults) }

func testFaults(e *env) {
	t := e.t
	n := e.node("faults-1", "H100-80GB", "H100-80GB")
	e.pod("anchor", 0, map[string]int64{"nvidia.com/mig-2g.20gb": 1})
	e.waitPhase(30*time.Second, v1.PodRunning, "anchor")

	n.Sim.FailCall(gpu.MethodCreateGPUInstance, 1, gpu.FaultUnknown)
	e.pod("after-nvml-fault", 0, map[string]int64{"nvidia.com/mig-3g.40gb": 1})
	e.waitPhase(60*time.Second, v1.PodRunning, "after-nvml-fault")

	n.Sim.SetLatency(gpu.MethodCreateGPUInstance, 400*time.Millisecond)
	e.pod("agent-killed", 0, map[string]int64{"nvidia.com/mig-1g.10gb": 2})
	e.waitFor(20*time.Second, "a plan under way", func() bool {
		np, err := cluster.Partition(context.Background(), n.Name)
		return err == nil && np.Spec.PlanID != np.Status.ObservedPlanID
	})
	cluster.StopAgent(n.Name)
	n.Sim.SetLatency(gpu.MethodCreateGPUInstance, 0)
	require.NoError(t, cluster.StartAgent(n.Name))
	e.waitPhase(60*time.Second, v1.PodRunning, "agent-killed")

	require.NoError(t, cluster.RestartAPIServer(context.Background()))
	e.pod("after-apiserver-restart", 0, map[string]int64{"nvidia.com/mig-1g.20gb": 1})
	e.waitPhase(90*time.Second, v1.PodRunning, "after-apiserver-restart")

	cluster.StopScheduler()
	e.pod("after-scheduler-restart", 0, map[string]int64{"nvidia.com/mig-1g.10gb": 1})
	require.NoError(t, cluster.StartScheduler())
	e.waitPhase(60*time.Second, v1.PodRunning, "after-scheduler-restart")
	for _, p := range []string{"anchor", "after-nvml-fault", "agent-killed", "after-apiserver-restart"} {
		assert.Equal(t, v1.PodRunning, e.phase(p), p)
	}
	e.invariants()
}

// Bad input: a pod asking for a profile that does not exist and a
// hand-edited invalid NodePartition are reported clearly; other pods run.
func TestBadInput(t *testing.T) { modes(t, "bad", testBadInput) }

func testBadInput(e *env) {
	t := e.t
	n := e.node("bad-1", "A100-80GB")
	e.pod("no-such-profile", 0, map[string]int64{"nvidia.com/mig-9g.99gb": 1})
	e.waitFor(30*time.Second, "MIGInvalidRequest event", func() bool {
		list, err := cluster.Kube.EventsV1().Events(e.ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			return false
		}
		for _, ev := range list.Items {
			if ev.Regarding.Name == "no-such-profile" && ev.Reason == "MIGInvalidRequest" {
				return strings.Contains(ev.Note, "9g.99gb")
			}
		}
		return false
	})
	assert.Equal(t, v1.PodPending, e.phase("no-such-profile"))

	// A plan nobody could have made: 3g.40gb at 2 is not a placement.
	require.NoError(t, retry.RetryOnConflict(retry.DefaultRetry, func() error {
		np, err := cluster.Partitions.Get(context.Background(), n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		np.Spec = v1alpha1.NodePartitionSpec{PlanID: "hand-edited", GPUs: []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 2}}}}}
		_, err = cluster.Partitions.Update(context.Background(), np, metav1.UpdateOptions{})
		return err
	}))
	e.waitFor(30*time.Second, "InvalidSpec condition", func() bool {
		np, err := cluster.Partition(context.Background(), n.Name)
		if err != nil {
			return false
		}
		c := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionFailed)
		return c != nil && c.Reason == "InvalidSpec" && np.Status.ObservedPlanID == "hand-edited"
	})
	assert.Empty(t, n.Sim.Layout(0), "nothing created from an invalid plan")

	e.pod("good", 0, map[string]int64{"nvidia.com/mig-2g.20gb": 1})
	e.waitPhase(60*time.Second, v1.PodRunning, "good")
	assert.Equal(t, v1.PodPending, e.phase("no-such-profile"))

	// A pod bound by hand to a node without a free slice of its profile
	// (the one 2g.20gb is good's) is rejected by kubelet's device manager,
	// for good, as a real kubelet does.
	bypass := local.Pod("bypass", map[string]int64{"nvidia.com/mig-2g.20gb": 1})
	bypass.Namespace, bypass.Spec.NodeName = e.ns, n.Name
	_, err := cluster.Kube.CoreV1().Pods(e.ns).Create(context.Background(), bypass, metav1.CreateOptions{})
	require.NoError(t, err)
	e.waitPhase(30*time.Second, v1.PodFailed, "bypass")
	p, err := cluster.Kube.CoreV1().Pods(e.ns).Get(context.Background(), "bypass", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, "UnexpectedAdmissionError", p.Status.Reason)
	assert.Contains(t, p.Status.Message, "nvidia.com/mig-2g.20gb")
	e.invariants(e.ns + "/bypass")
}
