// Command scheduler is dynamig-scheduler: the kube-scheduler with the
// DynamicMIG plugin. Configure it with a KubeSchedulerConfiguration
// (manifests/scheduler/config.yaml).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"

	"github.com/dynamig/dynamig/pkg/plugins/dynamicmig"
)

func main() {
	cmd := app.NewSchedulerCommand(app.WithPlugin(dynamicmig.Name, dynamicmig.New))
	os.Exit(cli.Run(cmd))
}
