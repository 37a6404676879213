package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/builders"
)

const schedulerName = "dynamig-scheduler"

// TestScheduler runs every scenario on one API server, one after another;
// each starts its own scheduler and fake agent and cleans up its nodes.
func TestScheduler(t *testing.T) {
	c := startCluster(t)
	t.Run("seed", c.testSeed)
	t.Run("used slices are kept", c.testUsedSlicesKept)
	t.Run("preemption frees a slice for a higher priority", c.testPreemption)
	t.Run("node constraints", c.testNodeConstraints)
	t.Run("bad input", c.testBadInput)
	t.Run("non-GPU pod", c.testNonGPUPod)
	t.Run("many pods at once", c.testManyPods)
	t.Run("scheduler restart with a plan in flight", c.testRestart)
	t.Run("bad plugin args stop the scheduler", c.testBadArgs)
	t.Run("CRD validation", c.testCRDValidation)
	t.Run("scheduler manifests", c.testSchedulerManifests)
}

// migPod is a pod of dynamig-scheduler asking for MIG resources, given as
// "nvidia.com/mig-1g.10gb" (one) or "nvidia.com/mig-1g.10gb=2".
func migPod(ns, name string, resources ...string) *v1.Pod {
	limits := v1.ResourceList{}
	for _, r := range resources {
		res, n, ok := strings.Cut(r, "=")
		if !ok {
			n = "1"
		}
		limits[v1.ResourceName(res)] = resource.MustParse(n)
	}
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.PodSpec{
			SchedulerName: schedulerName,
			Containers: []v1.Container{{Name: "main", Image: "registry.k8s.io/pause:3.10",
				Resources: v1.ResourceRequirements{Limits: limits, Requests: limits}}},
		},
	}
}

func (c *cluster) create(t *testing.T, pods ...*v1.Pod) {
	for _, p := range pods {
		_, err := c.cs.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{})
		require.NoError(t, err)
	}
}

// waitBound waits until every pod is bound and returns their nodes.
func (c *cluster) waitBound(t *testing.T, ns string, names ...string) map[string]string {
	nodes := map[string]string{}
	waitFor(t, 60*time.Second, fmt.Sprintf("pods %v bound", names), func() (bool, error) {
		for _, n := range names {
			p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), n, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if p.Spec.NodeName == "" {
				return false, nil
			}
			nodes[n] = p.Spec.NodeName
		}
		return true, nil
	})
	return nodes
}

// unschedulable waits until the pod's PodScheduled condition is False with
// reason Unschedulable and returns its message.
func (c *cluster) unschedulable(t *testing.T, ns, name string) string {
	var msg string
	waitFor(t, 30*time.Second, "pod "+name+" unschedulable", func() (bool, error) {
		p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == v1.PodScheduled && cond.Status == v1.ConditionFalse && cond.Reason == v1.PodReasonUnschedulable {
				msg = cond.Message
				return true, nil
			}
		}
		return false, nil
	})
	return msg
}

// events returns the reasons and notes of the events about a pod.
func (c *cluster) events(t *testing.T, ns, name string) map[string]string {
	list, err := c.cs.EventsV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	out := map[string]string{}
	for _, e := range list.Items {
		if e.Regarding.Name == name {
			out[e.Reason] = e.Note
		}
	}
	return out
}

// counter sums a counter of the legacy registry with the given labels.
func counter(t *testing.T, name string, labels map[string]string) float64 {
	families, err := legacyregistry.DefaultGatherer.Gather()
	require.NoError(t, err)
	total := 0.0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metrics:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if want, ok := labels[l.GetName()]; ok && want != l.GetValue() {
					continue metrics
				}
			}
			total += m.GetCounter().GetValue()
		}
	}
	return total
}

