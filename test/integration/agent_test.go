package integration

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
)

// fakeAgent plays, for its nodes, the node agent (it applies each
// NodePartition spec by copying it to the status, as NVML would have made
// it, every slice advertised: kubelet can allocate it) and kubelet with the
// NVIDIA device plugin (it gives bound pods free slices, marks those used,
// and advertises the slices as Node capacity and allocatable). It records
// any plan that would destroy a used slice.
type fakeAgent struct {
	c      *cluster
	nodes  []string
	paused atomic.Bool

	mu         sync.Mutex
	violations []string
}

// slicesOf is a starting layout: GPU index → slices.
type slicesOf map[int][]v1alpha1.Slice

// addNode creates a Ready node with the dynamig label, the given GPUs
// (catalog models) and labels, and its NodePartition with the GPUs in
// status, as the real agent reports them on start.
func (c *cluster) addNode(t *testing.T, name string, models []string, labels map[string]string, existing slicesOf) {
	ctx := context.Background()
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		"dynamig.io/partitioning": "mig", "nvidia.com/mig.strategy": "mixed", "kubernetes.io/hostname": name,
	}}}
	for k, v := range labels {
		node.Labels[k] = v
	}
	created, err := c.cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.cs.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	created.Status = v1.NodeStatus{
		Capacity:    v1.ResourceList{v1.ResourceCPU: resource.MustParse("8"), v1.ResourceMemory: resource.MustParse("32Gi"), v1.ResourcePods: resource.MustParse("110")},
		Allocatable: v1.ResourceList{v1.ResourceCPU: resource.MustParse("8"), v1.ResourceMemory: resource.MustParse("32Gi"), v1.ResourcePods: resource.MustParse("110")},
		Conditions:  []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now()}},
	}
	_, err = c.cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	require.NoError(t, err)

	np := &v1alpha1.NodePartition{
		TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "NodePartition"},
		ObjectMeta: metav1.ObjectMeta{Name: name, OwnerReferences: []metav1.OwnerReference{{
			APIVersion: "v1", Kind: "Node", Name: name, UID: created.UID,
		}}},
	}
	np, err = c.parts.Create(ctx, np, metav1.CreateOptions{})
	require.NoError(t, err)
	for i, model := range models {
		np.Status.GPUs = append(np.Status.GPUs, v1alpha1.GPUStatus{
			Index: int32(i), UUID: fmt.Sprintf("GPU-%s-%d", name, i), Model: model, MIGMode: v1alpha1.MIGEnabled,
		})
		for _, s := range existing[i] {
			np.Status.GPUs[i].Slices = append(np.Status.GPUs[i].Slices, v1alpha1.SliceStatus{Slice: s, Advertised: true})
		}
	}
	_, err = c.parts.UpdateStatus(ctx, np, metav1.UpdateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = c.parts.Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

// startAgent runs the fake agent for the nodes until the test ends.
func (c *cluster) startAgent(t *testing.T, nodes ...string) *fakeAgent {
	a := &fakeAgent{c: c, nodes: nodes}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ticker := time.NewTicker(50 * time.Millisecond)
		defer ticker.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
			if a.paused.Load() {
				continue
			}
			for _, n := range a.nodes {
				if err := a.sync(ctx, n); err != nil && ctx.Err() == nil {
					t.Logf("fake agent, node %s: %v", n, err)
				}
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		a.mu.Lock()
		defer a.mu.Unlock()
		require.Empty(t, a.violations, "a plan destroyed a used slice")
	})
	return a
}

