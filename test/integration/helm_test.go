package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	schedconfig "k8s.io/kubernetes/pkg/scheduler/apis/config"
	"sigs.k8s.io/yaml"

	"github.com/dynamig/dynamig/pkg/compat"
	"github.com/dynamig/dynamig/pkg/mig"
)

const chartDir = "../../manifests/helm/dynamig"

// testHelmChart lints the chart and renders it with the default and with
// customised values; every rendered object is applied with server-side
// dry-run, the rendered scheduler configuration loads as the scheduler
// would load it, and the values reach the objects.
func (c *cluster) testHelmChart(t *testing.T) {
	crd, err := os.ReadFile("../../manifests/crds/dynamig.io_nodepartitions.yaml")
	require.NoError(t, err)
	chartCRD, err := os.ReadFile(filepath.Join(chartDir, "crds/dynamig.io_nodepartitions.yaml"))
	require.NoError(t, err)
	assert.Equal(t, string(crd), string(chartCRD), "the chart's CRD is manifests/crds' (make generate copies it)")

	custom := map[string]any{
		"scheduler":    map[string]any{"name": "gpu-scheduler", "replicas": 1, "plugin": map[string]any{"maxNodesPerPlan": 40}},
		"nodeSelector": map[string]any{"pool": "a100"}, // merged with the default label, as Helm merges maps
		"devicePlugin": map[string]any{"namespace": "nvidia-system", "selector": "app=nvidia-device-plugin", "mode": "agent"},
		"agent":        map[string]any{"image": map[string]any{"tag": "dev"}, "admissionPolicy": false},
	}
	for name, values := range map[string]map[string]any{"default": nil, "custom": custom} {
		t.Run(name, func(t *testing.T) {
			linter := lint.AllWithKubeVersion(chartDir, values, "dynamig-system", nil)
			for _, m := range linter.Messages {
				assert.Less(t, m.Severity, support.ErrorSev, "helm lint: %s", m.Error())
			}
			objs := c.renderChart(t, values)
			c.ensureNamespace(t, "dynamig-system")
			c.ensureNamespace(t, "gpu-operator")
			c.ensureNamespace(t, "nvidia-system")
			c.dryRun(t, objs)

			kinds := map[string]*unstructured.Unstructured{}
			for _, o := range objs {
				kinds[o.GetKind()+"/"+o.GetNamespace()+"/"+o.GetName()] = o
			}
			if name == "default" {
				assert.Contains(t, kinds, "ValidatingAdmissionPolicy//dynamig-agent-own-node")
				assert.Contains(t, kinds, "Role/gpu-operator/dynamig-agent-device-plugin")
				ds := kinds["DaemonSet/dynamig-system/dynamig-agent"]
				require.NotNil(t, ds)
				agents, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
				assert.Contains(t, agents[0].(map[string]any)["command"], "--device-plugin=nvidia", "restart mode unless asked")
				// The scheduler reports an unsupported API server on its pod.
				sched := kinds["Deployment/dynamig-system/dynamig-scheduler"]
				require.NotNil(t, sched)
				containers, _, _ := unstructured.NestedSlice(sched.Object, "spec", "template", "spec", "containers")
				env := map[string]any{}
				for _, e := range containers[0].(map[string]any)["env"].([]any) {
					e := e.(map[string]any)
					env[e["name"].(string)] = e["valueFrom"]
				}
				assert.Equal(t, map[string]any{
					"POD_NAME":      map[string]any{"fieldRef": map[string]any{"fieldPath": "metadata.name"}},
					"POD_NAMESPACE": map[string]any{"fieldRef": map[string]any{"fieldPath": "metadata.namespace"}},
				}, env)
				return
			}
			cm := kinds["ConfigMap/dynamig-system/gpu-scheduler-config"]
			require.NotNil(t, cm, "rendered: %v", keys(kinds))
			config, _, _ := unstructured.NestedString(cm.Object, "data", "config.yaml")
			file := filepath.Join(t.TempDir(), "config.yaml")
			require.NoError(t, os.WriteFile(file, []byte(config), 0o644))
			cfg, err := options.LoadConfigFromFile(klog.Background(), file)
			require.NoError(t, err, "the rendered KubeSchedulerConfiguration")
			assert.Equal(t, "gpu-scheduler", cfg.Profiles[0].SchedulerName)
			assert.Contains(t, config, `nodeSelector: "dynamig.io/partitioning=mig,pool=a100"`)
			assert.Contains(t, config, "maxNodesPerPlan: 40")
			ds := kinds["DaemonSet/dynamig-system/dynamig-agent"]
			require.NotNil(t, ds)
			sel, _, _ := unstructured.NestedStringMap(ds.Object, "spec", "template", "spec", "nodeSelector")
			assert.Equal(t, map[string]string{"dynamig.io/partitioning": "mig", "pool": "a100"}, sel)
			containers, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
			agent := containers[0].(map[string]any)
			assert.Equal(t, "dynamig/dynamig-agent:dev", agent["image"])
			assert.Contains(t, agent["command"], "--device-plugin-namespace=nvidia-system")
			assert.Contains(t, agent["command"], "--device-plugin=agent")
			assert.Contains(t, agent["command"], "--cdi-spec-dir=/var/run/cdi")
			// The toolkit's CDI edits, from the GPU Operator's driver, read
			// through the host's / at /host.
			assert.Contains(t, agent["command"], "--cdi-edits=toolkit")
			assert.Contains(t, agent["command"], "--host-root=/host")
			assert.Contains(t, agent["command"], "--driver-root=/host/run/nvidia/driver")
			mounts := map[string]any{}
			for _, m := range agent["volumeMounts"].([]any) {
				mounts[m.(map[string]any)["name"].(string)] = m.(map[string]any)["mountPath"]
			}
			assert.Equal(t, map[string]any{"pod-resources": "/var/lib/kubelet/pod-resources", "device-plugins": "/var/lib/kubelet/device-plugins",
				"cdi": "/var/run/cdi", "host": "/host"}, mounts)
			assert.Contains(t, kinds, "Role/nvidia-system/dynamig-agent-device-plugin")
			assert.NotContains(t, kinds, "ValidatingAdmissionPolicy//dynamig-agent-own-node")
		})
	}
}

