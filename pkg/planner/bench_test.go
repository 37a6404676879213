package planner

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"testing"
	"time"

	"github.com/dynamig/dynamig/pkg/mig"
)

// benchSnapshot is the latency benchmark's cluster: 1,000 nodes × 8 GPUs,
// A100-80GB and H100-80GB mixed, about half the slices of partitioned GPUs
// used, and the given number of pending pods with mixed profiles.
func benchSnapshot(b *testing.B, pods int) *Snapshot {
	a100, h100 := model(b, "A100-80GB"), model(b, "H100-80GB")
	r := rand.New(rand.NewPCG(7, uint64(pods)))
	return Random(r, RandomOptions{
		Nodes: 1000, GPUsPerNode: 8, Models: []*mig.Model{a100, h100}, Pods: pods,
		Partitioned: 0.8, Used: 0.6, MultiSlice: 0.1, Priorities: 3, Selective: 0.1,
	})
}

// BenchmarkPlan reports, besides ns/op and allocations, the p50 and p99 of
// the plan latency in milliseconds and the pods served.
func BenchmarkPlan(b *testing.B) {
	for _, pods := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprintf("nodes=1000/gpus=8000/pods=%d", pods), func(b *testing.B) {
			s := benchSnapshot(b, pods)
			var times []time.Duration
			var p *Plan
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				start := time.Now()
				p = Dynamig{}.Plan(s)
				times = append(times, time.Since(start))
			}
			b.StopTimer()
			sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
			ms := func(q float64) float64 {
				return float64(times[int(q*float64(len(times)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(ms(0.5), "p50-ms")
			b.ReportMetric(ms(0.99), "p99-ms")
			b.ReportMetric(float64(p.Served), "served")
		})
	}
}
