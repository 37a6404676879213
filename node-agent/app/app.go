// Package app wires the node agent: flags and logging (component-base, as
// kube-scheduler has them), clients, the NVML library (or simulated GPUs),
// kubelet's PodResources API, and the metrics and health endpoints.
package app

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	_ "k8s.io/component-base/logs/json/register" // --logging-format=json
	"k8s.io/component-base/metrics/legacyregistry"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/agent"
	"github.com/dynamig/dynamig/node-agent/cdi"
	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
)

// Options are the agent's flags.
type Options struct {
	Kubeconfig         string
	PodResourcesSocket string
	ListenAddress      string
	NVMLLibrary        string
	// Simulate, if set, runs on simulated GPUs of these catalog models
	// instead of NVML: "A100-80GB,A100-80GB".
	Simulate string
	// DevicePlugin is "nvidia" (restart NVIDIA's device plugin after every
	// change) or "agent" (serve the node's GPU resources from
	// DevicePluginDir).
	DevicePlugin, DevicePluginDir string
	// CDISpecDir holds the CDI specs of the devices (agent mode).
	CDISpecDir string
	// CDIEdits is what a device's CDI spec holds besides
	// NVIDIA_VISIBLE_DEVICES: "toolkit" (the NVIDIA container toolkit's
	// edits for it), "env" (nothing more) or "auto" (toolkit on NVML, env
	// on simulated GPUs, which have no driver files).
	CDIEdits string
	// Toolkit says where the driver is, for CDIEdits toolkit.
	Toolkit cdi.ToolkitOptions
	// Logs is the logging configuration of -v/--v, --vmodule and
	// --logging-format (text or json); the caller applies it with
	// logsapi.ValidateAndApply before Run.
	Logs *logsapi.LoggingConfiguration
	agent.Config
}

// Flags sets every option to its default and registers it on fs, with
// component-base's logging flags.
func (o *Options) Flags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig file; in-cluster configuration if empty")
	fs.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME, set from the downward API)")
	fs.StringVar(&o.PodResourcesSocket, "pod-resources-socket", podresources.DefaultSocket, "kubelet's PodResources API socket")
	fs.StringVar(&o.DevicePlugin, "device-plugin", "nvidia", "who advertises the node's GPU resources to the kubelet: nvidia (NVIDIA's device plugin, restarted after every change) or agent (this agent; switch NVIDIA's off on the node, README)")
	fs.StringVar(&o.DevicePluginDir, "device-plugin-dir", deviceplugin.DefaultDir, "the kubelet's device-plugin directory (agent mode)")
	fs.StringVar(&o.CDISpecDir, "cdi-spec-dir", cdi.DefaultDir, "where the agent writes the CDI spec of each device it advertises (agent mode)")
	fs.StringVar(&o.CDIEdits, "cdi-edits", "auto", "what a device's CDI spec gives the container besides NVIDIA_VISIBLE_DEVICES (agent mode): toolkit (the device nodes, driver libraries and hooks the NVIDIA container toolkit's CDI library generates for it), env (nothing more: the NVIDIA runtime must inject the device), or auto (toolkit, but env with --simulate)")
	fs.StringVar(&o.Toolkit.HostRoot, "host-root", "/", "where the agent sees the host's / (the Helm chart mounts it at /host), for --cdi-edits toolkit: the specs name host paths")
	fs.StringVar(&o.Toolkit.DriverRoot, "driver-root", "/", "where the agent sees the NVIDIA driver's files, for --cdi-edits toolkit: the host root for a driver installed on the host, <host root>/run/nvidia/driver for the GPU Operator's driver container")
	fs.StringVar(&o.Toolkit.DevRoot, "dev-root", "", "where the agent sees the NVIDIA device nodes' /dev parent, for --cdi-edits toolkit (default: --driver-root)")
	fs.StringVar(&o.Toolkit.HookPath, "nvidia-cdi-hook-path", "/usr/local/nvidia/toolkit/nvidia-cdi-hook", "the NVIDIA container toolkit's nvidia-cdi-hook on the host, which the container runtime runs (GPU Operator: /usr/local/nvidia/toolkit/nvidia-cdi-hook; a host install: /usr/bin/nvidia-cdi-hook)")
	fs.StringVar(&o.DevicePluginNamespace, "device-plugin-namespace", "gpu-operator", "namespace of the NVIDIA device plugin pods")
	fs.StringVar(&o.DevicePluginSelector, "device-plugin-selector", "app=nvidia-device-plugin-daemonset", "label selector of the NVIDIA device plugin pods")
	fs.DurationVar(&o.DevicePluginTimeout, "device-plugin-timeout", 2*time.Minute, "how long to wait for the device plugin to re-advertise the slices after a change")
	fs.DurationVar(&o.ResyncPeriod, "resync-period", 10*time.Second, "how often to observe the GPUs without an event")
	fs.StringVar(&o.ListenAddress, "listen-address", ":8080", "address of /metrics, /healthz and /readyz")
	fs.StringVar(&o.NVMLLibrary, "nvml-library", "", "path of libnvidia-ml.so.1 (default: the dynamic linker's search path)")
	fs.StringVar(&o.Simulate, "simulate", "", "run on simulated GPUs of these comma-separated catalog models (e.g. A100-80GB,H100-80GB) instead of NVML")
	o.Logs = logsapi.NewLoggingConfiguration()
	logsapi.AddFlags(o.Logs, fs)
}