// sync applies the node's spec, marks used slices and advertises them.
func (a *fakeAgent) sync(ctx context.Context, name string) error {
	np, err := a.c.parts.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	before := np.Status.DeepCopy()
	if np.Spec.PlanID != "" && np.Spec.PlanID != np.Status.ObservedPlanID {
		a.apply(np)
	}
	pods, err := a.c.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + name})
	if err != nil {
		return err
	}
	markUsed(np, pods.Items)
	if !equality.Semantic.DeepEqual(before, &np.Status) {
		if _, err := a.c.parts.UpdateStatus(ctx, np, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return a.advertise(ctx, name, np)
}

// apply makes the status layout the spec's, as a real agent would after
// NVML calls, and records the destruction of a used slice.
func (a *fakeAgent) apply(np *v1alpha1.NodePartition) {
	for _, want := range np.Spec.GPUs {
		for i := range np.Status.GPUs {
			g := &np.Status.GPUs[i]
			if g.Index != want.Index {
				continue
			}
			keep := map[v1alpha1.Slice]bool{}
			for _, s := range want.Slices {
				keep[s] = true
			}
			for _, s := range g.Slices {
				if s.Used && !keep[s.Slice] {
					a.mu.Lock()
					a.violations = append(a.violations, fmt.Sprintf("plan %s on %s gpu %d drops used %s@%d", np.Spec.PlanID, np.Name, g.Index, s.Profile, s.Start))
					a.mu.Unlock()
				}
			}
			g.Slices = nil
			for _, s := range want.Slices {
				g.Slices = append(g.Slices, v1alpha1.SliceStatus{Slice: s, UUID: fmt.Sprintf("MIG-%s-%d-%s-%d", np.Name, g.Index, s.Profile, s.Start), Advertised: true})
			}
		}
	}
	np.Status.ObservedPlanID = np.Spec.PlanID
	np.Status.ObservedGeneration = np.Generation
	np.Status.Conditions = []metav1.Condition{{Type: v1alpha1.ConditionApplied, Status: metav1.ConditionTrue, Reason: "Applied",
		Message: "layout applied", ObservedGeneration: np.Generation, LastTransitionTime: metav1.Now()}}
}

// markUsed gives each pod bound to the node the first slices of the
// profiles it requests, as kubelet allocates devices.
func markUsed(np *v1alpha1.NodePartition, pods []v1.Pod) {
	want := map[string]int{}
	for i := range pods {
		p := &pods[i]
		if p.Status.Phase == v1.PodSucceeded || p.Status.Phase == v1.PodFailed || p.DeletionTimestamp != nil {
			continue
		}
		d, _ := demand.Of(p)
		for prof, n := range d {
			want[prof.String()] += n
		}
	}
	for gi := range np.Status.GPUs {
		for si := range np.Status.GPUs[gi].Slices {
			s := &np.Status.GPUs[gi].Slices[si]
			s.Used = want[s.Profile] > 0
			if s.Used {
				want[s.Profile]--
			}
		}
	}
}

// advertise sets the node's nvidia.com/mig-* capacity and allocatable to
// the slices that exist.
func (a *fakeAgent) advertise(ctx context.Context, name string, np *v1alpha1.NodePartition) error {
	node, err := a.c.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	counts := map[v1.ResourceName]int64{}
	for _, g := range np.Status.GPUs {
		for _, s := range g.Slices {
			p, err := mig.ParseProfile(s.Profile)
			if err != nil {
				return err
			}
			counts[v1.ResourceName(p.ResourceName())]++
		}
	}
	updated := node.DeepCopy()
	for _, list := range []v1.ResourceList{updated.Status.Capacity, updated.Status.Allocatable} {
		for r := range list {
			if mig.IsMIGResource(string(r)) {
				delete(list, r)
			}
		}
		for r, n := range counts {
			list[r] = *resource.NewQuantity(n, resource.DecimalSI)
		}
	}
	if equality.Semantic.DeepEqual(node.Status, updated.Status) {
		return nil
	}
	_, err = a.c.cs.CoreV1().Nodes().UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	return err
}

// partition reads a node's NodePartition.
func (c *cluster) partition(t *testing.T, name string) *v1alpha1.NodePartition {
	np, err := c.parts.Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(t, err)
	return np
}
