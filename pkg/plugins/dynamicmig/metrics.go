package dynamicmig

import (
	"sync"

	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/legacyregistry"
)

const metricsSubsystem = "dynamig_scheduler"

// Results of a plan, the label of plansTotal.
const (
	resultPlanned    = "planned"     // the pod gets a node; layouts published if they changed
	resultNoRoom     = "no_room"     // no layout serves the pod now
	resultConflict   = "conflict"    // a NodePartition changed under the plan; the pod retries
	resultNotReady   = "not_ready"   // NodePartitions not synced yet
	resultFilterFail = "filter_fail" // the planned node failed the pod's filters
)

// planBuckets bound a plan's durations, from a millisecond to seconds.
var planBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}

var (
	plansTotal = metrics.NewCounterVec(&metrics.CounterOpts{
		Subsystem:      metricsSubsystem,
		Name:           "plans_total",
		Help:           "Plans computed by the DynamicMIG plugin for unschedulable MIG pods, by result.",
		StabilityLevel: metrics.ALPHA,
	}, []string{"result"})
	planDuration = metrics.NewHistogram(&metrics.HistogramOpts{
		Subsystem:      metricsSubsystem,
		Name:           "plan_duration_seconds",
		Help:           "Time PostFilter takes for a plan: snapshot, planning, and writing the specs it changes.",
		Buckets:        planBuckets,
		StabilityLevel: metrics.ALPHA,
	})
	publishDuration = metrics.NewHistogram(&metrics.HistogramOpts{
		Subsystem:      metricsSubsystem,
		Name:           "plan_publish_duration_seconds",
		Help:           "Time PostFilter spends writing a plan's NodePartition specs to the API server (part of plan_duration_seconds).",
		Buckets:        planBuckets,
		StabilityLevel: metrics.ALPHA,
	})
	podsWaiting = metrics.NewGauge(&metrics.GaugeOpts{
		Subsystem:      metricsSubsystem,
		Name:           "pods_waiting_for_repartition",
		Help:           "Pending MIG pods nominated to a node whose published plan is not applied yet, as of the last plan.",
		StabilityLevel: metrics.ALPHA,
	})
	planToApplied = metrics.NewHistogram(&metrics.HistogramOpts{
		Subsystem:      metricsSubsystem,
		Name:           "plan_to_applied_seconds",
		Help:           "Time from publishing a plan to a NodePartition until its agent reports it applied.",
		Buckets:        []float64{0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600},
		StabilityLevel: metrics.ALPHA,
	})
	registerOnce sync.Once
)

func registerMetrics() {
	registerOnce.Do(func() {
		legacyregistry.MustRegister(plansTotal, planDuration, publishDuration, podsWaiting, planToApplied)
	})
}