// Validate checks the options.
func (o *Options) Validate() error {
	var errs []error
	if o.NodeName == "" {
		errs = append(errs, errors.New("--node-name is empty: set it or NODE_NAME from the downward API (fieldRef spec.nodeName)"))
	}
	if o.DevicePluginTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--device-plugin-timeout must be positive, got %s", o.DevicePluginTimeout))
	}
	if o.DevicePlugin != "nvidia" && o.DevicePlugin != "agent" {
		errs = append(errs, fmt.Errorf("--device-plugin must be nvidia or agent, got %q", o.DevicePlugin))
	}
	switch o.CDIEdits {
	case "auto", "env":
	case "toolkit":
		if o.Simulate != "" {
			errs = append(errs, errors.New("--cdi-edits toolkit needs the NVIDIA driver: simulated GPUs (--simulate) have none; use env or auto"))
		}
	default:
		errs = append(errs, fmt.Errorf("--cdi-edits must be auto, toolkit or env, got %q", o.CDIEdits))
	}
	if o.ResyncPeriod <= 0 {
		errs = append(errs, fmt.Errorf("--resync-period must be positive, got %s", o.ResyncPeriod))
	}
	return errors.Join(errs...)
}

// OpenGPUs opens NVML, or the simulated GPUs of --simulate.
func (o *Options) OpenGPUs() (*gpu.NVML, error) {
	if o.Simulate != "" {
		sim, err := gpu.NewSimulator(o.NodeName, strings.Split(o.Simulate, ",")...)
		if err != nil {
			return nil, fmt.Errorf("--simulate: %w", err)
		}
		return gpu.Open(sim.Interface())
	}
	return gpu.OpenLibrary(o.NVMLLibrary)
}

// Run runs the agent until ctx ends.
func Run(ctx context.Context, o Options) error {
	if err := o.Validate(); err != nil {
		return err
	}
	logger := klog.FromContext(ctx)
	lib, err := o.OpenGPUs()
	if err != nil {
		return err
	}
	defer func() { _ = lib.Close() }()
	cfg, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		return fmt.Errorf("loading the API server configuration: %w", err)
	}
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = "dynamig-agent/" + o.NodeName
	kubelet, err := podresources.Dial(o.PodResourcesSocket, 10*time.Second)
	if err != nil {
		return err
	}
	defer func() { _ = kubelet.Close() }()
	if o.DevicePlugin == "agent" {
		var edits cdi.Edits
		if o.CDIEdits == "toolkit" || o.CDIEdits == "auto" && o.Simulate == "" {
			if edits, err = cdi.NewToolkit(lib.Interface(), o.Toolkit); err != nil {
				return err
			}
		}
		specs, err := cdi.New(o.CDISpecDir, edits)
		if err != nil {
			return err
		}
		o.Plugin, o.CDI = deviceplugin.New(o.DevicePluginDir), specs
		logger.Info("agent mode", "cdiSpecDir", o.CDISpecDir, "cdiEdits", o.CDIEdits, "driverRoot", o.Toolkit.DriverRoot)
	}
	a, err := agent.NewForConfig(cfg, o.Config, lib, kubelet)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", o.ListenAddress)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", o.ListenAddress, err)
	}
	srv := serve(ctx, l, a.Ready)
	defer func() { _ = srv.Close() }()
	logger.Info("serving metrics and health", "address", o.ListenAddress)
	return a.Run(ctx)
}

// serve starts /metrics, /healthz (the process is up) and /readyz (the
// agent has reported its node once).
func serve(ctx context.Context, l net.Listener, ready func() bool) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", legacyregistry.Handler())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "the node has not been synced yet", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() { _ = srv.Serve(l) }()
	return srv
}
