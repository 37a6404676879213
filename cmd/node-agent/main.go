// Command node-agent is the dynamig node agent (a DaemonSet on nodes
// labelled dynamig.io/partitioning=mig): it applies NodePartition layouts
// through NVML and reports what the node has.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/app"
)

func main() {
	var o app.Options
	o.Flags(pflag.CommandLine)
	pflag.Parse()
	if err := logsapi.ValidateAndApply(o.Logs, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := app.Run(ctx, o)
	stop()
	if err != nil {
		klog.ErrorS(err, "node agent stopped")
		klog.FlushAndExit(klog.ExitFlushTimeout, 1)
	}
	klog.Flush()
}
