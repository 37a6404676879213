package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/local"
	"github.com/dynamig/dynamig/test/nodesim"
)

// The node model fails where the real stack fails, and the invariants
// catch it: this is what makes a passing soak mean something. Pods are
// bound by hand (spec.nodeName), past dynamig's scheduler, to provoke
// each failure:
//   - NVML refuses to destroy a slice whose CUDA process runs;
//   - a slice destroyed behind kubelet's back (the device plugin still
//     advertises it) is handed to a pod, and its container cannot be
//     created: the runtime finds no such MIG device;
//   - a pod admitted while the device plugin restarts fails for good,
//     UnexpectedAdmissionError (the real kubelet's device manager).
func TestNodeModelIsStrict(t *testing.T) {
	e := newEnv(t, "strict")
	oneG, twoG := mig.MustParseProfile("1g.10gb"), mig.MustParseProfile("2g.20gb")
	n := e.nodeWith(kubeletnode.Options{Name: "strict-1", Models: []string{"A100-80GB"}, Slices: map[int][]mig.Slice{
		0: {{Profile: oneG, Start: 0}, {Profile: oneG, Start: 1}, {Profile: twoG, Start: 2}},
	}})
	e.waitFor(30*time.Second, "kubelet advertising the slices", func() bool {
		node, err := cluster.Kube.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
		q := node.Status.Allocatable[v1.ResourceName(oneG.ResourceName())]
		return err == nil && q.Value() == 2
	})
	bound := func(name string, p mig.ProfileName) {
		pod := local.Pod(name, map[string]int64{p.ResourceName(): 1})
		pod.Namespace, pod.Spec.NodeName = e.ns, n.Name
		_, err := cluster.Kube.CoreV1().Pods(e.ns).Create(context.Background(), pod, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	nv, err := gpu.Open(n.Sim.Interface())
	require.NoError(t, err)

	bound("running", oneG)
	e.waitPhase(30*time.Second, v1.PodRunning, "running")
	held := n.Holding(e.ns + "/running")[oneG.ResourceName()]
	require.Len(t, held, 1)
	e.waitFor(5*time.Second, "its CUDA process", func() bool { return n.Sim.Processes(held[0]) > 0 })
	_, mine, ok := n.Sim.MIGDevice(held[0])
	require.True(t, ok)
	require.Error(t, nv.Destroy(0, mine.Profile, mine.Start), "NVML destroys no slice in use")

	other := mig.Slice{Profile: oneG, Start: 1 - mine.Start}
	require.NoError(t, nv.Destroy(0, other.Profile, other.Start))
	bound("stale", oneG)
	e.waitFor(30*time.Second, "the stale device's container failing", func() bool {
		return slices.ContainsFunc(n.Failures(), func(f nodesim.Failure) bool {
			return f.Pod == e.ns+"/stale" && f.Kind == nodesim.FailureContainerStart
		})
	})
	assert.NotEqual(t, v1.PodRunning, e.phase("stale"))

	n.PauseDevicePlugin(true)
	require.NoError(t, cluster.Kube.CoreV1().Pods(nodesim.DevicePluginNamespace).Delete(context.Background(), "nvidia-device-plugin-"+n.Name, metav1.DeleteOptions{}))
	e.waitFor(30*time.Second, "the device plugin gone", func() bool { return !n.PluginRunning() })
	bound("in-restart", twoG)
	e.waitPhase(30*time.Second, v1.PodFailed, "in-restart")
	p, err := cluster.Kube.CoreV1().Pods(e.ns).Get(context.Background(), "in-restart", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, "UnexpectedAdmissionError", p.Status.Reason)
	n.PauseDevicePlugin(false)

	// The invariants report both failures, and nothing else.
	all := strings.Join(local.Violations(n.Name, n.Sim, n), "\n")
	assert.Contains(t, all, e.ns+"/stale")
	assert.Contains(t, all, e.ns+"/in-restart")
	assert.Empty(t, local.Violations(n.Name, n.Sim, n, e.ns+"/stale", e.ns+"/in-restart"))
	require.NoError(t, cluster.Kube.CoreV1().Pods(e.ns).Delete(context.Background(), "stale", metav1.DeleteOptions{}))
}
