package dynamicmig

import (
	"context"
	"fmt"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	dynamigclient "github.com/dynamig/dynamig/pkg/client"
	dynamigv1alpha1 "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/typed/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
	"github.com/dynamig/dynamig/pkg/partition"
)

// partitions reads NodePartitions from an informer, decodes each version
// once as it arrives (partition.Decode), and writes their spec.
type partitions struct {
	client   dynamigv1alpha1.NodePartitionInterface
	factory  externalversions.SharedInformerFactory
	informer cache.SharedIndexInformer

	mu    sync.RWMutex
	nodes map[string]*partition.Node
}

func newPartitions(cfg *rest.Config) (*partitions, error) {
	client, err := dynamigclient.New(cfg)
	if err != nil {
		return nil, err
	}
	factory := externalversions.NewSharedInformerFactoryWithOptions(client, 0, externalversions.WithTransform(dynamigclient.TrimManagedFields))
	return &partitions{
		client:   client.DynamigV1alpha1().NodePartitions(),
		factory:  factory,
		informer: factory.Dynamig().V1alpha1().NodePartitions().Informer(),
		nodes:    map[string]*partition.Node{},
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

func (p *partitions) get(node string) *partition.Node {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.nodes[node]
}

// updateSpec writes a NodePartition's spec with optimistic concurrency: it
// fails with a Conflict error if the object changed since it was read.
// Filter must see the plan from the next scheduling cycle on, not when the
// watch delivers it: in between, a pod could be bound to a slice the plan
// is about to destroy. So the written object is stored at once, trimmed
// as the informer trims what it stores.
func (p *partitions) updateSpec(ctx context.Context, np *v1alpha1.NodePartition) error {
	written, err := p.client.Update(ctx, np, metav1.UpdateOptions{FieldManager: Name})
	if err != nil {
		return fmt.Errorf("publishing plan %s to NodePartition %s: %w", np.Spec.PlanID, np.Name, err)
	}
	written.ManagedFields = nil
	p.store(written)
	return nil
}
