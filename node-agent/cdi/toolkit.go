package cdi

import (
	"cmp"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi/transform"
	"github.com/NVIDIA/nvidia-container-toolkit/pkg/nvcdi/transform/root"
	"k8s.io/klog/v2"
	"tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
)

// ToolkitOptions say where the NVIDIA driver is on the node, as the
// NVIDIA container toolkit's `nvidia-ctk cdi generate` flags do, as the
// agent sees it.
type ToolkitOptions struct {
	// HostRoot is where the agent sees the host's "/" ("" or "/": as it
	// is): the specs name host paths, without it.
	HostRoot string
	// DriverRoot is where the driver's files are: HostRoot for a driver
	// installed on the host, HostRoot/run/nvidia/driver for the GPU
	// Operator's driver container.
	DriverRoot string
	// DevRoot is where the device nodes are (default DriverRoot).
	DevRoot string
	// HookPath is the nvidia-cdi-hook binary on the host, which the
	// container runtime runs (the GPU Operator installs it in
	// /usr/local/nvidia/toolkit).
	HookPath string
}

// Toolkit is the container edits of a device as the NVIDIA container
// toolkit's CDI library (nvcdi, NVML mode) generates them for it: the
// device nodes of the GPU — for a MIG device, its parent GPU's and the
// MIG capability nodes of its GPU and compute instances — and those every
// device needs (/dev/nvidiactl, the UVM nodes), the driver's libraries
// and binaries, and the hooks that make them usable in the container.
type Toolkit struct {
	lib  nvcdi.Interface
	host transform.Transformer // host paths as the agent sees them to host paths

	mu     sync.Mutex
	common *specs.ContainerEdits // the driver's, the same for every device, read once
}

// NewToolkit generates edits from the devices nvmllib sees.
func NewToolkit(nvmllib nvml.Interface, o ToolkitOptions) (*Toolkit, error) {
	vendor, class := parser.ParseQualifier(deviceplugin.CDIKind)
	byUUID, err := nvcdi.NewDeviceNamer(nvcdi.DeviceNameStrategyUUID)
	if err != nil {
		return nil, err
	}
	opts := []nvcdi.Option{
		nvcdi.WithMode(nvcdi.ModeNvml), nvcdi.WithNvmlLib(nvmllib), nvcdi.WithLogger(toolkitLogger{}),
		nvcdi.WithVendor(vendor), nvcdi.WithClass(class), nvcdi.WithDeviceNamers(byUUID),
		nvcdi.WithDriverRoot(o.DriverRoot), nvcdi.WithDevRoot(o.DevRoot),
	}
	if o.HookPath != "" {
		opts = append(opts, nvcdi.WithNVIDIACDIHookPath(o.HookPath))
	}
	lib, err := nvcdi.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("the NVIDIA container toolkit's CDI library: %w", err)
	}
	host := root.New(root.WithRoot(cmp.Or(o.HostRoot, "/")), root.WithTargetRoot("/"))
	return &Toolkit{lib: lib, host: host}, nil
}

// Edits are the container edits of the device with this MIG or GPU UUID.
func (t *Toolkit) Edits(id string) (specs.ContainerEdits, error) {
	common, err := t.commonEdits()
	if err != nil {
		return specs.ContainerEdits{}, err
	}
	devs, err := t.lib.GetDeviceSpecsByID(id)
	if err != nil {
		return specs.ContainerEdits{}, fmt.Errorf("the NVIDIA container toolkit's CDI edits of %s: %w", id, err)
	}
	if len(devs) != 1 {
		return specs.ContainerEdits{}, fmt.Errorf("the NVIDIA container toolkit's CDI library gave %d devices for %s, not 1", len(devs), id)
	}
	d := devs[0]
	d.ContainerEdits.Env = append(d.ContainerEdits.Env, common.Env...)
	d.ContainerEdits.DeviceNodes = append(d.ContainerEdits.DeviceNodes, common.DeviceNodes...)
	d.ContainerEdits.Mounts = append(d.ContainerEdits.Mounts, common.Mounts...)
	d.ContainerEdits.Hooks = append(d.ContainerEdits.Hooks, common.Hooks...)
	spec := &specs.Spec{Devices: []specs.Device{d}}
	if err := t.host.Transform(spec); err != nil {
		return specs.ContainerEdits{}, fmt.Errorf("host paths of the CDI edits of %s: %w", id, err)
	}
	return spec.Devices[0].ContainerEdits, nil
}

func (t *Toolkit) commonEdits() (*specs.ContainerEdits, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.common != nil {
		return t.common, nil
	}
	c, err := t.lib.GetCommonEdits()
	if err != nil {
		return nil, fmt.Errorf("the NVIDIA container toolkit's CDI edits of the driver: %w", err)
	}
	t.common = c.ContainerEdits
	return t.common, nil
}

// toolkitLogger logs the CDI library's messages through klog.
type toolkitLogger struct{}

func (toolkitLogger) Tracef(f string, args ...any)   { logAt(6, f, args) }
func (toolkitLogger) Debugf(f string, args ...any)   { logAt(4, f, args) }
func (toolkitLogger) Infof(f string, args ...any)    { logAt(2, f, args) }
func (toolkitLogger) Warningf(f string, args ...any) { logAt(0, f, args) }
func (toolkitLogger) Errorf(f string, args ...any) {
	klog.ErrorS(nil, fmt.Sprintf(f, args...), "from", "nvcdi")
}

func logAt(level klog.Level, f string, args []any) {
	if v := klog.V(level); v.Enabled() {
		v.InfoS(fmt.Sprintf(f, args...), "from", "nvcdi")
	}
}
