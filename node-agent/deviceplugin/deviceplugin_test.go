package deviceplugin

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2/ktesting"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// registry is kubelet's Registration service on kubelet.sock: it records
// who registered.
type registry struct {
	pluginapi.UnimplementedRegistrationServer
	mu   sync.Mutex
	reqs []*pluginapi.RegisterRequest
}

func (r *registry) Register(_ context.Context, req *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reqs = append(r.reqs, req)
	return &pluginapi.Empty{}, nil
}

func (r *registry) resources() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, req := range r.reqs {
		out = append(out, req.ResourceName+" "+req.Endpoint)
	}
	return out
}

// serveKubelet serves a registry on dir/kubelet.sock until the test ends.
func serveKubelet(t *testing.T, dir string) *registry {
	sock := filepath.Join(dir, "kubelet.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	srv := grpc.NewServer()
	r := &registry{}
	pluginapi.RegisterRegistrationServer(srv, r)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return r
}

// Every resource registers, with or without devices; ListAndWatch sends
// the full list at once and after each change; Allocate names the
// devices by CDI name and NVIDIA_VISIBLE_DEVICES, and refuses one it does
// not advertise; a stream the kubelet ends, and a new kubelet.sock, bring
// every registration again.
func TestPlugin(t *testing.T) {
	dir, err := os.MkdirTemp("", "dp") // short: unix socket paths are limited
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	reg := serveKubelet(t, dir)
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	const r1, r3 = "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"
	p := New(dir)
	p.Set(map[string][]Device{r1: nil, r3: nil})
	go func() { _ = p.Run(ctx) }()
	require.Eventually(t, func() bool { return len(reg.resources()) == 2 }, 5*time.Second, 10*time.Millisecond)
	assert.ElementsMatch(t, []string{r1 + " dynamig-nvidia-com-mig-1g-10gb.sock", r3 + " dynamig-nvidia-com-mig-3g-40gb.sock"}, reg.resources())

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, SocketName(r1)), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	api := pluginapi.NewDevicePluginClient(conn)
	stream, err := api.ListAndWatch(ctx, &pluginapi.Empty{})
	require.NoError(t, err)
	next := func() []string {
		resp, err := stream.Recv()
		require.NoError(t, err)
		var ids []string
		for _, d := range resp.Devices {
			assert.Equal(t, pluginapi.Healthy, d.Health)
			ids = append(ids, d.ID)
		}
		return ids
	}
	assert.Empty(t, next(), "registered with no devices")
	p.Set(map[string][]Device{r1: {{ID: "MIG-b", CDIName: CDIName("MIG-b")}, {ID: "MIG-a", CDIName: CDIName("MIG-a")}}})
	assert.Equal(t, []string{"MIG-a", "MIG-b"}, next(), "the full list, sorted")
	p.Set(map[string][]Device{r3: {{ID: "MIG-c"}}}) // another resource: nothing is sent for r1 (the next message below is the withdrawal)

	resp, err := api.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{"MIG-a", "MIG-b"}}}})
	require.NoError(t, err)
	car := resp.ContainerResponses[0]
	assert.Equal(t, []*pluginapi.CDIDevice{{Name: "dynamig.io/gpu=MIG-a"}, {Name: "dynamig.io/gpu=MIG-b"}}, car.CdiDevices)
	assert.Equal(t, map[string]string{"NVIDIA_VISIBLE_DEVICES": "MIG-a,MIG-b"}, car.Envs)

	p.Set(map[string][]Device{r1: {{ID: "MIG-a", CDIName: CDIName("MIG-a")}}})
	assert.Equal(t, []string{"MIG-a"}, next(), "withdrawn")
	_, err = api.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{"MIG-b"}}}})
	assert.ErrorContains(t, err, "nvidia.com/mig-1g.10gb device MIG-b: not advertised by dynamig's device plugin")

	assert.Equal(t, KubeletState{}, p.Kubelet(), "the kubelet has not gone")

	// The kubelet ends a stream: the plugin is gone for it until every
	// resource has registered again; then the kubelet is back.
	require.NoError(t, conn.Close())
	select {
	case <-p.KubeletChanged():
	case <-time.After(5 * time.Second):
		t.Fatal("no word that the kubelet went")
	}
	require.Eventually(t, func() bool { return len(reg.resources()) == 4 && !p.Kubelet().Back.IsZero() }, 5*time.Second, 10*time.Millisecond,
		"every resource registered again with the kubelet that ended the stream")
	assert.False(t, p.Kubelet().Gone)
	first := p.Kubelet().Back

	// A restarted kubelet makes kubelet.sock anew: every resource
	// registers with it, and the kubelet is back again.
	reg2 := serveKubelet(t, dir)
	require.Eventually(t, func() bool { return len(reg2.resources()) == 2 && p.Kubelet().Back.After(first) }, 5*time.Second, 10*time.Millisecond)
	assert.False(t, p.Kubelet().Gone, "every resource registered with the new kubelet")
}
