package app

import (
	"context"
	"flag"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dynamig/dynamig/node-agent/gpu"
)

func TestOptions(t *testing.T) {
	var o Options
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	o.Flags(fs)
	require.NoError(t, fs.Parse([]string{"--node-name=n1", "--simulate=A100-80GB,H100-80GB"}))
	require.NoError(t, o.Validate())
	assert.Equal(t, "gpu-operator", o.DevicePluginNamespace)
	assert.Equal(t, "app=nvidia-device-plugin-daemonset", o.DevicePluginSelector)
	assert.Equal(t, 2*time.Minute, o.DevicePluginTimeout)

	lib, err := o.OpenGPUs()
	require.NoError(t, err)
	gpus, err := lib.GPUs()
	require.NoError(t, err)
	require.Len(t, gpus, 2)
	assert.Equal(t, "NVIDIA H100 80GB HBM3", gpus[1].Name)

	bad := Options{}
	fs = flag.NewFlagSet("agent", flag.ContinueOnError)
	bad.Flags(fs)
	require.NoError(t, fs.Parse([]string{"--node-name=", "--resync-period=0s", "--simulate=A100-81GB"}))
	err = bad.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "--node-name is empty")
	assert.Contains(t, err.Error(), "--resync-period must be positive")
	bad.NodeName = "n1"
	_, err = bad.OpenGPUs()
	assert.ErrorContains(t, err, "--simulate")

	bad.Simulate, bad.NVMLLibrary = "", "/nonexistent/libnvidia-ml.so.1"
	_, err = bad.OpenGPUs()
	assert.ErrorIs(t, err, gpu.ErrLibraryNotFound)
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
