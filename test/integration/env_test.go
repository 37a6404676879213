// Package integration runs the DynamicMIG scheduler against a real
// kube-apiserver and etcd, in process, with a test double of the node
// agent.
package integration

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/storage/etcd3/testserver"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	kubeapiservertesting "k8s.io/kubernetes/cmd/kube-apiserver/app/testing"
	kubecontrollermanagertesting "k8s.io/kubernetes/cmd/kube-controller-manager/app/testing"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	"k8s.io/kubernetes/pkg/scheduler"
	frameworkruntime "k8s.io/kubernetes/pkg/scheduler/framework/runtime"
	"k8s.io/kubernetes/pkg/scheduler/profile"
	kubeconfigutil "k8s.io/kubernetes/test/utils/kubeconfig"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/dynamig/dynamig/pkg/plugins/dynamicmig"
)

// cluster is the API server shared by the package's tests.
type cluster struct {
	cfg *rest.Config
	cs  kubernetes.Interface
	dyn dynamic.Interface
}

// startCluster starts embedded etcd, the real kube-apiserver and the real
// kube-controller-manager (Deployments, ReplicaSets, garbage collection),
// and installs the CRDs from manifests/crds.
func startCluster(t *testing.T) *cluster {
	etcd := testserver.RunEtcd(t, nil)
	storage := &storagebackend.Config{Type: "etcd3", Prefix: "/registry", Transport: storagebackend.TransportConfig{ServerList: etcd.Endpoints()}}
	s := kubeapiservertesting.StartTestServerOrDie(t, nil, []string{"--disable-admission-plugins=ServiceAccount,TaintNodesByCondition", "--allow-privileged=true", "--authorization-mode=RBAC"}, storage)
	t.Cleanup(s.TearDownFn)
	c := &cluster{cfg: s.ClientConfig, cs: kubernetes.NewForConfigOrDie(s.ClientConfig), dyn: dynamic.NewForConfigOrDie(s.ClientConfig)}
	installCRDs(t, s.ClientConfig)

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

func installCRDs(t *testing.T, cfg *rest.Config) {
	ext := apiextensionsclient.NewForConfigOrDie(cfg)
	files, err := filepath.Glob("../../manifests/crds/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	ctx := context.Background()
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		crd := &apiextensionsv1.CustomResourceDefinition{}
		require.NoError(t, yaml.UnmarshalStrict(data, crd), f)
		_, err = ext.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{})
		require.NoError(t, err, f)
		require.NoError(t, wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			got, err := ext.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, c := range got.Status.Conditions {
				if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		}), "CRD %s not established", crd.Name)
	}
}

// schedulerConfig is the KubeSchedulerConfiguration we ship.
const schedulerConfig = "../../manifests/scheduler/config.yaml"

// startScheduler runs dynamig-scheduler in process with the shipped
// configuration until the returned stop function is called or the test ends.
func (c *cluster) startScheduler(t *testing.T) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sched, factory, dynFactory, broadcaster, err := c.buildScheduler(ctx, schedulerConfig)
	require.NoError(t, err)
	factory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	dynFactory.WaitForCacheSync(ctx.Done())
	require.NoError(t, sched.WaitForHandlersSync(ctx))
	done := make(chan struct{})
	go func() {
		sched.Run(ctx)
		close(done)
	}()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		<-done
		broadcaster.Shutdown()
	}
	t.Cleanup(stop)
	return stop
}

// buildScheduler builds the scheduler from a configuration file, as
// dynamig-scheduler does.
func (c *cluster) buildScheduler(ctx context.Context, file string) (*scheduler.Scheduler, informers.SharedInformerFactory, dynamicinformer.DynamicSharedInformerFactory, events.EventBroadcaster, error) {
	cfg, err := options.LoadConfigFromFile(klog.FromContext(ctx), file)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	factory := scheduler.NewInformerFactory(c.cs, 0, nil)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(c.dyn, 0)
	broadcaster := events.NewBroadcaster(&events.EventSinkImpl{Interface: c.cs.EventsV1()})
	broadcaster.StartRecordingToSink(ctx.Done())
	sched, err := scheduler.New(ctx, c.cs, factory, dynFactory, profile.NewRecorderFactory(broadcaster),
		scheduler.WithKubeConfig(c.cfg),
		scheduler.WithProfiles(cfg.Profiles...),
		scheduler.WithPodInitialBackoffSeconds(1),
		scheduler.WithPodMaxBackoffSeconds(1),
		scheduler.WithFrameworkOutOfTreeRegistry(frameworkruntime.Registry{dynamicmig.Name: dynamicmig.New}),
	)
	if err != nil {
		broadcaster.Shutdown()
	}
	return sched, factory, dynFactory, broadcaster, err
}

// newScheduler only builds a scheduler from a configuration file and
// returns the error, if any.
func (c *cluster) newScheduler(t *testing.T, file string) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, _, _, broadcaster, err := c.buildScheduler(ctx, file)
	if err == nil {
		broadcaster.Shutdown()
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
