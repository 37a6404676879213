package local

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Timeline prints, as it happens, the story a user follows with kubectl:
// a pod pending for lack of a slice, the plan published to a
// NodePartition, the agent applying it, the device plugin advertising the
// slices, the pod bound and running.
type Timeline struct {
	c     *Cluster
	out   io.Writer
	start time.Time

	mu    sync.Mutex
	state map[string]string // what was last printed per object and aspect
}

// WatchTimeline prints the timeline of the pods of namespace ns and of
// every node until ctx ends.
func WatchTimeline(ctx context.Context, c *Cluster, ns string, out io.Writer) *Timeline {
	t := &Timeline{c: c, out: out, start: time.Now(), state: map[string]string{}}
	pods := informers.NewSharedInformerFactoryWithOptions(c.Kube, 0, informers.WithNamespace(ns))
	nodes := informers.NewSharedInformerFactory(c.Kube, 0)
	parts := externalversions.NewSharedInformerFactory(c.Dynamig, 0)
	handler := func(f func(any)) cache.ResourceEventHandlerFuncs {
		return cache.ResourceEventHandlerFuncs{AddFunc: f, UpdateFunc: func(_, obj any) { f(obj) }}
	}
	_, _ = pods.Core().V1().Pods().Informer().AddEventHandler(handler(t.pod))
	_, _ = nodes.Core().V1().Nodes().Informer().AddEventHandler(handler(t.node))
	_, _ = parts.Dynamig().V1alpha1().NodePartitions().Informer().AddEventHandler(handler(t.partition))
	pods.Start(ctx.Done())
	nodes.Start(ctx.Done())
	parts.Start(ctx.Done())
	return t
}

// Printf prints a line of the timeline.
func (t *Timeline) Printf(format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.printLocked(format, args...)
}

func (t *Timeline) printLocked(format string, args ...any) {
	fmt.Fprintf(t.out, "%7.2fs  %s\n", time.Since(t.start).Seconds(), fmt.Sprintf(format, args...))
}

// once prints a line when the state of key changes to value.
func (t *Timeline) once(key, value, format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.state[key] == value {
		return
	}
	t.state[key] = value
	t.printLocked(format, args...)
}

func (t *Timeline) pod(obj any) {
	p, ok := obj.(*v1.Pod)
	if !ok {
		return
	}
	key := "pod/" + p.Name
	for _, c := range p.Status.Conditions {
		if c.Type == v1.PodScheduled && c.Status == v1.ConditionFalse && p.Spec.NodeName == "" {
			t.once(key, "pending", "pod %s pending: %s", p.Name, c.Message)
		}
	}
	switch {
	case p.Status.Phase == v1.PodRunning:
		held := ""
		if n := t.c.Node(p.Spec.NodeName); n != nil {
			var ids []string
			for r, devs := range n.Holding(p.Namespace + "/" + p.Name) {
				ids = append(ids, strings.TrimPrefix(r, mig.ResourcePrefix)+" "+strings.Join(devs, ","))
			}
			held = " on " + strings.Join(ids, "; ")
		}
		t.once(key, "running", "pod %s running%s", p.Name, held)
	case p.Status.Phase == v1.PodSucceeded:
		t.once(key, "succeeded", "pod %s finished; its slices are free", p.Name)
	case p.Status.Phase == v1.PodFailed:
		t.once(key, "failed", "pod %s failed: %s %s", p.Name, p.Status.Reason, p.Status.Message)
	case p.Spec.NodeName != "":
		t.once(key, "bound", "pod %s bound to %s", p.Name, p.Spec.NodeName)
	}
}

func (t *Timeline) node(obj any) {
	n, ok := obj.(*v1.Node)
	if !ok {
		return
	}
	var res []string
	for r, q := range n.Status.Allocatable {
		if mig.IsMIGResource(string(r)) && q.Value() > 0 {
			res = append(res, fmt.Sprintf("%s=%d", strings.TrimPrefix(string(r), mig.ResourcePrefix), q.Value()))
		}
	}
	sort.Strings(res)
	if len(res) == 0 {
		res = []string{"no MIG slices"}
	}
	t.once("node/"+n.Name, strings.Join(res, " "), "node %s: the device plugin advertises %s", n.Name, strings.Join(res, " "))
}

func (t *Timeline) partition(obj any) {
	np, ok := obj.(*v1alpha1.NodePartition)
	if !ok {
		return
	}
	if np.Spec.PlanID != "" {
		t.once("plan/"+np.Name, np.Spec.PlanID, "plan %s published for node %s: %s", np.Spec.PlanID, np.Name, Layout(np.Spec.GPUs))
	}
	applied := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionApplied)
	failed := meta.FindStatusCondition(np.Status.Conditions, v1alpha1.ConditionFailed)
	switch {
	case failed != nil && failed.Status == "True":
		t.once("applied/"+np.Name, failed.Reason+failed.Message, "node %s: %s: %s", np.Name, failed.Reason, failed.Message)
	case applied != nil && applied.Status == "True" && np.Spec.PlanID != "" && np.Status.ObservedPlanID == np.Spec.PlanID:
		t.once("applied/"+np.Name, np.Spec.PlanID, "node %s: agent applied plan %s", np.Name, np.Spec.PlanID)
	}
}

// Layout prints per-GPU layouts: "gpu 0 [1g.10gb@0 1g.10gb@1]".
func Layout(gpus []v1alpha1.GPULayout) string {
	var parts []string
	for _, g := range gpus {
		var ss []string
		for _, s := range g.Slices {
			ss = append(ss, fmt.Sprintf("%s@%d", s.Profile, s.Start))
		}
		parts = append(parts, fmt.Sprintf("gpu %d %v", g.Index, ss))
	}
	return strings.Join(parts, ", ")
}
