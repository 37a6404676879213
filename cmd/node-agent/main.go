// Command node-agent is the dynamig node agent (a DaemonSet on nodes
// labelled dynamig.io/partitioning=mig): it applies NodePartition layouts
// through NVML and reports what the node has.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/app"
)

func main() {
	var o app.Options
	klog.InitFlags(nil)
	o.Flags(flag.CommandLine)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := app.Run(ctx, o); err != nil {
		klog.ErrorS(err, "node agent stopped")
		os.Exit(1)
	}
}
