package local

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/scenario"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/nodesim"
)

// DemoOptions configure Demo.
type DemoOptions struct {
	Scenario                      string // a scenario file; the seed if empty
	KeepRunning                   bool
	Dir                           string
	DevicePluginDelay, SliceDelay time.Duration
	TimeScale                     float64
	Timeout                       time.Duration
	KubernetesVersion             string // Options.KubernetesVersion
	DevicePlugin                  string // Options.DevicePlugin
}

// DemoNamespace holds the demo's pods.
const DemoNamespace = "demo"

// SchedulerName is the name pods set to be scheduled by dynamig.
const SchedulerName = "dynamig-scheduler"

// Demo starts a local cluster, runs the seed (or a scenario) on it with a
// timeline, prints the final layout and reports whether every pod ran.
func Demo(ctx context.Context, o DemoOptions, out io.Writer) (bool, error) {
	var sc *scenario.Scenario
	if o.Scenario != "" {
		var err error
		if sc, err = scenario.Load(o.Scenario); err != nil {
			return false, err
		}
	}
	if o.TimeScale <= 0 {
		return false, fmt.Errorf("--time-scale must be positive, got %g", o.TimeScale)
	}
	c, stop, err := startLogged(ctx, Options{Dir: o.Dir, Progress: out, DevicePluginDelay: o.DevicePluginDelay, SliceDelay: o.SliceDelay, KubernetesVersion: o.KubernetesVersion, DevicePlugin: o.DevicePlugin})
	if err != nil {
		return false, err
	}
	ok := false
	defer func() { stop(!ok) }()

	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: DemoNamespace}}, metav1.CreateOptions{}); err != nil {
		return false, err
	}
	tl := WatchTimeline(ctx, c, DemoNamespace, out)
	var done func(context.Context) (bool, error)
	if sc == nil {
		done, err = seed(ctx, c, tl)
	} else {
		done, err = runScenario(ctx, c, tl, sc, o.TimeScale)
	}
	if err != nil {
		return false, err
	}
	start := time.Now()
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, o.Timeout, true, done)
	ok = err == nil
	if ok {
		tl.Printf("every pod ran (%s)", time.Since(start).Round(10*time.Millisecond))
	} else {
		tl.Printf("not every pod ran within %s", o.Timeout)
	}
	time.Sleep(200 * time.Millisecond) // let the last watch events print
	fmt.Fprintln(out)
	if err := printLayouts(ctx, c, out); err != nil {
		return false, err
	}
	if !ok {
		printPending(ctx, c, DemoNamespace, out)
	}
	if o.KeepRunning {
		fmt.Fprintf(out, "\nthe cluster keeps running; in another shell:\n  export KUBECONFIG=%s\n  kubectl get nodepartitions\n  kubectl -n %s get pods -o wide\nCtrl-C stops it.\n", c.Kubeconfig, DemoNamespace)
		<-ctx.Done()
	}
	return ok, nil
}

// startLogged starts a local cluster in o.Dir (a temporary directory if
// empty) whose scheduler and agents log to dynamig.log there, not over the
// output. stop stops it and removes a temporary directory, unless keep.
func startLogged(ctx context.Context, o Options) (*Cluster, func(keep bool), error) {
	tmp := o.Dir == ""
	if tmp {
		var err error
		if o.Dir, err = os.MkdirTemp("", "dynamig-local-"); err != nil {
			return nil, nil, err
		}
	} else if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, nil, err
	}
	logFile, err := os.Create(filepath.Join(o.Dir, "dynamig.log"))
	if err != nil {
		return nil, nil, err
	}
	klog.LogToStderr(false)
	klog.SetOutput(logFile)
	c, err := Start(ctx, o)
	if err != nil {
		_ = logFile.Close()
		return nil, nil, fmt.Errorf("%w (logs in %s)", err, o.Dir)
	}
	fmt.Fprintf(o.Progress, "cluster up; scheduler and agent logs in %s\n\n", logFile.Name())
	return c, func(keep bool) {
		c.Stop()
		klog.Flush()
		_ = logFile.Close()
		if tmp && !keep {
			_ = os.RemoveAll(o.Dir)
		} else {
			fmt.Fprintf(o.Progress, "logs kept in %s\n", o.Dir)
		}
	}, nil
}

