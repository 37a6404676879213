package dynamicmig

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
)

// PlanTimeAnnotation records on a NodePartition when the scheduler
// published its spec (RFC 3339, UTC): the start of the plan's clock.
const PlanTimeAnnotation = "dynamig.io/plan-time"

// partitions reads NodePartitions from an informer and writes their spec.
type partitions struct {
	client   dynamic.ResourceInterface
	informer cache.SharedIndexInformer
}

func newPartitions(ctx context.Context, cfg *rest.Config, onChange func(old, np *v1alpha1.NodePartition)) (*partitions, error) {
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating the NodePartition client: %w", err)
	}
	factory := dynamicinformer.NewDynamicSharedInformerFactory(client, 0)
	p := &partitions{client: client.Resource(v1alpha1.Resource), informer: factory.ForResource(v1alpha1.Resource).Informer()}
	// Decode once, as objects arrive, not in every Filter call.
	if err := p.informer.SetTransform(func(obj any) (any, error) {
		if _, ok := obj.(*unstructured.Unstructured); !ok {
			return obj, nil
		}
		return fromUnstructured(obj)
	}); err != nil {
		return nil, fmt.Errorf("watching NodePartitions: %w", err)
	}
	if _, err := p.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if np, ok := obj.(*v1alpha1.NodePartition); ok {
				onChange(&v1alpha1.NodePartition{}, np)
			}
		},
		UpdateFunc: func(oldObj, newObj any) {
			old, ok1 := oldObj.(*v1alpha1.NodePartition)
			np, ok2 := newObj.(*v1alpha1.NodePartition)
			if ok1 && ok2 {
				onChange(old, np)
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("watching NodePartitions: %w", err)
	}
	factory.Start(ctx.Done())
	return p, nil
}

func (p *partitions) synced() bool { return p.informer.HasSynced() }

// get returns the node's NodePartition, nil if there is none. The object
// is the informer's: callers must not modify it.
func (p *partitions) get(node string) (*v1alpha1.NodePartition, error) {
	obj, ok, err := p.informer.GetStore().GetByKey(node)
	if err != nil || !ok {
		return nil, err
	}
	np, ok := obj.(*v1alpha1.NodePartition)
	if !ok {
		return nil, fmt.Errorf("NodePartition informer: unexpected %T", obj)
	}
	return np, nil
}

// updateSpec writes a NodePartition's spec with optimistic concurrency: it
// fails with a Conflict error if the object changed since it was read.
func (p *partitions) updateSpec(ctx context.Context, np *v1alpha1.NodePartition) error {
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(np)
	if err != nil {
		return fmt.Errorf("encoding NodePartition %s: %w", np.Name, err)
	}
	obj := &unstructured.Unstructured{Object: u}
	obj.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
	obj.SetKind("NodePartition")
	written, err := p.client.Update(ctx, obj, metav1.UpdateOptions{FieldManager: Name})
	if err != nil {
		return fmt.Errorf("publishing plan %s to NodePartition %s: %w", np.Spec.PlanID, np.Name, err)
	}
	// Filter must see the plan from the next scheduling cycle on, not when
	// the watch delivers it: in between, a pod could be bound to a slice
	// the plan is about to destroy.
	if decoded, err := fromUnstructured(written); err == nil {
		_ = p.informer.GetStore().Update(decoded)
	}
	return nil
}

func fromUnstructured(obj any) (*v1alpha1.NodePartition, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, fmt.Errorf("NodePartition informer: unexpected %T", obj)
	}
	np := &v1alpha1.NodePartition{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, np); err != nil {
		return nil, fmt.Errorf("decoding NodePartition %s: %w", u.GetName(), err)
	}
	return np, nil
}

// inFlight reports whether the node has a published plan the agent has not
// applied yet.
func inFlight(np *v1alpha1.NodePartition) bool {
	return np != nil && np.Spec.PlanID != "" && np.Spec.PlanID != np.Status.ObservedPlanID
}

// planTime is when the spec's plan was published; zero if unknown.
func planTime(np *v1alpha1.NodePartition) time.Time {
	t, err := time.Parse(time.RFC3339Nano, np.Annotations[PlanTimeAnnotation])
	if err != nil {
		return time.Time{}
	}
	return t
}
