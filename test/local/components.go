package local

import (
	"context"
	"fmt"
	"io/fs"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
	"k8s.io/kubernetes/pkg/scheduler"
	frameworkruntime "k8s.io/kubernetes/pkg/scheduler/framework/runtime"
	"k8s.io/kubernetes/pkg/scheduler/profile"
	"sigs.k8s.io/yaml"

	"github.com/dynamig/dynamig/manifests"
	"github.com/dynamig/dynamig/node-agent/agent"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/compat"
	"github.com/dynamig/dynamig/pkg/plugins/dynamicmig"
	"github.com/dynamig/dynamig/test/nodesim"
)

// InstallCRDs creates the shipped CRDs and waits until they are established.
func InstallCRDs(ctx context.Context, cfg *rest.Config) error {
	ext, err := apiextensionsclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	files, err := fs.Glob(manifests.CRDs, "crds/*.yaml")
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no CRDs embedded: %v", err)
	}
	for _, f := range files {
		data, err := manifests.CRDs.ReadFile(f)
		if err != nil {
			return err
		}
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.UnmarshalStrict(data, crd); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		if _, err := ext.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating CRD %s: %w", crd.Name, err)
		}
		err = wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
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
		})
		if err != nil {
			return fmt.Errorf("CRD %s not established: %w", crd.Name, err)
		}
	}
	return nil
}

// Scheduler is dynamig-scheduler built from a KubeSchedulerConfiguration
// file, in process, as cmd/scheduler builds it (without leader election:
// one instance).
type Scheduler struct {
	sched       *scheduler.Scheduler
	factory     informers.SharedInformerFactory
	broadcaster events.EventBroadcaster
}

// NewScheduler builds the scheduler; it fails as the binary would on a
// bad configuration, bad plugin arguments or an unsupported API server,
// and like the binary it switches off the features whose APIs the server
// does not serve (compat.FitToServer; the feature gates are the process's).
func NewScheduler(ctx context.Context, cfg *rest.Config, configFile string, opts ...scheduler.Option) (*Scheduler, error) {
	cc, err := options.LoadConfigFromFile(klog.FromContext(ctx), configFile)
	if err != nil {
		return nil, err
	}
	if err := compat.FitToServer(ctx, cfg, nil); err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	factory := scheduler.NewInformerFactory(cs, 0, nil)
	broadcaster := events.NewBroadcaster(&events.EventSinkImpl{Interface: cs.EventsV1()})
	broadcaster.StartRecordingToSink(ctx.Done())
	opts = append([]scheduler.Option{
		scheduler.WithKubeConfig(cfg),
		scheduler.WithProfiles(cc.Profiles...),
		scheduler.WithPodInitialBackoffSeconds(cc.PodInitialBackoffSeconds),
		scheduler.WithPodMaxBackoffSeconds(cc.PodMaxBackoffSeconds),
		scheduler.WithFrameworkOutOfTreeRegistry(frameworkruntime.Registry{dynamicmig.Name: dynamicmig.New}),
	}, opts...)
	// No dynamic informers: DynamicMIG watches NodePartitions with its own
	// typed informer and registers no custom-resource events.
	sched, err := scheduler.New(ctx, cs, factory, nil, profile.NewRecorderFactory(broadcaster), opts...)
	if err != nil {
		broadcaster.Shutdown()
		return nil, err
	}
	return &Scheduler{sched: sched, factory: factory, broadcaster: broadcaster}, nil
}

// Run starts the informers and schedules until ctx ends.
func (s *Scheduler) Run(ctx context.Context) error {
	defer s.broadcaster.Shutdown()
	s.factory.Start(ctx.Done())
	s.factory.WaitForCacheSync(ctx.Done())
	if err := s.sched.WaitForHandlersSync(ctx); err != nil {
		return err
	}
	s.sched.Run(ctx)
	return nil
}

// Close releases what NewScheduler started, for a scheduler never Run.
func (s *Scheduler) Close() { s.broadcaster.Shutdown() }

// AgentConfig is the node agent's configuration for a simulated node: the
// stand-in device plugin's namespace and label, a short resync.
func AgentConfig(node string, devicePluginTimeout time.Duration) agent.Config {
	return agent.Config{
		NodeName: node, DevicePluginNamespace: nodesim.DevicePluginNamespace,
		DevicePluginSelector: nodesim.DevicePluginLabel + "=" + nodesim.DevicePluginApp,
		DevicePluginTimeout:  devicePluginTimeout, ResyncPeriod: time.Second,
	}
}

// RunAgent runs the real node agent of a simulated node — its own NVML
// session on the node's GPUs and its own PodResources connection, as a
// separate process would have — until ctx ends.
func RunAgent(ctx context.Context, cfg *rest.Config, sim *gpu.Simulator, socket string, ac agent.Config) error {
	lib, err := gpu.Open(sim.Interface())
	if err != nil {
		return err
	}
	kubelet, err := podresources.Dial(socket, time.Second)
	if err != nil {
		return err
	}
	defer func() { _ = kubelet.Close() }()
	a, err := agent.NewForConfig(cfg, ac, lib, kubelet)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
