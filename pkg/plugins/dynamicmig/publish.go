package dynamicmig

import (
	"cmp"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
)

// publish writes the plan's layout to every NodePartition whose layout
// changes, under one plan ID, in the background (partitionStore.writeSpec:
// Filter sees it at once), and returns the slices created per node and GPU.
// Each node's layout is complete, so a write that fails leaves the others
// valid; its failure activates pod and the pods nominated to that node, to
// be planned again.
func (p *DynamicMIG) publish(logger klog.Logger, planID string, plan *planner.Plan, views map[string]*view, pod *v1.Pod) map[string]map[int]demand.Demand {
	created := map[string]map[int]demand.Demand{}
	var writes []*v1alpha1.NodePartition
	for _, n := range plan.Nodes {
		v := views[n.Name]
		before := map[int]map[mig.Slice]bool{}
		for _, g := range v.node.GPUs {
			before[g.Index] = map[mig.Slice]bool{}
			for _, s := range g.Slices {
				before[g.Index][s.Slice] = true
			}
		}
		changed := false
		layouts := map[int][]mig.Slice{}
		for _, g := range n.GPUs {
			layout := make([]mig.Slice, len(g.Slices))
			for i, s := range g.Slices {
				layout[i] = s.Slice
				if before[g.Index][s.Slice] {
					continue
				}
				if created[n.Name] == nil {
					created[n.Name] = map[int]demand.Demand{}
				}
				if created[n.Name][g.Index] == nil {
					created[n.Name][g.Index] = demand.Demand{}
				}
				created[n.Name][g.Index][s.Profile]++
				changed = true
			}
			changed = changed || len(g.Slices) != len(before[g.Index])
			layouts[g.Index] = layout
		}
		if !changed {
			continue
		}
		np := v.part.Object.DeepCopy()
		partition.SetLayouts(np, planID, p.now(), layouts)
		writes = append(writes, np)
	}
	start := p.now()
	var left atomic.Int32
	left.Store(int32(len(writes)))
	for _, np := range writes {
		node := np.Name
		p.partitions.writeSpec(logger, np, func(err error, shown, now *partition.Node) {
			if left.Add(-1) == 0 {
				publishDuration.Observe(p.now().Sub(start).Seconds())
			}
			p.published(logger, node, describe(created[node], node), pod, err, shown, now)
		})
	}
	return created
}

// published handles the end of a plan's write to a node: on failure it
// activates the pod whose plan it was and the pods nominated to the node,
// at once after a conflict (no cluster event may follow: an agent's status
// write is enough to conflict), a second later after another error. Either
// way, if what Filter sees of the node changed from the object as planned
// (shown) to the one read or written (now), the pods that change may
// serve are activated (activate).
func (p *DynamicMIG) published(logger klog.Logger, node, created string, pod *v1.Pod, err error, shown, now *partition.Node) {
	why, profs := "", map[mig.ProfileName]bool(nil)
	if now != nil {
		if why = capacityChange(shown, now); why != "" {
			profs = available(why, now)
		}
	}
	switch {
	case err == nil:
		logger.V(2).Info("published MIG layout", "node", node, "created", created)
		if why != "" {
			p.activate(logger, node, why, profs, nil)
		}
	case apierrors.IsConflict(err):
		publishFailures.WithLabelValues(resultConflict).Inc()
		logger.V(2).Info("NodePartition changed while the plan was written; planning again", "node", node, "pod", klog.KObj(pod), "err", err)
		p.activate(logger, node, cmp.Or(why, "the plan was not published"), profs, map[string]*v1.Pod{podKey(pod): pod})
	default:
		publishFailures.WithLabelValues(resultError).Inc()
		logger.Error(err, "plan not published; planning again in a second", "node", node, "pod", klog.KObj(pod))
		p.h.EventRecorder().Eventf(pod, nil, v1.EventTypeWarning, ReasonPlanNotPublished, "Scheduling", "plan for %s on %s not published: %v", created, node, err)
		time.AfterFunc(time.Second, func() {
			p.activate(logger, node, cmp.Or(why, "the plan was not published"), profs, map[string]*v1.Pod{podKey(pod): pod})
		})
	}
}

// waiting counts the pods the plan serves on nodes whose layout is still
// to be applied: pods waiting for a repartition.
func waiting(plan *planner.Plan, views map[string]*view, created map[string]map[int]demand.Demand) int {
	n := 0
	for _, a := range plan.Pods {
		if !a.Served() {
			continue
		}
		if _, ok := created[a.Node]; ok || views[a.Node].part.InFlight {
			n++
		}
	}
	return n
}

func (p *DynamicMIG) newPlanID() string {
	p.planNo++
	return "p-" + strconv.FormatInt(p.now().Unix(), 36) + "-" + strconv.FormatUint(p.planNo, 36)
}

// describe prints the slices a plan creates on a node: "1g.10gb×5 on node-a gpu 0".
func describe(created map[int]demand.Demand, node string) string {
	gpus := make([]int, 0, len(created))
	for gpu := range created {
		gpus = append(gpus, gpu)
	}
	sort.Ints(gpus)
	parts := make([]string, len(gpus))
	for i, gpu := range gpus {
		parts[i] = fmt.Sprintf("%s on %s gpu %d", created[gpu], node, gpu)
	}
	return strings.Join(parts, ", ")
}
