package dynamicmig

import (
	"context"
	"fmt"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/client"
	dynamigv1alpha1 "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/typed/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
	"github.com/dynamig/dynamig/pkg/guard"
	"github.com/dynamig/dynamig/pkg/partition"
)

// partitions reads NodePartitions from an informer, decodes each version
// once as it arrives (partition.Decode), and writes their spec in the
// background.
type partitions struct {
	client   dynamigv1alpha1.NodePartitionInterface
	factory  externalversions.SharedInformerFactory
	informer cache.SharedIndexInformer
	ctx      context.Context // the scheduler's: writes outlive the scheduling cycle

	mu     sync.RWMutex
	nodes  map[string]*partition.Node
	writes map[string]*specWrite // per node, the last write started
}

// specWrite is one spec write in the background.
type specWrite struct {
	// shown is what get returns while the write is under way: the
	// NodePartition as planned. nil once the write ended.
	shown *partition.Node
	// from is the resourceVersion the spec was planned on.
	from string
	done chan struct{}
	// Set when done closes: the written object's resourceVersion, or why
	// the write failed.
	rv  string
	err error
}

func newPartitions(cfg *rest.Config) (*partitions, error) {
	client, err := client.New(cfg)
	if err != nil {
		return nil, err
	}
	factory := externalversions.NewSharedInformerFactory(client, 0)
	return &partitions{
		client:   client.DynamigV1alpha1().NodePartitions(),
		factory:  factory,
		informer: factory.Dynamig().V1alpha1().NodePartitions().Informer(),
		nodes:    map[string]*partition.Node{},
		writes:   map[string]*specWrite{},
	}, nil
}

// start watches NodePartitions until ctx ends; onChange is called with the
// previous and the new decoding of each one that changes (old nil when it
// appears).
func (p *partitions) start(ctx context.Context, onChange func(old, n *partition.Node)) error {
	update := func(obj any) {
		np, ok := obj.(*v1alpha1.NodePartition)
		if !ok {
			return
		}
		if old, n := p.store(np); n != nil {
			onChange(old, n)
		}
	}
	if _, err := p.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    update,
		UpdateFunc: func(_, obj any) { update(obj) },
		DeleteFunc: func(obj any) {
			if name, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil { // cluster-scoped: the key is the name
				p.mu.Lock()
				delete(p.nodes, name)
				p.mu.Unlock()
			}
		},
	}); err != nil {
		return fmt.Errorf("watching NodePartitions: %w", err)
	}
	p.ctx = ctx
	p.factory.Start(ctx.Done())
	return nil
}

// store decodes np and keeps it unless a newer version of the same object
// is kept already (one this scheduler wrote, ahead of the watch). It
// returns the decoding it replaced and the new one, nil if it kept the old.
func (p *partitions) store(np *v1alpha1.NodePartition) (old, n *partition.Node) {
	p.mu.RLock()
	old = p.nodes[np.Name]
	p.mu.RUnlock()
	if old != nil && old.Object.UID == np.UID && !partition.Newer(np.ObjectMeta, old.Object.ObjectMeta) {
		return old, nil
	}
	n = partition.Decode(np)
	p.mu.Lock()
	defer p.mu.Unlock()
	if cur := p.nodes[np.Name]; cur != old {
		return old, nil // a write stored a newer version meanwhile
	}
	p.nodes[np.Name] = n
	return old, n
}

func (p *partitions) synced() bool { return p.informer.HasSynced() }

// get returns the node's NodePartition as planned while a spec write is
// under way, else as last read or written.
func (p *partitions) get(node string) *partition.Node {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if w := p.writes[node]; w != nil && w.shown != nil && !guard.Off(guard.Assumed) {
		return w.shown
	}
	return p.nodes[node]
}

// writeSpec writes a NodePartition's spec in the background, with
// optimistic concurrency. Filter must see the plan from the next scheduling
// cycle on, not when the write or the watch delivers it: in between, a pod
// could be bound to a slice the plan is about to destroy. So get returns np
// at once, until the write ends; then what was written, or on failure the
// object as last read.
//
// Writes to one node run in order. A spec planned on one still under way
// (np's resourceVersion is the one that write was planned on) is written on
// the version that write produced, and fails if that write failed. A write
// fails with a Conflict error if the object changed since it was read.
// done is called once the write ended, with its error, the object get
// returned meanwhile, and the one it returns now (nil when a later write
// to the node is under way).
func (p *partitions) writeSpec(logger klog.Logger, np *v1alpha1.NodePartition, done func(err error, shown, now *partition.Node)) {
	w := &specWrite{shown: partition.Decode(np), from: np.ResourceVersion, done: make(chan struct{})}
	p.mu.Lock()
	prev := p.writes[np.Name]
	p.writes[np.Name] = w
	p.mu.Unlock()
	go func() {
		rv, err := p.write(klog.NewContext(p.ctx, logger), np, prev)
		p.mu.Lock()
		shown := w.shown
		w.shown, w.rv, w.err = nil, rv, err
		var now *partition.Node
		if p.writes[np.Name] == w {
			now = p.nodes[np.Name]
		}
		p.mu.Unlock()
		close(w.done)
		done(err, shown, now)
	}()
}

// write writes np's spec after prev, the node's previous write (nil if
// none), and stores the written object. It returns its resourceVersion.
func (p *partitions) write(ctx context.Context, np *v1alpha1.NodePartition, prev *specWrite) (string, error) {
	if prev != nil {
		select {
		case <-prev.done:
		case <-ctx.Done():
			return "", fmt.Errorf("publishing plan %s to NodePartition %s: %w", np.Spec.PlanID, np.Name, ctx.Err())
		}
		if np.ResourceVersion == prev.from { // planned on prev's spec
			if prev.err != nil {
				return "", fmt.Errorf("publishing plan %s to NodePartition %s: the plan it builds on was not written: %w", np.Spec.PlanID, np.Name, prev.err)
			}
			np = np.DeepCopy() // get may still return np meanwhile
			np.ResourceVersion = prev.rv
		}
	}
	written, err := p.client.Update(ctx, np, metav1.UpdateOptions{FieldManager: Name})
	if err != nil {
		return "", fmt.Errorf("publishing plan %s to NodePartition %s: %w", np.Spec.PlanID, np.Name, err)
	}
	p.store(written)
	return written.ResourceVersion, nil
}
