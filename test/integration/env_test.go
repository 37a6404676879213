// Package integration runs the DynamicMIG scheduler against a real
// kube-apiserver and etcd, in process, with a test double of the node
// agent.
package integration

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/storage/etcd3/testserver"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
	kubecontrollermanagertesting "k8s.io/kubernetes/cmd/kube-controller-manager/app/testing"
	"k8s.io/kubernetes/pkg/scheduler"
	kubeconfigutil "k8s.io/kubernetes/test/utils/kubeconfig"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/pkg/client"
	dynamigv1alpha1 "github.com/dynamig/dynamig/pkg/generated/clientset/versioned/typed/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/test/local"
)

// cluster is the API server shared by the package's tests.
type cluster struct {
	cfg   *rest.Config
	cs    kubernetes.Interface
	dyn   dynamic.Interface // for the manifests' objects of every kind
	parts dynamigv1alpha1.NodePartitionInterface
}

// startCluster starts embedded etcd, the real kube-apiserver and the real
// kube-controller-manager (Deployments, ReplicaSets, garbage collection),
// and installs the CRDs from manifests/crds.
func startCluster(t *testing.T) *cluster {
	etcd := testserver.RunEtcd(t, nil)
	storage := &storagebackend.Config{Type: "etcd3", Prefix: "/registry", Transport: storagebackend.TransportConfig{ServerList: etcd.Endpoints()}}
	s := kubeapiservertesting.StartTestServerOrDie(t, nil, []string{"--disable-admission-plugins=ServiceAccount,TaintNodesByCondition", "--allow-privileged=true", "--authorization-mode=RBAC"}, storage)
	t.Cleanup(s.TearDownFn)
	c := &cluster{cfg: s.ClientConfig, cs: kubernetes.NewForConfigOrDie(s.ClientConfig), dyn: dynamic.NewForConfigOrDie(s.ClientConfig),
		parts: partitions(t, s.ClientConfig)}
	require.NoError(t, local.InstallCRDs(context.Background(), s.ClientConfig))

	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, clientcmd.WriteToFile(*kubeconfigutil.CreateKubeConfig(s.ClientConfig), kubeconfig))
	kcm := kubecontrollermanagertesting.StartTestServerOrDie(t, context.Background(), []string{
		"--kubeconfig=" + kubeconfig,
		"--controllers=deployment-controller,replicaset-controller,garbage-collector-controller",
		"--leader-elect=false",
	})
	t.Cleanup(kcm.TearDownFn)
	return c
}

// partitions is the NodePartition client of cfg's user.
func partitions(t *testing.T, cfg *rest.Config) dynamigv1alpha1.NodePartitionInterface {
	cs, err := client.New(cfg)
	require.NoError(t, err)
	return cs.DynamigV1alpha1().NodePartitions()
}

// schedulerConfig is the KubeSchedulerConfiguration we ship.
const schedulerConfig = "../../manifests/scheduler/config.yaml"

// startScheduler runs dynamig-scheduler in process with the shipped
// configuration (and 1 s pod backoff, to keep the tests short) until the
// returned stop function is called or the test ends.
func (c *cluster) startScheduler(t *testing.T) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sched, err := local.NewScheduler(ctx, c.cfg, schedulerConfig, scheduler.WithPodInitialBackoffSeconds(1), scheduler.WithPodMaxBackoffSeconds(1))
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		assert.NoError(t, sched.Run(ctx))
	}()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(stop)
	return stop
}

// newScheduler only builds a scheduler from a configuration file and
// returns the error, if any.
func (c *cluster) newScheduler(t *testing.T, file string) error {
	sched, err := local.NewScheduler(context.Background(), c.cfg, file)
	if err == nil {
		sched.Close()
	}
	return err
}

// waitFor polls cond every 50 ms for up to timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return cond()
	})
	require.NoError(t, err, "waiting for %s", what)
}

// namespace creates a namespace for one test; at its end the test's pods
// are deleted at once (there is no kubelet, and no namespace controller to
// empty a terminating namespace), so that the next test starts clean.
func (c *cluster) namespace(t *testing.T, name string) string {
	ctx := context.Background()
	_, err := c.cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, c.cs.CoreV1().Pods(name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}, metav1.ListOptions{}))
		waitFor(t, 30*time.Second, "pods of "+name+" deleted", func() (bool, error) {
			pods, err := c.cs.CoreV1().Pods(name).List(ctx, metav1.ListOptions{})
			return err == nil && len(pods.Items) == 0, err
		})
		require.NoError(t, c.cs.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{}))
	})
	return name
}