// The seed: one A100-80GB with MIG on and no slices, a Deployment of five
// pods asking for a 1g.10gb each → all five bound, on a valid layout with
// five 1g.10gb.
func (c *cluster) testSeed(t *testing.T) {
	ns := c.namespace(t, "seed")
	c.addNode(t, "seed-a", []string{"A100-80GB"}, nil, nil)
	c.startAgent(t, "seed-a")
	c.startScheduler(t)
	planned := counter(t, "dynamig_scheduler_plans_total", map[string]string{"result": "planned"})

	template := migPod(ns, "", "nvidia.com/mig-1g.10gb")
	template.Labels = map[string]string{"app": "seed"}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "seed"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](5),
			Selector: &metav1.LabelSelector{MatchLabels: template.Labels},
			Template: v1.PodTemplateSpec{ObjectMeta: template.ObjectMeta, Spec: template.Spec},
		},
	}
	_, err := c.cs.AppsV1().Deployments(ns).Create(context.Background(), d, metav1.CreateOptions{})
	require.NoError(t, err)
	var names []string
	waitFor(t, 60*time.Second, "5 pods of the Deployment bound", func() (bool, error) {
		pods, err := c.cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "app=seed"})
		if err != nil {
			return false, err
		}
		names = names[:0]
		for _, p := range pods.Items {
			if p.Spec.NodeName != "seed-a" {
				return false, nil
			}
			names = append(names, p.Name)
		}
		return len(names) == 5, nil
	})
	np := c.partition(t, "seed-a")
	m, _ := mig.ModelByName("A100-80GB")
	var layout []mig.Slice
	ones := 0
	for _, g := range np.Spec.GPUs {
		for _, s := range g.Slices {
			p, err := mig.ParseProfile(s.Profile)
			require.NoError(t, err)
			layout = append(layout, mig.Slice{Profile: p, Start: int(s.Start)})
			if s.Profile == "1g.10gb" {
				ones++
			}
		}
	}
	require.NoError(t, m.Validate(layout))
	assert.GreaterOrEqual(t, ones, 5)
	assert.Equal(t, np.Spec.PlanID, np.Status.ObservedPlanID)

	planEvents := 0
	for _, n := range names {
		if note, ok := c.events(t, ns, n)["MIGRepartitionPlanned"]; ok {
			planEvents++
			assert.Contains(t, note, "1g.10gb")
		}
	}
	assert.Positive(t, planEvents, "MIGRepartitionPlanned on the pods")
	assert.Greater(t, counter(t, "dynamig_scheduler_plans_total", map[string]string{"result": "planned"}), planned)
	require.NoError(t, c.cs.AppsV1().Deployments(ns).Delete(context.Background(), "seed", metav1.DeleteOptions{}))
}

// Used slices are kept: a pod runs on a 3g.40gb at 0; a 4g.40gb (which
// needs slices 0–3) cannot be planned and waits with a reason; a 3g.40gb is
// served at 4, and the published layout still has the used slice.
func (c *cluster) testUsedSlicesKept(t *testing.T) {
	ns := c.namespace(t, "used")
	c.addNode(t, "used-a", []string{"A100-80GB"}, nil, slicesOf{0: {{Profile: "3g.40gb", Start: 0}}})
	running := migPod(ns, "running", "nvidia.com/mig-3g.40gb")
	running.Spec.NodeName = "used-a" // bound before dynamig saw it
	c.create(t, running)
	c.startAgent(t, "used-a")
	waitFor(t, 10*time.Second, "the running pod's slice marked used", func() (bool, error) {
		np := c.partition(t, "used-a")
		return len(np.Status.GPUs[0].Slices) == 1 && np.Status.GPUs[0].Slices[0].Used, nil
	})
	c.startScheduler(t)

	c.create(t, migPod(ns, "big", "nvidia.com/mig-4g.40gb"))
	msg := c.unschedulable(t, ns, "big")
	assert.Contains(t, msg, "no MIG layout can serve 4g.40gb now")

	c.create(t, migPod(ns, "mid", "nvidia.com/mig-3g.40gb"))
	c.waitBound(t, ns, "mid")
	np := c.partition(t, "used-a")
	assert.Equal(t, []string{"3g.40gb@0", "3g.40gb@4"}, builders.SpecLayout(np, 0))
	p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), "big", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Empty(t, p.Spec.NodeName, "the 4g.40gb still waits")
}

