// Command scheduler is dynamig-scheduler: the kube-scheduler with the
// DynamicMIG plugin. Configure it with a KubeSchedulerConfiguration
// (manifests/scheduler/config.yaml). Before it schedules, it checks the API
// server (Kubernetes 1.34 or later) and switches off the features whose
// APIs the server does not serve (pkg/compat).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"

	"github.com/dynamig/dynamig/pkg/compat"
	"github.com/dynamig/dynamig/pkg/plugins/dynamicmig"
)

func main() {
	cmd := app.NewSchedulerCommand(app.WithPlugin(dynamicmig.Name, dynamicmig.New))
	compat.Wrap(cmd)
	os.Exit(cli.Run(cmd))
}
