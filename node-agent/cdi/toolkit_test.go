package cdi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/specs-go"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
)

// inNamespace marks the run of TestToolkit inside its mount namespace.
const inNamespace = "DYNAMIG_CDI_TEST_NAMESPACE"

// The NVIDIA container toolkit's CDI library, on the simulated GPUs (NVML
// through go-nvml's types), generates the edits of a MIG device — its
// parent GPU's node and the MIG capability nodes of its GPU and compute
// instances — and of a whole GPU, with the driver's libraries, and the
// spec written with them passes the CDI library's validation and
// resolves. The driver is a stand-in: empty files for its libraries and
// binaries, device nodes made with mknod, and the MIG minors file, which
// the library reads from the host's /proc/driver/nvidia-caps whatever the
// driver root, on a tmpfs over /proc/driver in a mount namespace of the
// test's own (so the test re-runs itself under unshare -m, as root).
func TestToolkit(t *testing.T) {
	if os.Getenv(inNamespace) == "" {
		if os.Geteuid() != 0 {
			t.Skip("needs root: it mounts a tmpfs over /proc/driver in a mount namespace of its own")
		}
		cmd := exec.Command("unshare", "-m", "--propagation", "private", os.Args[0], "-test.run=^TestToolkit$", "-test.v")
		cmd.Env = append(os.Environ(), inNamespace+"=1")
		out, err := cmd.CombinedOutput()
		t.Logf("in its own mount namespace:\n%s", out)
		require.NoError(t, err)
		return
	}
	require.NoError(t, syscall.Mount("tmpfs", "/proc/driver", "tmpfs", 0, ""))
	caps := []string{"config 1", "monitor 2"}
	for g := range 2 {
		for gi := range 15 {
			caps = append(caps, fmt.Sprintf("gpu%d/gi%d/access %d", g, gi, 3+g*200+gi*10))
			for ci := range 8 {
				caps = append(caps, fmt.Sprintf("gpu%d/gi%d/ci%d/access %d", g, gi, ci, 4+g*200+gi*10+ci))
			}
		}
	}
	require.NoError(t, os.MkdirAll("/proc/driver/nvidia-caps", 0o755))
	require.NoError(t, os.WriteFile("/proc/driver/nvidia-caps/mig-minors", []byte(strings.Join(caps, "\n")+"\n"), 0o444))

	root := t.TempDir()
	for _, f := range []string{"usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05", "usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580.95.05", "usr/bin/nvidia-smi"} {
		require.NoError(t, os.MkdirAll(filepath.Join(root, filepath.Dir(f)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(root, f), nil, 0o755))
	}
	mknod := func(path string, major, minor uint32) {
		require.NoError(t, os.MkdirAll(filepath.Join(root, filepath.Dir(path)), 0o755))
		require.NoError(t, unix.Mknod(filepath.Join(root, path), unix.S_IFCHR|0o666, int(unix.Mkdev(major, minor))))
	}
	for _, n := range []string{"nvidia0", "nvidia1"} {
		mknod("dev/"+n, 195, uint32(n[len(n)-1]-'0'))
	}
	mknod("dev/nvidiactl", 195, 255)
	mknod("dev/nvidia-uvm", 510, 0)
	mknod("dev/nvidia-uvm-tools", 510, 1)
	for _, c := range caps {
		var minor uint32
		_, err := fmt.Sscanf(c[strings.LastIndex(c, " ")+1:], "%d", &minor)
		require.NoError(t, err)
		mknod(fmt.Sprintf("dev/nvidia-caps/nvidia-cap%d", minor), 236, minor)
	}

	sim, err := gpu.NewSimulator("n", "A100-80GB", "A100-80GB")
	require.NoError(t, err)
	sim.SetMIGMode(1, false, false)
	lib, err := gpu.Open(sim.Interface())
	require.NoError(t, err)
	_, err = lib.Create(0, mig.MustParseProfile("3g.40gb"), 4)
	require.NoError(t, err)
	s, err := lib.Create(0, mig.MustParseProfile("1g.10gb"), 0)
	require.NoError(t, err)
	gpus, err := lib.GPUs()
	require.NoError(t, err)
	whole := gpus[1].UUID

	tk, err := NewToolkit(sim.Interface(), ToolkitOptions{HostRoot: root, DriverRoot: root, HookPath: "/usr/local/nvidia/toolkit/nvidia-cdi-hook"})
	require.NoError(t, err)
	dir := t.TempDir()
	written, err := New(dir, tk)
	require.NoError(t, err)
	require.NoError(t, written.Sync([]string{s.UUID, whole}))

	runtime, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	require.NoError(t, err)
	nodes := func(id string) []string {
		d := runtime.GetDevice(deviceplugin.CDIName(id))
		require.NotNil(t, d, "%s resolves", id)
		var out []string
		for _, n := range d.ContainerEdits.DeviceNodes {
			out = append(out, n.Path)
		}
		return out
	}
	giCap := fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", 3+s.GI*10)
	ciCap := fmt.Sprintf("/dev/nvidia-caps/nvidia-cap%d", 4+s.GI*10+s.CI)
	mn := nodes(s.UUID)
	t.Logf("1g.10gb (GI %d, CI %d): device nodes %v", s.GI, s.CI, mn)
	assert.Subset(t, mn, []string{"/dev/nvidia0", giCap, ciCap, "/dev/nvidiactl", "/dev/nvidia-uvm"}, "the parent GPU, the slice's capabilities, the control nodes")
	assert.NotContains(t, mn, "/dev/nvidia1")
	wn := nodes(whole)
	assert.Subset(t, wn, []string{"/dev/nvidia1", "/dev/nvidiactl"})
	assert.NotContains(t, wn, "/dev/nvidia0")

	d := runtime.GetDevice(deviceplugin.CDIName(s.UUID))
	assert.Contains(t, d.ContainerEdits.Env, "NVIDIA_VISIBLE_DEVICES=void", "no NVIDIA runtime hook injects the device again")
	assert.NotContains(t, d.ContainerEdits.Env, "NVIDIA_VISIBLE_DEVICES="+s.UUID)
	const libcuda = "/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05"
	assert.True(t, slices.ContainsFunc(d.ContainerEdits.Mounts, func(m *specs.Mount) bool {
		return m.ContainerPath == libcuda && m.HostPath == libcuda
	}), "the driver's libcuda is mounted, from its host path (not where the agent sees the host)")
	assert.True(t, slices.ContainsFunc(d.ContainerEdits.DeviceNodes, func(n *specs.DeviceNode) bool {
		return n.Path == "/dev/nvidia0" && n.HostPath == "/dev/nvidia0"
	}), "the parent GPU's node, by its host path")
	_, err = cdi.ReadSpec(written.Path(s.UUID), 0)
	require.NoError(t, err, "a valid spec")

	// A device the toolkit cannot describe (its GPU gone, a driver
	// without the files) is not given a spec: Sync fails and says why.
	err = written.Sync([]string{"MIG-nonexistent"})
	require.ErrorContains(t, err, "the NVIDIA container toolkit's CDI edits of MIG-nonexistent")
}