// Preemption: DefaultPreemption, which runs before DynamicMIG, evicts a
// lower-priority pod holding the slice a MIG pod needs when no layout can
// serve it otherwise; a pod of the same priority evicts nobody. DynamicMIG's
// Filter marks only such nodes worth preemption's dry run (Unschedulable,
// not UnschedulableAndUnresolvable): with every node marked unresolvable
// this test fails (docs/reliability.md).
func (c *cluster) testPreemption(t *testing.T) {
	ns := c.namespace(t, "preempt")
	c.addNode(t, "preempt-a", []string{"A100-80GB"}, nil, slicesOf{0: {{Profile: "7g.80gb", Start: 0}}})
	low := migPod(ns, "low", "nvidia.com/mig-7g.80gb")
	low.Spec.NodeName = "preempt-a"
	c.create(t, low)
	c.startAgent(t, "preempt-a")
	waitFor(t, 10*time.Second, "the low-priority pod's slice marked used", func() (bool, error) {
		np := c.partition(t, "preempt-a")
		return len(np.Status.GPUs[0].Slices) == 1 && np.Status.GPUs[0].Slices[0].Used, nil
	})
	high := &schedulingv1.PriorityClass{ObjectMeta: metav1.ObjectMeta{Name: "dynamig-test-high"}, Value: 1000}
	_, err := c.cs.SchedulingV1().PriorityClasses().Create(context.Background(), high, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = c.cs.SchedulingV1().PriorityClasses().Delete(context.Background(), high.Name, metav1.DeleteOptions{})
	})
	c.startScheduler(t)

	c.create(t, migPod(ns, "same", "nvidia.com/mig-7g.80gb"))
	msg := c.unschedulable(t, ns, "same")
	assert.Contains(t, msg, "no MIG layout can serve 7g.80gb now")
	assert.Contains(t, msg, "Preemption is not helpful for scheduling", "DefaultPreemption skipped the node")
	p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), "low", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Nil(t, p.DeletionTimestamp, "a pod of the same priority evicts nobody")

	urgent := migPod(ns, "urgent", "nvidia.com/mig-7g.80gb")
	urgent.Spec.PriorityClassName = high.Name
	c.create(t, urgent)
	waitFor(t, 30*time.Second, "the low-priority pod evicted for the urgent one", func() (bool, error) {
		p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), "low", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return err == nil && p.DeletionTimestamp != nil, err
	})
	waitFor(t, 30*time.Second, "the urgent pod nominated to the node", func() (bool, error) {
		p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), "urgent", metav1.GetOptions{})
		return err == nil && p.Status.NominatedNodeName == "preempt-a", err
	})
}

// Node constraints: a nodeSelector and a taint keep the plan off the nodes
// the pod may not use.
func (c *cluster) testNodeConstraints(t *testing.T) {
	ns := c.namespace(t, "constraints")
	c.addNode(t, "zone-a", []string{"A100-80GB"}, map[string]string{"zone": "a"}, nil)
	c.addNode(t, "zone-b", []string{"A100-80GB"}, map[string]string{"zone": "b"}, nil)
	c.addNode(t, "tainted", []string{"A100-80GB"}, map[string]string{"zone": "b"}, nil)
	node, err := c.cs.CoreV1().Nodes().Get(context.Background(), "tainted", metav1.GetOptions{})
	require.NoError(t, err)
	node.Spec.Taints = []v1.Taint{{Key: "dedicated", Value: "other", Effect: v1.TaintEffectNoSchedule}}
	_, err = c.cs.CoreV1().Nodes().Update(context.Background(), node, metav1.UpdateOptions{})
	require.NoError(t, err)
	c.startAgent(t, "zone-a", "zone-b", "tainted")
	c.startScheduler(t)

	p := migPod(ns, "picky", "nvidia.com/mig-2g.20gb")
	p.Spec.NodeSelector = map[string]string{"zone": "b"}
	c.create(t, p)
	nodes := c.waitBound(t, ns, "picky")
	assert.Equal(t, "zone-b", nodes["picky"])
	assert.Empty(t, c.partition(t, "zone-a").Spec.PlanID, "no plan for a node the selector excludes")
	assert.Empty(t, c.partition(t, "tainted").Spec.PlanID, "no plan for a node whose taint the pod does not tolerate")
}

