package app

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	logsapi "k8s.io/component-base/logs/api/v1"

	"github.com/dynamig/dynamig/node-agent/gpu"
)

func TestOptions(t *testing.T) {
	var o Options
	fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	o.Flags(fs)
	require.NoError(t, fs.Parse([]string{"--node-name=n1", "--simulate=A100-80GB,H100-80GB"}))
	require.NoError(t, o.Validate())
	assert.Equal(t, "gpu-operator", o.DevicePluginNamespace)
	assert.Equal(t, "app=nvidia-device-plugin-daemonset", o.DevicePluginSelector)
	assert.Equal(t, 2*time.Minute, o.DevicePluginTimeout)
	assert.Equal(t, "nvidia", o.DevicePlugin, "restart mode unless asked")
	assert.Equal(t, "/var/lib/kubelet/device-plugins/", o.DevicePluginDir)

	lib, err := o.OpenGPUs()
	require.NoError(t, err)
	gpus, err := lib.GPUs()
	require.NoError(t, err)
	require.Len(t, gpus, 2)
	assert.Equal(t, "NVIDIA H100 80GB HBM3", gpus[1].Name)

	bad := Options{}
	fs = pflag.NewFlagSet("agent", pflag.ContinueOnError)
	bad.Flags(fs)
	require.NoError(t, fs.Parse([]string{"--node-name=", "--resync-period=0s", "--simulate=A100-81GB", "--device-plugin=both"}))
	err = bad.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--node-name is empty")
	assert.Contains(t, err.Error(), `--device-plugin must be nvidia or agent, got "both"`)
	assert.Contains(t, err.Error(), "--resync-period must be positive")
	bad.NodeName = "n1"
	_, err = bad.OpenGPUs()
	assert.ErrorContains(t, err, "--simulate")

	bad.Simulate, bad.NVMLLibrary = "", "/nonexistent/libnvidia-ml.so.1"
	_, err = bad.OpenGPUs()
	assert.ErrorIs(t, err, gpu.ErrLibraryNotFound)
}

// The logging flags are component-base's, as kube-scheduler's: -v in any
// spelling, --vmodule and --logging-format=json parse and validate.
func TestLoggingFlags(t *testing.T) {
	for _, args := range [][]string{{"-v=2"}, {"--v=2"}, {"-v", "2"}, {"--logging-format=json", "--v=2"}, {"--vmodule=agent=2", "-v2"}} {
		var o Options
		fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
		o.Flags(fs)
		require.NoError(t, fs.Parse(args), args)
		assert.EqualValues(t, 2, o.Logs.Verbosity, args)
		assert.Empty(t, logsapi.Validate(o.Logs, nil, nil), args)
	}
	var o Options
	fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	o.Flags(fs)
	require.NoError(t, fs.Parse([]string{"--logging-format=yaml"}))
	assert.NotEmpty(t, logsapi.Validate(o.Logs, nil, nil), "an unknown format is refused")
}

func TestHealthEndpoints(t *testing.T) {
	var ready atomic.Bool
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := serve(context.Background(), l, ready.Load)
	t.Cleanup(func() { _ = srv.Close() })
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + l.Addr().String() + path)
		require.NoError(t, err)
		defer func() { _ = resp.Body.Close() }()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(body)
	}
	code, _ := get("/healthz")
	assert.Equal(t, http.StatusOK, code)
	code, body := get("/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, body, "not been synced")
	ready.Store(true)
	code, _ = get("/readyz")
	assert.Equal(t, http.StatusOK, code)
	code, _ = get("/metrics")
	assert.Equal(t, http.StatusOK, code)
}