// seed is the default run: one node with one empty A100-80GB and a
// Deployment of five pods that each ask for one 1g.10gb slice.
func seed(ctx context.Context, c *Cluster, tl *Timeline) (func(context.Context) (bool, error), error) {
	if _, err := c.AddNode(kubeletnode.Options{Name: "gpu-node-1", Models: []string{"A100-80GB"}}); err != nil {
		return nil, err
	}
	if err := waitReported(ctx, c, "gpu-node-1"); err != nil {
		return nil, err
	}
	tl.Printf("node gpu-node-1 reported by its agent: 1 × A100-80GB, MIG on, no slices")
	template := Pod("", map[string]int64{"nvidia.com/mig-1g.10gb": 1})
	template.Labels = map[string]string{"app": "seed"}
	_, err := c.Kube.AppsV1().Deployments(DemoNamespace).Create(ctx, &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "seed", Namespace: DemoNamespace},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To[int32](5),
			Selector: &metav1.LabelSelector{MatchLabels: template.Labels},
			Template: v1.PodTemplateSpec{ObjectMeta: template.ObjectMeta, Spec: template.Spec},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	tl.Printf("deployment seed created: 5 replicas × nvidia.com/mig-1g.10gb")
	return func(ctx context.Context) (bool, error) {
		pods, err := c.Kube.CoreV1().Pods(DemoNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=seed"})
		if err != nil {
			return false, nil
		}
		running := 0
		for _, p := range pods.Items {
			if p.Status.Phase == v1.PodRunning {
				running++
			}
		}
		return running == 5, nil
	}, nil
}

// RunFor makes a pod a batch job that runs that long: its container
// exits 0 then (nodesim.RunSecondsAnnotation, which both node models
// honour) and, with restartPolicy Never, the pod is Succeeded.
func RunFor(p *v1.Pod, seconds float64) {
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[nodesim.RunSecondsAnnotation] = strconv.FormatFloat(seconds, 'f', 3, 64)
	p.Spec.RestartPolicy = v1.RestartPolicyNever
}

// Pod is a pod for dynamig-scheduler asking for MIG resources.
func Pod(name string, requests map[string]int64) *v1.Pod {
	limits := v1.ResourceList{}
	for r, n := range requests {
		limits[v1.ResourceName(r)] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: DemoNamespace},
		Spec: v1.PodSpec{SchedulerName: SchedulerName, Containers: []v1.Container{{
			Name: "main", Image: "nvcr.io/nvidia/cuda:12.9.0-base-ubuntu24.04",
			Resources: v1.ResourceRequirements{Limits: limits, Requests: limits},
		}}},
	}
}

// createRunning creates a pod and waits until it runs.
func createRunning(ctx context.Context, c *Cluster, pod *v1.Pod) error {
	if _, err := c.Kube.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := c.Kube.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		if p.Status.Phase == v1.PodFailed {
			return false, fmt.Errorf("pod %s failed: %s: %s", p.Name, p.Status.Reason, p.Status.Message)
		}
		return p.Status.Phase == v1.PodRunning, nil
	})
}

func waitReported(ctx context.Context, c *Cluster, node string) error {
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		np, err := c.Partition(ctx, node)
		return err == nil && len(np.Status.GPUs) > 0, nil
	})
}

// Partition reads a node's NodePartition.
func (c *Cluster) Partition(ctx context.Context, node string) (*v1alpha1.NodePartition, error) {
	return c.Partitions.Get(ctx, node, metav1.GetOptions{})
}

