package local

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"

	"github.com/dynamig/dynamig/manifests"
)

// The throughput baseline is the shipped profile minus DynamicMIG, and
// still a valid KubeSchedulerConfiguration.
func TestWithoutDynamicMIG(t *testing.T) {
	out, err := withoutDynamicMIG(manifests.SchedulerConfig)
	require.NoError(t, err)
	assert.NotContains(t, string(out), "name: DynamicMIG")
	file := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(file, out, 0o644))
	cfg, err := options.LoadConfigFromFile(klog.Background(), file)
	require.NoError(t, err)
	require.Len(t, cfg.Profiles, 1)
	assert.Equal(t, "dynamig-scheduler", cfg.Profiles[0].SchedulerName)
	var filters []string
	for _, p := range cfg.Profiles[0].Plugins.Filter.Enabled {
		filters = append(filters, p.Name)
	}
	assert.Contains(t, filters, "NodeResourcesFit")
	for _, pc := range cfg.Profiles[0].PluginConfig {
		if args, ok := pc.Args.(*schedconfig.NodeResourcesFitArgs); ok {
			assert.Empty(t, args.IgnoredResources, "without DynamicMIG, NodeResourcesFit checks the MIG resources")
		}
	}
}

func TestQuantile(t *testing.T) {
	d := []time.Duration{1 * time.Second, 2 * time.Second, 3 * time.Second, 4 * time.Second}
	assert.Equal(t, "2.00s", q(d, 0.5))
	assert.Equal(t, "4.00s", q(d, 0.99))
	assert.Equal(t, "1.00s", q(d, 0))
}
