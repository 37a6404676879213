package podresources

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The client reads real gRPC from the server on a unix socket: used and
// allocatable MIG devices, replica suffixes stripped, other resources
// ignored.
func TestClientServer(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "kubelet.sock")
	srv := NewServer()
	require.NoError(t, srv.Serve(socket))
	t.Cleanup(srv.Stop)
	srv.SetAllocatable("nvidia.com/mig-1g.10gb", []string{"MIG-a", "MIG-b"})
	srv.SetAllocatable("nvidia.com/mig-3g.40gb", []string{"MIG-c"})
	srv.SetAllocatable("example.com/fpga", []string{"fpga0"})
	srv.Allocate("team/infer-0", "main", "nvidia.com/mig-1g.10gb", "MIG-a::2")
	srv.Allocate("team/infer-0", "main", "example.com/fpga", "fpga0")
	srv.Allocate("team/train", "main", "nvidia.com/mig-3g.40gb", "MIG-c")

	c, err := Dial(socket, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	d, err := c.Devices(context.Background(), "nvidia.com/mig-")
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0", "MIG-c": "team/train"}, d.Used)
	assert.Equal(t, map[string]bool{"MIG-a": true, "MIG-b": true, "MIG-c": true}, d.Allocatable)

	srv.Release("team/train")
	d, err = c.Devices(context.Background(), "nvidia.com/mig-")
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0"}, d.Used)
}

func TestClientWithoutKubelet(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "absent.sock")
	c, err := Dial(socket, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_, err = c.Devices(context.Background(), "nvidia.com/mig-")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "listing pod resources from kubelet at "+socket)
}
