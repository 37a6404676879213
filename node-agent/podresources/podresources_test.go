package podresources

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/kubelet/pkg/apis/podresources/v1"
)

// serve starts a server on a unix socket and a client of it, both closed
// when the test ends.
func serve(t *testing.T) (*Server, *Client) {
	socket := filepath.Join(t.TempDir(), "kubelet.sock")
	srv := NewServer()
	require.NoError(t, srv.Serve(socket))
	t.Cleanup(srv.Stop)
	c, err := Dial(socket, 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return srv, c
}

// The client reads real gRPC from the server on a unix socket: used and
// allocatable MIG devices, replica suffixes stripped, other resources
// ignored.
func TestClientServer(t *testing.T) {
	srv, c := serve(t)
	srv.SetAllocatable("nvidia.com/mig-1g.10gb", []string{"MIG-a", "MIG-b"})
	srv.SetAllocatable("nvidia.com/mig-3g.40gb", []string{"MIG-c"})
	srv.SetAllocatable("example.com/fpga", []string{"fpga0"})
	srv.Allocate("team/infer-0", "main", "nvidia.com/mig-1g.10gb", "MIG-a::2")
	srv.Allocate("team/infer-0", "main", "example.com/fpga", "fpga0")
	srv.Allocate("team/train", "main", "nvidia.com/mig-3g.40gb", "MIG-c")

	d, err := c.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0", "MIG-c": "team/train"}, d.Used)
	assert.Equal(t, map[string][]string{"nvidia.com/mig-1g.10gb": {"MIG-a", "MIG-b"}, "nvidia.com/mig-3g.40gb": {"MIG-c"}}, d.Allocatable)

	srv.Release("team/train")
	d, err = c.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0"}, d.Used)
}

// Asked about some pods, the client uses Get, not List (which makes
// kubelet rebuild its allocated set): only those pods are reported, and a
// pod kubelet does not know is left out. A kubelet with Get switched off
// is asked with List.
func TestDevicesOfPods(t *testing.T) {
	srv, c := serve(t)
	srv.SetAllocatable("nvidia.com/mig-1g.10gb", []string{"MIG-a", "MIG-b"})
	srv.Allocate("team/infer-0", "main", "nvidia.com/mig-1g.10gb", "MIG-a")
	srv.Allocate("team/infer-1", "main", "nvidia.com/mig-1g.10gb", "MIG-b")
	srv.AddPod("team/admitting", "main")

	d, err := c.Devices(context.Background(), "nvidia.com/mig-", []string{"team/infer-0", "team/admitting", "team/unknown"})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0"}, d.Used)
	assert.Equal(t, map[string]bool{"team/infer-0": true, "team/admitting": true}, d.Pods)
	assert.Zero(t, srv.Lists())

	srv.SwitchGetOff()
	d, err = c.Devices(context.Background(), "nvidia.com/mig-", []string{"team/infer-0"})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/infer-0", "MIG-b": "team/infer-1"}, d.Used, "everything, from List")
	assert.Equal(t, 1, srv.Lists())
}

// Allocatable is GetAllocatableResources by resource: every device
// kubelet holds healthy, allocated or not, from its one-entry-per-device
// wire form; a resource whose plugin is down (nothing healthy) is absent.
func TestAllocatable(t *testing.T) {
	srv, c := serve(t)
	srv.SetAllocatable("nvidia.com/mig-1g.10gb", []string{"MIG-b", "MIG-a", "MIG-a::1"})
	srv.SetAllocatable("nvidia.com/mig-3g.40gb", []string{"MIG-c"})
	srv.SetAllocatable("example.com/fpga", []string{"fpga0"})
	srv.Allocate("team/train", "main", "nvidia.com/mig-3g.40gb", "MIG-c")

	got, err := c.Allocatable(context.Background(), "nvidia.com/mig-")
	require.NoError(t, err)
	assert.Equal(t, map[string][]string{
		"nvidia.com/mig-1g.10gb": {"MIG-a", "MIG-b"},
		"nvidia.com/mig-3g.40gb": {"MIG-c"},
	}, got, "allocated devices are allocatable too; replicas collapse")

	raw, err := v1.NewPodResourcesListerClient(c.conn).GetAllocatableResources(context.Background(), &v1.AllocatableResourcesRequest{})
	require.NoError(t, err)
	for _, d := range raw.GetDevices() {
		assert.Len(t, d.GetDeviceIds(), 1, "one entry per device, as kubelet sends them")
	}

	srv.SetAllocatable("nvidia.com/mig-1g.10gb", nil) // its plugin went down
	got, err = c.Allocatable(context.Background(), "nvidia.com/mig-")
	require.NoError(t, err)
	assert.Equal(t, map[string][]string{"nvidia.com/mig-3g.40gb": {"MIG-c"}}, got)
	d, err := c.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-c": "team/train"}, d.Used)
	assert.Equal(t, map[string][]string{"nvidia.com/mig-3g.40gb": {"MIG-c"}}, d.Allocatable)

	srv.Stop()
	_, err = c.Allocatable(context.Background(), "nvidia.com/mig-")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "listing allocatable resources from kubelet at "+c.socket)
}

