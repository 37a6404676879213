package kubeletnode

import (
	"cmp"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/dynamig/dynamig/test/nodesim"
)

// kubeletConfig is the KubeletConfiguration that runs here: no cgroups
// per QoS, no node-allocatable enforcement, no swap or cgroup v1 checks,
// no eviction, image GC off, anonymous and AlwaysAllow on 127.0.0.1.
// nodeStatusUpdateFrequency is kubelet's default, 10 s, unless the node's
// options say otherwise: the scheduler sees new devices in Node
// allocatable late, as it does on a real cluster.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
cgroupDriver: cgroupfs
localStorageCapacityIsolation: false
containerRuntimeEndpoint: unix://%[1]s
imageServiceEndpoint: unix://%[1]s
address: 127.0.0.1
port: %[2]d
readOnlyPort: 0
healthzPort: %[3]d
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
resolvConf: ""
serializeImagePulls: false
podLogsDir: %[4]s
volumePluginDir: %[5]s
nodeStatusUpdateFrequency: %[6]s
`

// inNamespace bind-mounts the private device-plugin and container-log
// directories over kubelet's fixed paths inside a new mount namespace,
// then runs kubelet.
const inNamespace = `set -e
mkdir -p /var/lib/kubelet/device-plugins /var/log/containers
mount --bind "$1" /var/lib/kubelet/device-plugins
mount --bind "$2" /var/log/containers
shift 2
exec "$@"`

func (n *Node) logFile() string { return filepath.Join(n.opts.Dir, "kubelet.log") }

// startKubelet starts kubelet in its own mount namespace. The fixed paths
// are made on the host too: a bind mount needs its target to exist.
func (n *Node) startKubelet() error {
	for _, d := range []string{"/var/lib/kubelet/device-plugins", "/var/log/containers"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	dir := n.opts.Dir
	cfg := filepath.Join(dir, "kubelet.yaml")
	data := fmt.Sprintf(kubeletConfig, filepath.Join(n.opts.SocketDir, "cri.sock"), ports[0], ports[1],
		filepath.Join(dir, "pod-logs"), filepath.Join(dir, "volume-plugins"), cmp.Or(n.opts.NodeStatusUpdateFrequency, 10*time.Second))
	if err := os.WriteFile(cfg, []byte(data), 0o644); err != nil {
		return err
	}
	log, err := os.OpenFile(n.logFile(), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	args := []string{"-m", "--propagation", "private", "sh", "-c", inNamespace, "sh", n.pluginDir, filepath.Join(dir, "logs"),
		n.opts.Kubelet, "--config", cfg, "--kubeconfig", n.opts.Kubeconfig, "--root-dir", filepath.Join(dir, "root"),
		"--cert-dir", filepath.Join(dir, "pki"), "--hostname-override", n.Name, "--node-ip", "127.0.0.1",
		"--node-labels", nodeLabels(nodesim.Labels(n.Name, n.nvml, n.opts.Models, n.opts.Labels)), "--v", "2"}
	cmd := exec.Command("unshare", args...)
	// Its own working directory: what kubelet removes by a relative path
	// must never be the caller's files.
	cmd.Dir = filepath.Join(dir, "root")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		_ = log.Close()
		return fmt.Errorf("starting kubelet: %w", err)
	}
	n.kubelet = cmd
	go func() {
		_ = cmd.Wait()
		_ = log.Close()
		close(n.exited)
	}()
	return nil
}

func nodeLabels(l map[string]string) string {
	var kv []string
	for k, v := range l {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

// freePorts finds ports free on 127.0.0.1 now.
func freePorts(k int) ([]int, error) {
	var ports []int
	for range k {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer func() { _ = l.Close() }()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