// runScenario starts the scenario's nodes (its used slices held by a pod
// bound there) and creates its pods at their arrival times.
func runScenario(ctx context.Context, c *Cluster, tl *Timeline, sc *scenario.Scenario, scale float64) (func(context.Context) (bool, error), error) {
	for _, n := range sc.Nodes {
		existing := map[int][]mig.Slice{}
		for _, s := range n.Slices {
			p, err := mig.ParseProfile(s.Profile)
			if err != nil {
				return nil, err
			}
			existing[s.GPU] = append(existing[s.GPU], mig.Slice{Profile: p, Start: s.Start})
		}
		sim, err := c.AddNode(kubeletnode.Options{Name: n.Name, Models: n.GPUs, Labels: n.Labels, Slices: existing})
		if err != nil {
			return nil, err
		}
		for _, s := range n.Slices {
			if !s.Used {
				continue
			}
			p := mig.MustParseProfile(s.Profile)
			id, err := sim.DeviceAt(s.GPU, mig.Slice{Profile: p, Start: s.Start})
			if err != nil {
				return nil, err
			}
			// The device plugin steers kubelet to the slice; one holder at a
			// time, each Running before the next.
			holder := Pod(fmt.Sprintf("held-%s-gpu%d-%d", n.Name, s.GPU, s.Start), map[string]int64{p.ResourceName(): 1})
			holder.Spec.NodeName = n.Name
			sim.Prefer(p.ResourceName(), id)
			err = createRunning(ctx, c, holder)
			sim.Prefer(p.ResourceName(), "")
			if err != nil {
				return nil, err
			}
		}
		if err := waitReported(ctx, c, n.Name); err != nil {
			return nil, err
		}
		tl.Printf("node %s reported by its agent: %s", n.Name, strings.Join(n.GPUs, ", "))
	}
	priorities := map[int32]bool{}
	for _, p := range sc.Pods {
		if p.Priority != 0 && !priorities[p.Priority] {
			priorities[p.Priority] = true
			_, err := c.Kube.SchedulingV1().PriorityClasses().Create(ctx, &schedulingv1.PriorityClass{
				ObjectMeta: metav1.ObjectMeta{Name: priorityClass(p.Priority)}, Value: p.Priority,
			}, metav1.CreateOptions{})
			if err != nil && !apierrors.IsAlreadyExists(err) {
				return nil, err
			}
		}
	}
	start := time.Now()
	go func() {
		pods := append([]scenario.Pod(nil), sc.Pods...)
		sort.SliceStable(pods, func(i, j int) bool { return pods[i].Arrival < pods[j].Arrival })
		for _, sp := range pods {
			at := start.Add(time.Duration(sp.Arrival / scale * float64(time.Second)))
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(at)):
			}
			req := map[string]int64{}
			for r, n := range sp.Requests {
				req[r] = int64(n)
			}
			pod := Pod(sp.Name, req)
			pod.Spec.NodeSelector = sp.NodeSelector
			if sp.Priority != 0 {
				pod.Spec.PriorityClassName = priorityClass(sp.Priority)
			}
			if sp.Duration > 0 {
				RunFor(pod, sp.Duration/scale)
			}
			if _, err := c.Kube.CoreV1().Pods(DemoNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				tl.Printf("creating pod %s: %v", sp.Name, err)
			}
		}
	}()
	return func(ctx context.Context) (bool, error) {
		for _, sp := range sc.Pods {
			p, err := c.Kube.CoreV1().Pods(DemoNamespace).Get(ctx, sp.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			if p.Status.Phase == v1.PodSucceeded || (sp.Duration == 0 && p.Status.Phase == v1.PodRunning) {
				continue
			}
			return false, nil
		}
		return true, nil
	}, nil
}

func priorityClass(p int32) string { return "dynamig-local-priority-" + strconv.Itoa(int(p)) }

// printLayouts prints each node's GPUs and slices, used ones marked.
func printLayouts(ctx context.Context, c *Cluster, out io.Writer) error {
	list, err := c.Partitions.List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	fmt.Fprintln(out, "final layout:")
	for _, np := range list.Items {
		for _, g := range np.Status.GPUs {
			var ss []string
			for _, s := range g.Slices {
				mark := ""
				if s.Used {
					mark = " (used)"
				}
				ss = append(ss, fmt.Sprintf("%s@%d%s", s.Profile, s.Start, mark))
			}
			fmt.Fprintf(out, "  %s gpu %d %s: %s\n", np.Name, g.Index, g.Model, strings.Join(ss, ", "))
		}
	}
	return nil
}

// printPending says why the pods of namespace ns that did not run are waiting.
func printPending(ctx context.Context, c *Cluster, ns string, out io.Writer) {
	pods, err := c.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	for _, p := range pods.Items {
		if p.Status.Phase != v1.PodPending {
			continue
		}
		msg := "no scheduling condition yet"
		for _, cond := range p.Status.Conditions {
			if cond.Type == v1.PodScheduled && cond.Status == v1.ConditionFalse {
				msg = cond.Message
			}
		}
		fmt.Fprintf(out, "  pending %s: %s\n", p.Name, msg)
	}
}
