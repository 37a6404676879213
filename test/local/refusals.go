package local

import (
	"context"
	"fmt"
	"sync"
	"time"

	"k8s.io/client-go/tools/cache"

	"github.com/dynamig/dynamig/node-agent/agent"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	dynamiginformers "github.com/dynamig/dynamig/pkg/generated/informers/externalversions"
)

// planRecord is what the soak saw of a node's NodePartition from a
// moment on: its spec's plan, and whether the agent had refused it.
type planRecord struct {
	at      time.Time
	plan    string
	refused bool
}

// planWatch records every change of the nodes' plans and refusals, as an
// informer of the soak's sees them, so that the soak can tell an NVML
// change made for a plan the agent had refused (guard refused-plan).
type planWatch struct {
	mu  sync.Mutex
	log map[string][]planRecord
}

func watchPlans(ctx context.Context, c *Cluster) *planWatch {
	w := &planWatch{log: map[string][]planRecord{}}
	f := dynamiginformers.NewSharedInformerFactory(c.Dynamig, 0)
	inf := f.Dynamig().V1alpha1().NodePartitions().Informer()
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    w.record,
		UpdateFunc: func(_, obj any) { w.record(obj) },
	})
	f.Start(ctx.Done())
	f.WaitForCacheSync(ctx.Done())
	return w
}

func (w *planWatch) record(obj any) {
	np, ok := obj.(*v1alpha1.NodePartition)
	if !ok {
		return
	}
	r := planRecord{at: time.Now(), plan: np.Spec.PlanID, refused: agent.Refused(np)}
	w.mu.Lock()
	defer w.mu.Unlock()
	l := w.log[np.Name]
	if n := len(l); n > 0 && l[n-1].plan == r.plan && l[n-1].refused == r.refused {
		return
	}
	w.log[np.Name] = append(l, r)
}

// at is the record of a node in force at t.
func (w *planWatch) at(node string, t time.Time) planRecord {
	w.mu.Lock()
	defer w.mu.Unlock()
	var r planRecord
	for _, e := range w.log[node] {
		if e.at.After(t) {
			break
		}
		r = e
	}
	return r
}

// pursued names the plans for which a node's GPUs changed, since a moment,
// while the agent had refused them: a change at a moment when the soak
// saw the plan refused, and the same plan still published a second later
// (the agent may see a newer plan before the soak's informer does).
func (w *planWatch) pursued(node string, ops []gpu.Op, since time.Time) []string {
	var out []string
	seen := map[string]bool{}
	for _, op := range ops {
		if op.Time.Before(since) {
			continue
		}
		r := w.at(node, op.Time)
		if !r.refused || seen[r.plan] || w.at(node, op.Time.Add(time.Second)).plan != r.plan {
			continue
		}
		seen[r.plan] = true
		out = append(out, fmt.Sprintf("node %s: %s %s on gpu %d at %s for plan %s, which its agent had refused at %s", node, op.Kind, op.Slice, op.GPU, stamp(op.Time), r.plan, stamp(r.at)))
	}
	return out
}
