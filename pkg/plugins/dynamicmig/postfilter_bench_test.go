package dynamicmig

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	fwk "k8s.io/kube-scheduler/framework"
	"k8s.io/kubernetes/pkg/scheduler/framework"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/test/builders"
)

// decodedPartitions is a partitionStore of NodePartitions decoded once,
// as the plugin's informer-backed store keeps them; it publishes nothing,
// so that every plan of a benchmark starts from the same cluster.
type decodedPartitions map[string]*partition.Node

func (d decodedPartitions) synced() bool                                              { return true }
func (d decodedPartitions) get(node string) *partition.Node                           { return d[node] }
func (d decodedPartitions) updateSpec(context.Context, *v1alpha1.NodePartition) error { return nil }

// BenchmarkPostFilter times one PostFilter — candidate selection, the
// snapshot with every pending pod's filters, the plan — on nodes × 8
// GPUs (A100-80GB and H100-80GB, 60 % partitioned, half the slices used)
// with 200 pending MIG pods (maxPendingPodsPerPlan), as in the scale run.
func BenchmarkPostFilter(b *testing.B) {
	for _, nodes := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d/pending=200", nodes), func(b *testing.B) {
			var models []*mig.Model
			for _, name := range []string{"A100-80GB", "H100-80GB"} {
				m, err := mig.ModelByName(name)
				require.NoError(b, err)
				models = append(models, m)
			}
			snap := planner.Random(rand.New(rand.NewPCG(1, 13)), planner.RandomOptions{
				Nodes: nodes, GPUsPerNode: 8, Models: models, Pods: 200, Partitioned: 0.6, Used: 0.5,
			})
			parts := decodedPartitions{}
			var vnodes []*v1.Node
			for _, n := range snap.Nodes {
				var gpus []v1alpha1.GPUStatus
				for _, g := range n.GPUs {
					var ss []v1alpha1.SliceStatus
					for _, s := range g.Slices {
						ss = append(ss, v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: s.Profile.String(), Start: int32(s.Start)}, Used: s.Used})
					}
					gpus = append(gpus, builders.GPU(int32(g.Index), g.Model.Name, ss...))
				}
				np := builders.NodePartition(nil, "", "", gpus...)
				np.Name = n.Name
				parts[n.Name] = partition.Decode(np)
				vnodes = append(vnodes, migNode(n.Name))
			}
			var pods []*v1.Pod
			for _, sp := range snap.Pods {
				rl := v1.ResourceList{}
				for prof, n := range sp.Requests {
					rl[v1.ResourceName(prof.ResourceName())] = *resource.NewQuantity(int64(n), resource.DecimalSI)
				}
				pods = append(pods, pendingPod(sp.Name, rl))
			}
			fw, _, _, _ := testFrameworkWithActivations(b, parts, vnodes, pods...)
			ctx := context.Background()
			statuses := framework.NewDefaultNodeToStatus()
			for _, n := range vnodes {
				statuses.Set(n.Name, fwk.NewStatus(fwk.Unschedulable, "no free slice"))
			}
			b.ReportAllocs()
			for b.Loop() {
				state := framework.NewCycleState()
				if _, st, _ := fw.RunPreFilterPlugins(ctx, state, pods[0]); !st.IsSuccess() {
					b.Fatal(st.Message())
				}
				if _, st := fw.RunPostFilterPlugins(ctx, state, pods[0], statuses); st.Code() != fwk.Unschedulable {
					b.Fatal(st.Message())
				}
			}
		})
	}
}
