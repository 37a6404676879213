package dynamicmig

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
)

// publish writes the plan's layout to every NodePartition whose layout
// changes, under one plan ID, and returns the slices created per node and
// GPU. The first conflict stops it; what was published stays valid on its
// own (each node's layout is complete).
func (p *DynamicMIG) publish(ctx context.Context, planID string, plan *planner.Plan, views map[string]*view) (map[string]map[int]demand.Demand, error) {
	logger := klog.FromContext(ctx)
	created := map[string]map[int]demand.Demand{}
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
		var keeps []string
		if v.part.AgentAdvertises && partition.Keeps(v.part, layouts) {
			keeps = partition.KeptBy(v.part)
		}
		partition.SetLayouts(np, planID, p.now(), layouts, keeps)
		if err := p.partitions.updateSpec(ctx, np); err != nil {
			return created, err
		}
		logger.V(2).Info("published MIG layout", "node", n.Name, "created", describe(created[n.Name], n.Name))
	}
	return created, nil
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
