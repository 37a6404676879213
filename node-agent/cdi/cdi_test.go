package cdi

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
)

// The specs resolve as a CDI-enabled runtime resolves them (the CDI
// library's cache), hold NVIDIA_VISIBLE_DEVICES, and follow the devices:
// written when they come, removed when they go; other vendors' specs are
// left alone.
func TestSync(t *testing.T) {
	dir := t.TempDir()
	other := filepath.Join(dir, "nvidia.com-gpu.yaml")
	require.NoError(t, os.WriteFile(other, []byte("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: [{name: all, containerEdits: {env: [NVIDIA_VISIBLE_DEVICES=all]}}]\n"), 0o644))
	s, err := New(dir, nil)
	require.NoError(t, err)
	require.NoError(t, s.Sync([]string{"MIG-a", "MIG-b"}))

	runtime, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	require.NoError(t, err)
	resolves := func(id string) bool {
		require.NoError(t, runtime.Refresh())
		return runtime.GetDevice(deviceplugin.CDIName(id)) != nil
	}
	assert.True(t, resolves("MIG-a"))
	assert.True(t, resolves("MIG-b"))
	assert.Equal(t, []string{"NVIDIA_VISIBLE_DEVICES=MIG-a"}, runtime.GetDevice(deviceplugin.CDIName("MIG-a")).ContainerEdits.Env)
	_, err = cdi.ReadSpec(s.Path("MIG-a"), 0)
	require.NoError(t, err, "a valid spec")

	require.NoError(t, s.Sync([]string{"MIG-b", "MIG-c"}))
	assert.False(t, resolves("MIG-a"), "gone with its device")
	assert.True(t, resolves("MIG-c"))
	assert.FileExists(t, other, "another vendor's spec stays")
	require.NoError(t, s.Sync(nil))
	assert.False(t, resolves("MIG-b"))
}