// List shows every active pod the owner added, with its listed containers,
// devices or not, one entry per device; Get finds one; a released pod is
// gone.
func TestServerListsPods(t *testing.T) {
	srv, c := serve(t)
	srv.AddPod("team/cpu-only", "main")
	srv.AddPod("team/two", "main", "sidecar")
	srv.Allocate("team/two", "main", "nvidia.com/mig-1g.10gb", "MIG-a", "MIG-b")

	api := v1.NewPodResourcesListerClient(c.conn)
	list, err := api.List(context.Background(), &v1.ListPodResourcesRequest{})
	require.NoError(t, err)
	require.Len(t, list.GetPodResources(), 2)
	two := list.GetPodResources()[1]
	assert.Equal(t, "two", two.GetName())
	require.Len(t, two.GetContainers(), 2)
	assert.Equal(t, "main", two.GetContainers()[0].GetName())
	assert.Len(t, two.GetContainers()[0].GetDevices(), 2, "one entry per device")
	assert.Empty(t, two.GetContainers()[1].GetDevices())

	got, err := api.Get(context.Background(), &v1.GetPodResourcesRequest{PodNamespace: "team", PodName: "cpu-only"})
	require.NoError(t, err)
	assert.Equal(t, "cpu-only", got.GetPodResources().GetName())
	srv.Release("team/cpu-only")
	_, err = api.Get(context.Background(), &v1.GetPodResourcesRequest{PodNamespace: "team", PodName: "cpu-only"})
	require.Error(t, err)

	d, err := c.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"MIG-a": "team/two", "MIG-b": "team/two"}, d.Used)
	assert.Equal(t, map[string]bool{"team/two": true}, d.Pods, "every listed pod, devices or not")
}

func TestClientWithoutKubelet(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "absent.sock")
	c, err := Dial(socket, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_, err = c.Devices(context.Background(), "nvidia.com/mig-", nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "listing pod resources from kubelet at "+socket)
}

// Only a Get kubelet does not serve falls back to List (which rebuilds
// kubelet's allocated set); any other failure is an error.
func TestGetFailures(t *testing.T) {
	assert.True(t, getOff(status.Error(codes.Unknown, "PodResources API Get method disabled")))
	assert.True(t, getOff(status.Error(codes.Unimplemented, "unknown method Get")))
	assert.False(t, getOff(status.Error(codes.Unknown, "something else broke")))
	assert.False(t, getOff(status.Error(codes.DeadlineExceeded, "context deadline exceeded")))
	assert.True(t, podUnknown(status.Error(codes.Unknown, "pod p in namespace team not found")))
	assert.False(t, podUnknown(status.Error(codes.Unknown, "PodResources API Get method disabled")))
}

// The client notices kubelet going (the connection it had is closed) and
// coming back (a server on the socket again), and says so
// (Restarts) and signals each change; a kubelet not up yet when the agent
// starts is not a restart.
func TestRestarts(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "kubelet.sock")
	c, err := Dial(socket, time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	ctx := context.Background()
	_, err = c.Allocatable(ctx, "nvidia.com/")
	require.Error(t, err, "no kubelet yet")
	assert.Equal(t, Restarts{}, c.Restarts())

	srv := NewServer()
	require.NoError(t, srv.Serve(socket))
	require.Eventually(t, func() bool { _, err := c.Allocatable(ctx, "nvidia.com/"); return err == nil }, 5*time.Second, 20*time.Millisecond)
	assert.Equal(t, Restarts{}, c.Restarts(), "the first connection")

	srv.Stop()
	select {
	case <-c.RestartsChanged():
	case <-time.After(5 * time.Second):
		t.Fatal("no word that kubelet went")
	}
	assert.Equal(t, Restarts{Gone: true}, c.Restarts())
	time.Sleep(1500 * time.Millisecond) // the client retries meanwhile
	srv2 := NewServer()
	require.NoError(t, srv2.Serve(socket))
	t.Cleanup(srv2.Stop)
	start := time.Now()
	require.Eventually(t, func() bool { return !c.Restarts().Gone }, 5*time.Second, 10*time.Millisecond)
	t.Logf("kubelet seen back after %v", time.Since(start).Round(time.Millisecond))
	assert.Less(t, time.Since(start), 3*time.Second, "reconnects at most a second apart (gRPC's default backoff grows to 2 min)")
	assert.WithinDuration(t, time.Now(), c.Restarts().Back, 2*time.Second)
}