// Bad input: a pod asking for a profile that does not exist stays Pending
// with a reason and an event; the scheduler keeps serving other pods.
func (c *cluster) testBadInput(t *testing.T) {
	ns := c.namespace(t, "bad")
	c.addNode(t, "bad-a", []string{"A100-80GB"}, nil, nil)
	c.startAgent(t, "bad-a")
	c.startScheduler(t)

	c.create(t, migPod(ns, "unknown", "nvidia.com/mig-9g.99gb"), migPod(ns, "malformed", "nvidia.com/mig-1g"))
	msg := c.unschedulable(t, ns, "unknown")
	assert.Contains(t, msg, `invalid MIG profile "9g.99gb"`)
	msg = c.unschedulable(t, ns, "malformed")
	assert.Contains(t, msg, `resource "nvidia.com/mig-1g"`)
	waitFor(t, 10*time.Second, "MIGInvalidRequest event", func() (bool, error) {
		_, ok := c.events(t, ns, "unknown")["MIGInvalidRequest"]
		return ok, nil
	})

	c.create(t, migPod(ns, "fine", "nvidia.com/mig-1g.10gb"))
	c.waitBound(t, ns, "fine")
}

// A pod without MIG requests is scheduled by dynamig-scheduler like by the
// default scheduler: bound at once, no plan, no DynamicMIG event.
func (c *cluster) testNonGPUPod(t *testing.T) {
	ns := c.namespace(t, "plain")
	c.addNode(t, "plain-a", []string{"A100-80GB"}, nil, nil)
	c.startAgent(t, "plain-a")
	c.startScheduler(t)
	p := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: v1.PodSpec{SchedulerName: schedulerName, Containers: []v1.Container{{Name: "main", Image: "registry.k8s.io/pause:3.10",
			Resources: v1.ResourceRequirements{Requests: v1.ResourceList{v1.ResourceCPU: resource.MustParse("100m")}}}}},
	}
	c.create(t, p)
	nodes := c.waitBound(t, ns, "web")
	assert.Equal(t, "plain-a", nodes["web"])
	assert.Empty(t, c.partition(t, "plain-a").Spec.PlanID)
	for reason := range c.events(t, ns, "web") {
		assert.False(t, strings.HasPrefix(reason, "MIG"), "unexpected DynamicMIG event %s", reason)
	}
}

// Many pods at once: 40 pods of 6 profiles on 4 nodes of 3 GPUs are all
// bound, and no node has more pods on a profile than slices of it.
func (c *cluster) testManyPods(t *testing.T) {
	ns := c.namespace(t, "many")
	var nodes []string
	for i := 0; i < 4; i++ {
		name := fmt.Sprintf("many-%d", i)
		nodes = append(nodes, name)
		c.addNode(t, name, []string{"A100-80GB", "A100-80GB", "A100-80GB"}, nil, nil)
	}
	c.startAgent(t, nodes...)
	c.startScheduler(t)
	mix := map[string]int{"7g.80gb": 1, "4g.40gb": 2, "3g.40gb": 2, "2g.20gb": 5, "1g.20gb": 2, "1g.10gb": 28}
	var names []string
	for _, prof := range []string{"7g.80gb", "4g.40gb", "3g.40gb", "2g.20gb", "1g.20gb", "1g.10gb"} {
		for i := 0; i < mix[prof]; i++ {
			name := fmt.Sprintf("p-%s-%d", strings.ReplaceAll(prof, ".", "-"), i)
			names = append(names, name)
			c.create(t, migPod(ns, name, "nvidia.com/mig-"+prof))
		}
	}
	require.Len(t, names, 40)
	bound := c.waitBound(t, ns, names...)
	demand := map[string]map[string]int{}
	for _, name := range names {
		p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		require.NoError(t, err)
		for r := range p.Spec.Containers[0].Resources.Limits {
			if demand[bound[name]] == nil {
				demand[bound[name]] = map[string]int{}
			}
			demand[bound[name]][strings.TrimPrefix(string(r), mig.ResourcePrefix)]++
		}
	}
	for _, n := range nodes {
		have := map[string]int{}
		np := c.partition(t, n)
		for _, g := range np.Status.GPUs {
			for _, s := range g.Slices {
				have[s.Profile]++
			}
		}
		for prof, want := range demand[n] {
			assert.LessOrEqual(t, want, have[prof], "node %s: %d pods on %s, %d slices", n, want, prof, have[prof])
		}
	}
}

