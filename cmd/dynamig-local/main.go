// Command dynamig-local runs dynamig on this machine — a real API server,
// the real dynamig scheduler, the real node agents on simulated GPUs — and
// shows it doing a scenario's job, with a timeline. `make demo` runs it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/test/local"
)

func main() {
	var o local.DemoOptions
	fs := flag.NewFlagSet("dynamig-local", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: dynamig-local [flags] [scenario.yaml]\n\nWithout a scenario: one node with one A100-80GB, MIG on and no slices, and a Deployment of 5 pods\nrequesting nvidia.com/mig-1g.10gb. With one: its nodes, and its pods created at their arrival times.\n\n")
		fs.PrintDefaults()
	}
	fs.BoolVar(&o.KeepRunning, "keep-running", false, "leave the cluster up for kubectl until Ctrl-C")
	fs.StringVar(&o.Dir, "dir", "", "directory for the kubeconfig, data and logs (default: a temporary one, removed on exit)")
	fs.DurationVar(&o.DevicePluginDelay, "device-plugin-delay", 500*time.Millisecond, "time the simulated device plugin takes to restart")
	fs.DurationVar(&o.SliceDelay, "slice-delay", 100*time.Millisecond, "time simulated NVML takes per GPU instance created")
	fs.Float64Var(&o.TimeScale, "time-scale", 1, "run a scenario this many times faster than its arrival times and durations")
	fs.DurationVar(&o.Timeout, "timeout", 5*time.Minute, "give up if the pods have not all run by then")
	bench := fs.Bool("bench", false, "instead of a scenario, run the latency benchmark and print its table")
	var b local.BenchOptions
	fs.IntVar(&b.Nodes, "bench-nodes", 20, "benchmark: nodes")
	fs.IntVar(&b.GPUsPerNode, "bench-gpus", 8, "benchmark: A100-80GB GPUs per node")
	fs.IntVar(&b.Pods, "bench-pods", 100, "benchmark: MIG pods in the burst")
	fs.IntVar(&b.CPUPods, "bench-cpu-pods", 500, "benchmark: non-GPU pods for the throughput comparison (0: skip)")
	fs.Uint64Var(&b.Seed, "bench-seed", 1, "benchmark: seed of the burst's profiles")
	benchOnly := fs.String("bench-only", "", "benchmark: only these plugin/hardware runs, comma-separated (e.g. agent/realistic; default all four)")
	scale := fs.Bool("scale", false, "instead of a scenario, run the scale measurement (real etcd, kube-apiserver and dynamig-scheduler binary; light nodes) and print its table")
	var so local.ScaleOptions
	fs.IntVar(&so.Nodes, "scale-nodes", 1000, "scale: nodes")
	fs.IntVar(&so.GPUsPerNode, "scale-gpus", 8, "scale: GPUs per node (A100-80GB and H100-80GB, one model per node)")
	fs.IntVar(&so.Pods, "scale-pods", 1000, "scale: MIG pods in the burst (one more asks for the last node)")
	fs.IntVar(&so.CPUPods, "scale-cpu-pods", 1000, "scale: non-GPU pods per throughput run")
	fs.IntVar(&so.Pairs, "scale-pairs", 5, "scale: paired throughput runs with and without DynamicMIG (0: skip)")
	fs.Float64Var(&so.SteadyRate, "scale-steady-rate", 10, "scale: after the burst, create --scale-steady-pods 7g.80gb pods at this rate a second, each needing a new layout, for the PostFilter latency over about one plan per pod (0: skip)")
	fs.IntVar(&so.SteadyPods, "scale-steady-pods", 0, "scale: pods of the steady phase (0: as many as --scale-pods)")
	fs.DurationVar(&so.ApplyDelay, "scale-apply-delay", 0, "scale: time the light node model takes to apply a new spec (default: at once)")
	fs.Uint64Var(&so.Seed, "scale-seed", 1, "scale: seed of the cluster's layouts and the burst")
	fs.DurationVar(&so.Stall, "scale-stall", time.Minute, "scale: stop waiting for binds after this long without one and report the pods left")
	output := fs.String("o", "table", "scale: output format, table or json")
	soak := fs.Int("soak", 0, "instead of a scenario, run this many random scenarios with faults on one cluster and check dynamig's invariants after each; exit 1 on any violation")
	soakFaults := fs.String("soak-faults", "", "soak: the faults runs pick from, comma-separated (default all: "+strings.Join(local.SoakFaults, ",")+")")
	soakParallel := fs.Int("soak-parallel", 1, "soak: split the runs over this many processes, each with a cluster of its own and a contiguous range of the seeds (a run takes about a fifth of a core)")
	soakSeed := fs.Uint64("soak-seed", 1, "soak: the first run's seed (run i uses seed+i; a failing seed reruns with --soak 1 --soak-seed S)")
	fs.StringVar(&o.DevicePlugin, "device-plugin", local.DevicePluginAgent, "who advertises the nodes' GPU resources: agent (the agent's own device plugin) or nvidia (a stand-in for NVIDIA's device plugin, restarted by the agent after every change)")
	fs.StringVar(&o.KubernetesVersion, "kubernetes-version", "", "run kube-apiserver, kube-controller-manager and kubelet of this older Kubernetes release ("+strings.Join(local.OlderVersions, ", ")+"; default "+local.Version()+", this module's), built from test/compat/k8s-<version>")
	build := fs.String("build-control-plane", "", "only build etcd, kube-apiserver, kube-controller-manager and kubelet into this directory (make control-plane; with --kubernetes-version, that release's into DIR/k8s-<version>)")
	verbosity := fs.Int("v", 2, "log verbosity of the scheduler and agents in dynamig.log (5: every decision)")
	// Flags may come before or after the scenario file.
	var positional []string
	for args := os.Args[1:]; ; {
		_ = fs.Parse(args)
		if fs.NArg() == 0 {
			break
		}
		positional, args = append(positional, fs.Arg(0)), fs.Args()[1:]
	}
	if len(positional) > 1 {
		fs.Usage()
		os.Exit(2)
	}
	if len(positional) == 1 {
		o.Scenario = positional[0]
	}
	if *build != "" {
		buildAll := local.BuildControlPlane
		if o.KubernetesVersion != "" {
			buildAll = func(ctx context.Context, dir string, out io.Writer) error {
				return local.BuildOlderControlPlane(ctx, dir, o.KubernetesVersion, out)
			}
		}
		if err := buildAll(context.Background(), *build, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "dynamig-local:", err)
			os.Exit(1)
		}
		return
	}
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("v", fmt.Sprint(*verbosity))
	_ = klogFlags.Set("stderrthreshold", "FATAL") // errors go to the log file too, not over the output
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *bench {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
		if *benchOnly != "" {
			b.Only = strings.Split(*benchOnly, ",")
		}
		b.Dir = o.Dir
		if err := local.Bench(ctx, b, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "dynamig-local:", err)
			os.Exit(1)
		}
		return
	}
	if *scale {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
		so.Dir, so.Progress = o.Dir, os.Stderr
		if err := runScale(ctx, so, *output); err != nil {
			fmt.Fprintln(os.Stderr, "dynamig-local:", err)
			os.Exit(1)
		}
		return
	}
	if *soak > 0 && *soakParallel > 1 {
		exe, err := os.Executable()
		if err == nil {
			var violations int
			violations, err = local.SoakInProcesses(ctx, exe, os.Args[1:], o.Dir, *soak, *soakSeed, *soakParallel, os.Stdout)
			if err == nil && violations > 0 {
				os.Exit(1)
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "dynamig-local:", err)
			os.Exit(1)
		}
		return
	}
	if *soak > 0 {
		var faults []string
		if *soakFaults != "" {
			faults = strings.Split(*soakFaults, ",")
		}
		violations, err := local.RunSoak(ctx, local.SoakOptions{Runs: *soak, Seed: *soakSeed, Faults: faults, Cluster: local.Options{
			Dir: o.Dir, DevicePluginDelay: o.DevicePluginDelay, SliceDelay: o.SliceDelay, DevicePluginTimeout: 30 * time.Second,
			KubernetesVersion: o.KubernetesVersion, DevicePlugin: o.DevicePlugin,
		}}, os.Stdout)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dynamig-local:", err)
			os.Exit(1)
		}
		if violations > 0 {
			os.Exit(1)
		}
		return
	}
	ok, err := local.Demo(ctx, o, os.Stdout)
	if err != nil {
		klog.Flush()
		fmt.Fprintln(os.Stderr, "dynamig-local:", err)
		os.Exit(1)
	}
	if !ok {
		os.Exit(1)
	}
}

// runScale runs the scale measurement and prints it as a table or JSON;
// it fails if a burst pod was not served or the node model saw a
// violation, after printing.
func runScale(ctx context.Context, o local.ScaleOptions, output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("-o %q: want table or json", output)
	}
	r, err := local.Scale(ctx, o)
	if err != nil {
		return err
	}
	if output == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			return err
		}
	} else {
		local.PrintScale(os.Stdout, r)
	}
	if len(r.Unserved) > 0 || len(r.ModelViolations) > 0 {
		return fmt.Errorf("%d pods unserved, %d node-model violations", len(r.Unserved), len(r.ModelViolations))
	}
	return nil
}
