package agent

import (
	"sync"

	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/legacyregistry"
)

const metricsSubsystem = "dynamig_agent"

var (
	applyDuration = metrics.NewHistogramVec(&metrics.HistogramOpts{
		Subsystem:      metricsSubsystem,
		Name:           "apply_duration_seconds",
		Help:           "Time to apply a NodePartition spec that needed changes: NVML steps plus device-plugin re-advertisement, by result.",
		Buckets:        []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120},
		StabilityLevel: metrics.ALPHA,
	}, []string{"result"})
	nvmlErrors = metrics.NewCounterVec(&metrics.CounterOpts{
		Subsystem:      metricsSubsystem,
		Name:           "nvml_errors_total",
		Help:           "Failed NVML calls, by operation and NVML return code.",
		StabilityLevel: metrics.ALPHA,
	}, []string{"operation", "code"})
	sliceCount = metrics.NewGaugeVec(&metrics.GaugeOpts{
		Subsystem:      metricsSubsystem,
		Name:           "slices",
		Help:           "MIG slices on the node, by profile and state (used, free, unknown: counted as used because kubelet cannot say who holds it).",
		StabilityLevel: metrics.ALPHA,
	}, []string{"profile", "state"})
	devicePluginRestart = metrics.NewHistogram(&metrics.HistogramOpts{
		Subsystem:      metricsSubsystem,
		Name:           "device_plugin_readvertise_seconds",
		Help:           "Time from deleting the device-plugin pod until Node allocatable shows the node's slices.",
		Buckets:        []float64{0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120},
		StabilityLevel: metrics.ALPHA,
	})
	registerOnce sync.Once
)

func registerMetrics() {
	registerOnce.Do(func() {
		legacyregistry.MustRegister(applyDuration, nvmlErrors, sliceCount, devicePluginRestart)
	})
}