// Scheduler restarted with a plan in flight: the new scheduler finds the
// published plan and the nominations, publishes no second plan, and the
// pods are bound once the agent applies the first.
func (c *cluster) testRestart(t *testing.T) {
	ns := c.namespace(t, "restart")
	c.addNode(t, "restart-a", []string{"A100-80GB"}, nil, nil)
	agent := c.startAgent(t, "restart-a")
	agent.paused.Store(true)
	stop := c.startScheduler(t)
	c.create(t, migPod(ns, "r-0", "nvidia.com/mig-1g.10gb"), migPod(ns, "r-1", "nvidia.com/mig-1g.10gb"))
	waitFor(t, 30*time.Second, "a plan published and both pods nominated", func() (bool, error) {
		if c.partition(t, "restart-a").Spec.PlanID == "" {
			return false, nil
		}
		for _, n := range []string{"r-0", "r-1"} {
			p, err := c.cs.CoreV1().Pods(ns).Get(context.Background(), n, metav1.GetOptions{})
			if err != nil || p.Status.NominatedNodeName != "restart-a" {
				return false, err
			}
		}
		return true, nil
	})
	plan := c.partition(t, "restart-a").Spec.PlanID
	stop()

	c.startScheduler(t)
	time.Sleep(3 * time.Second) // retries with 1 s backoff: time to publish a duplicate if it would
	assert.Equal(t, plan, c.partition(t, "restart-a").Spec.PlanID, "the restarted scheduler keeps the plan in flight")
	agent.paused.Store(false)
	c.waitBound(t, ns, "r-0", "r-1")
	np := c.partition(t, "restart-a")
	assert.Equal(t, plan, np.Spec.PlanID)
	assert.Equal(t, plan, np.Status.ObservedPlanID)
}

// Bad plugin arguments stop the scheduler at start with the field named.
func (c *cluster) testBadArgs(t *testing.T) {
	data, err := os.ReadFile(schedulerConfig)
	require.NoError(t, err)
	bad := strings.Replace(string(data), "maxNodesPerPlan: 100", "maxNodesPerPlan: 0", 1)
	require.NotEqual(t, string(data), bad)
	f := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(f, []byte(bad), 0o600))
	err = c.newScheduler(t, f)
	require.ErrorContains(t, err, "maxNodesPerPlan: Invalid value: 0: must be at least 1")
}

// The CRD's OpenAPI validation rejects a malformed profile or start.
func (c *cluster) testCRDValidation(t *testing.T) {
	ctx := context.Background()
	for name, slice := range map[string]v1alpha1.Slice{
		"bad-profile": {Profile: "9gb", Start: 0},
		"bad-start":   {Profile: "1g.10gb", Start: 9},
	} {
		np := &v1alpha1.NodePartition{
			TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "NodePartition"},
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       v1alpha1.NodePartitionSpec{PlanID: "p-1", GPUs: []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{slice}}}},
		}
		_, err := c.parts.Create(ctx, np, metav1.CreateOptions{})
		require.Error(t, err, name)
		assert.True(t, apierrors.IsInvalid(err), "%s: %v", name, err)
	}
}