// The chart states the Kubernetes versions dynamig-scheduler supports.
func TestChartKubeVersion(t *testing.T) {
	chart, err := loader.Load(chartDir)
	require.NoError(t, err)
	oldest := compat.Oldest
	assert.Equal(t, fmt.Sprintf(">=%d.%d.0-0", oldest.Major(), oldest.Minor()), chart.Metadata.KubeVersion)
	assert.True(t, chartutil.IsCompatibleRange(chart.Metadata.KubeVersion, fmt.Sprintf("v%d.%d.0", oldest.Major(), oldest.Minor())))
	assert.True(t, chartutil.IsCompatibleRange(chart.Metadata.KubeVersion, "v1.37.2-gke.100"))
	assert.False(t, chartutil.IsCompatibleRange(chart.Metadata.KubeVersion, fmt.Sprintf("v%d.%d.9", oldest.Major(), oldest.Minor()-1)))
}

// Bad input: a device-plugin mode the agent does not know fails the
// render with a message that says which values are allowed.
func TestChartRefusesAnUnknownDevicePluginMode(t *testing.T) {
	_, err := render(t, map[string]any{"devicePlugin": map[string]any{"mode": "both"}})
	assert.ErrorContains(t, err, `devicePlugin.mode must be nvidia or agent, got "both"`)
}

// render renders the chart's templates with values as `helm template
// dynamig -n dynamig-system` would.
func render(t *testing.T, values map[string]any) (map[string]string, error) {
	t.Helper()
	chart, err := loader.Load(chartDir)
	require.NoError(t, err)
	vals, err := chartutil.ToRenderValues(chart, values, chartutil.ReleaseOptions{Name: "dynamig", Namespace: "dynamig-system", IsInstall: true}, chartutil.DefaultCapabilities)
	require.NoError(t, err)
	return engine.Render(chart, vals)
}

// renderChart renders the chart into objects.
func (c *cluster) renderChart(t *testing.T, values map[string]any) []*unstructured.Unstructured {
	out, err := render(t, values)
	require.NoError(t, err)
	var names []string
	for n := range out {
		names = append(names, n)
	}
	sort.Strings(names)
	var objs []*unstructured.Unstructured
	for _, n := range names {
		if !strings.HasSuffix(n, ".yaml") || strings.TrimSpace(out[n]) == "" {
			continue
		}
		f := filepath.Join(t.TempDir(), filepath.Base(n))
		require.NoError(t, os.WriteFile(f, bytes.TrimSpace([]byte(out[n])), 0o644))
		objs = append(objs, readObjects(t, f)...)
	}
	require.NotEmpty(t, objs)
	return objs
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Both scheduler configurations, the manifest's and the chart's, leave
// every MIG resource of the built-in catalog to DynamicMIG: in agent mode
// it binds on the agent's word, before Node allocatable shows the slices,
// which NodeResourcesFit would wait for.
func TestSchedulerConfigsLeaveMIGResourcesToDynamicMIG(t *testing.T) {
	out, err := render(t, nil)
	require.NoError(t, err)
	var rendered map[string]any
	require.NoError(t, yaml.Unmarshal([]byte(out["dynamig/templates/scheduler-config.yaml"]), &rendered))
	chartConfig := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(chartConfig, []byte(rendered["data"].(map[string]any)["config.yaml"].(string)), 0o644))

	for _, file := range []string{schedulerConfig, chartConfig} {
		cfg, err := options.LoadConfigFromFile(klog.Background(), file)
		require.NoError(t, err, file)
		var ignored []string
		for _, pc := range cfg.Profiles[0].PluginConfig {
			if args, ok := pc.Args.(*schedconfig.NodeResourcesFitArgs); ok {
				ignored = args.IgnoredResources
			}
		}
		assert.Equal(t, mig.ResourceNames(), ignored, file)
	}
}
