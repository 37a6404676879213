// Package dynamicmig is the DynamicMIG scheduler plugin. PreFilter reads a
// pod's MIG demand; Filter keeps pods off slices that a published plan is
// about to remove; PostFilter plans new MIG layouts for all pending MIG
// pods at once (package planner), publishes them to the NodePartition
// specs, nominates the pod's node and leaves the pod Unschedulable until
// the node agent has applied the layout and kubelet advertises the slices.
//
// Files by responsibility: plugin.go (construction), filter.go (PreFilter,
// Filter), requeue.go (queueing hints and activation on NodePartition
// changes), store.go (NodePartitions, decoded once per version),
// postfilter.go (planning, orchestrated), snapshot.go (the planner's
// input), publish.go (writing plans).
package dynamicmig

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/config"
	configv1 "github.com/dynamig/dynamig/pkg/apis/config/v1"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/partition"
)

// Name is the plugin's name in a KubeSchedulerConfiguration.
const Name = "DynamicMIG"

// DynamicMIG is the plugin.
type DynamicMIG struct {
	h          fwk.Handle
	fw         framework.Framework // for PreFilter of other pending pods
	args       *config.DynamicMIGArgs
	selector   labels.Selector
	partitions partitionStore
	pending    *pendingPods
	now        func() time.Time

	// scheduling is set by the first PreFilter. The scheduler gives the
	// framework its queue and nominator after building the plugins, so
	// NodePartition changes activate pods only from then on (the queue
	// tries every pod it starts with anyway).
	scheduling atomic.Bool

	mu     sync.Mutex // serialises planning and publishing
	planNo uint64
	memos  memos // under mu
}

var (
	_ fwk.PreFilterPlugin   = &DynamicMIG{}
	_ fwk.FilterPlugin      = &DynamicMIG{}
	_ fwk.PostFilterPlugin  = &DynamicMIG{}
	_ fwk.EnqueueExtensions = &DynamicMIG{}
)

// partitionStore is where the plugin reads NodePartitions, decoded once
// per version (shared: never modified), and writes their spec: an
// informer and the API server, or a fake in unit tests.
type partitionStore interface {
	synced() bool
	// get returns the node's decoded NodePartition, nil if there is none.
	get(node string) *partition.Node
	// updateSpec writes the spec with optimistic concurrency (a Conflict
	// error if the object changed since it was read); the next get sees it.
	updateSpec(ctx context.Context, np *v1alpha1.NodePartition) error
}

// New builds the plugin from its arguments (see package config/v1). Bad
// arguments stop the scheduler with a message naming the field.
func New(ctx context.Context, obj runtime.Object, h fwk.Handle) (fwk.Plugin, error) {
	args, err := configv1.Decode(obj)
	if err != nil {
		return nil, err
	}
	parts, err := newPartitions(h.KubeConfig())
	if err != nil {
		return nil, err
	}
	p, err := newPlugin(ctx, args, h, parts)
	if err != nil {
		return nil, err
	}
	logger := klog.FromContext(ctx)
	if err := parts.start(ctx, func(old, n *partition.Node) {
		if p.scheduling.Load() {
			p.partitionChanged(logger, old, n)
		}
	}); err != nil {
		return nil, err
	}
	return p, nil
}

func newPlugin(ctx context.Context, args *config.DynamicMIGArgs, h fwk.Handle, parts partitionStore) (*DynamicMIG, error) {
	sel, err := labels.Parse(args.NodeSelector)
	if err != nil {
		return nil, fmt.Errorf("DynamicMIG args: nodeSelector: %w", err)
	}
	fw, ok := h.(framework.Framework)
	if !ok {
		return nil, fmt.Errorf("DynamicMIG needs the scheduler's framework handle, got %T", h)
	}
	pending, err := newPendingPods(h)
	if err != nil {
		return nil, err
	}
	registerMetrics()
	klog.FromContext(ctx).V(2).Info("DynamicMIG ready", "nodeSelector", args.NodeSelector, "planTimeout", args.PlanTimeout,
		"maxNodesPerPlan", args.MaxNodesPerPlan, "maxPendingPodsPerPlan", args.MaxPendingPodsPerPlan)
	return &DynamicMIG{h: h, fw: fw, args: args, selector: sel, partitions: parts, pending: pending, now: time.Now}, nil
}

// Name implements fwk.Plugin.
func (p *DynamicMIG) Name() string { return Name }
