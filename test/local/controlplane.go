package local

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Binaries are the control-plane programs and the kubelet, built from
// the Go modules by the tool lines of go.mod.
var Binaries = map[string]string{
	"kube-apiserver":          "k8s.io/kubernetes/cmd/kube-apiserver",
	"kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
	"kubelet":                 "k8s.io/kubernetes/cmd/kubelet",
	"server":                  "go.etcd.io/etcd/server/v3", // etcd; go build names it after the module's last element
}

// OlderVersions are the older Kubernetes releases the local cluster can
// run, for the compatibility run: kube-apiserver, kube-controller-manager
// and kubelet of each are built from a tool module of its own,
// test/compat/k8s-<version>, into <bin>/k8s-<version>; etcd is this
// module's. The newest release is this module's (Version).
var OlderVersions = []string{"1.34", "1.35", "1.36"}

// olderBinaries are the binaries built per older version.
var olderBinaries = []string{"kube-apiserver", "kube-controller-manager", "kubelet"}

// binDir is where the binaries of a version live: bin itself for this
// module's, else bin/k8s-<version>. The version must be "" (this module's)
// or one of OlderVersions.
func binDir(bin, version string) (string, error) {
	switch {
	case version == "":
		return bin, nil
	case slices.Contains(OlderVersions, version):
		return filepath.Join(bin, "k8s-"+version), nil
	}
	return "", fmt.Errorf("the local cluster runs Kubernetes %s (this module's) or %s, not %q", Version(), strings.Join(OlderVersions, ", "), version)
}

// Version is this module's Kubernetes release ("1.37"), or "" if go.mod
// cannot be read.
func Version() string {
	v, err := moduleVersion(moduleRoot())
	if err != nil {
		return ""
	}
	major, minor, _ := strings.Cut(strings.TrimPrefix(v, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	return major + "." + minor
}

// EnsureBinaries builds the binaries of a Kubernetes version ("" for this
// module's) into bin (OlderVersions: binDir) unless every one is there and
// newer than the go.mod and go.sum it is built from. etcd always comes
// from this module. It must run inside the module.
func EnsureBinaries(ctx context.Context, bin, version string, progress io.Writer) error {
	if version != "" {
		if err := EnsureBinaries(ctx, bin, "", progress); err != nil {
			return err
		}
	}
	dir, err := binDir(bin, version)
	if err != nil {
		return err
	}
	mod, names := moduleRoot(), slices.Collect(maps.Keys(Binaries))
	if version != "" {
		mod, names = filepath.Join(mod, "test", "compat", "k8s-"+version), olderBinaries
	}
	newest := time.Time{}
	for _, f := range []string{"go.mod", "go.sum"} {
		st, err := os.Stat(filepath.Join(mod, f))
		if err != nil {
			return fmt.Errorf("the local cluster builds its control plane from %s: %w", mod, err)
		}
		if st.ModTime().After(newest) {
			newest = st.ModTime()
		}
	}
	fresh := true
	for _, name := range names {
		st, err := os.Stat(filepath.Join(dir, name))
		fresh = fresh && err == nil && st.ModTime().After(newest)
	}
	if fresh {
		return nil
	}
	if version != "" {
		return BuildOlderControlPlane(ctx, bin, version, progress)
	}
	return BuildControlPlane(ctx, bin, progress)
}

// BuildControlPlane builds this module's binaries into dir.
func BuildControlPlane(ctx context.Context, dir string, progress io.Writer) error {
	fmt.Fprintf(progress, "building kube-apiserver, kube-controller-manager, kubelet and etcd from the Go modules into %s (the first time takes several minutes)...\n", dir)
	return build(ctx, moduleRoot(), dir, slices.Sorted(maps.Values(Binaries)), progress)
}

// BuildOlderControlPlane builds kube-apiserver, kube-controller-manager
// and kubelet of an older version (one of OlderVersions) into binDir(bin,
// version).
func BuildOlderControlPlane(ctx context.Context, bin, version string, progress io.Writer) error {
	if version == "" {
		return fmt.Errorf("building an older control plane: no version given (%s)", strings.Join(OlderVersions, ", "))
	}
	dir, err := binDir(bin, version)
	if err != nil {
		return err
	}
	fmt.Fprintf(progress, "building Kubernetes %s's kube-apiserver, kube-controller-manager and kubelet into %s (the first time takes several minutes)...\n", version, dir)
	pkgs := make([]string, len(olderBinaries))
	for i, name := range olderBinaries {
		pkgs[i] = Binaries[name]
	}
	return build(ctx, filepath.Join(moduleRoot(), "test", "compat", "k8s-"+version), dir, pkgs, progress)
}

// build builds packages of the module in mod into dir, with the version
// ldflags Kubernetes' own build sets (k8s.io/component-base/version), so
// that they report the version the module requires, not v0.0.0-master.
func build(ctx context.Context, mod, dir string, pkgs []string, progress io.Writer) error {
	start := time.Now()
	version, err := moduleVersion(mod)
	if err != nil {
		return err
	}
	if dir, err = filepath.Abs(dir); err != nil { // the build runs in mod
		return err
	}
	major, minor, _ := strings.Cut(strings.TrimPrefix(version, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	const pkg = "k8s.io/component-base/version."
	ldflags := fmt.Sprintf("-X %sgitVersion=%s -X %sgitMajor=%s -X %sgitMinor=%s -X %sgitTreeState=clean -X %sbuildDate=1970-01-01T00:00:00Z",
		pkg, version, pkg, major, pkg, minor, pkg, pkg)
	args := append([]string{"build", "-ldflags", ldflags, "-o", dir + string(os.PathSeparator)}, pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = mod
	cmd.Stdout, cmd.Stderr = progress, progress
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("building the control plane in %s (go %v): %w", mod, args, err)
	}
	fmt.Fprintf(progress, "built in %s\n", time.Since(start).Round(time.Second))
	return nil
}

// moduleVersion is the k8s.io/kubernetes version the module in mod requires.
func moduleVersion(mod string) (string, error) {
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "k8s.io/kubernetes")
	cmd.Dir = mod
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("reading the Kubernetes version from %s/go.mod: %w", mod, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// moduleRoot is the module's directory: where `go env GOMOD` points.
func moduleRoot() string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || len(out) < 2 {
		return "."
	}
	return filepath.Dir(string(out[:len(out)-1]))
}

// proc is a control-plane process.
type proc struct {
	name string
	bin  string
	args []string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *proc) start() error {
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = childAttr()
	if err := p.cmd.Start(); err != nil {
		_ = logf.Close()
		return fmt.Errorf("starting %s: %w", p.name, err)
	}
	p.done = make(chan struct{})
	go func() {
		_ = p.cmd.Wait()
		_ = logf.Close()
		close(p.done)
	}()
	return nil
}

// stop sends SIGTERM and, after 10 s, SIGKILL.
func (p *proc) stop() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// freePort finds a free loopback port below the kernel's ephemeral range
// (Linux's default starts at 32768): a port the kernel picks for us is one
// it may hand out again to any process's outgoing connection before our
// server binds it — with several clusters side by side (make soak
// PARALLEL=4) one kube-apiserver failed "address already in use" that way.
func freePort() (int, error) {
	const low, high = 20000, 32768
	var err error
	for range 100 {
		var l net.Listener
		if l, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", low+mrand.IntN(high-low))); err == nil {
			port := l.Addr().(*net.TCPAddr).Port
			return port, l.Close()
		}
	}
	return 0, fmt.Errorf("no free loopback port in [%d, %d): %w", low, high, err)
}

// controlPlane is etcd, kube-apiserver and kube-controller-manager.
type controlPlane struct {
	etcd, apiserver, kcm *proc
	config               *rest.Config
	kubeconfig           string
}

const adminToken = "dynamig-local-admin"

// startControlPlane starts etcd from bin and kube-apiserver and
// kube-controller-manager from k8sBin.
func startControlPlane(ctx context.Context, dir, bin, k8sBin string) (*controlPlane, error) {
	var ports []int
	for len(ports) < 4 {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		if !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	cp := &controlPlane{}
	cp.etcd = &proc{name: "etcd", bin: filepath.Join(bin, "server"), log: filepath.Join(dir, "etcd.log"), args: []string{
		"--name=default", "--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + etcdURL, "--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=default=" + peerURL, "--log-level=warn",
	}}
	if err := cp.etcd.start(); err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, cp.etcd, etcdURL+"/health"); err != nil {
		cp.stop()
		return nil, err
	}

	saKey := filepath.Join(dir, "sa.key")
	tokens := filepath.Join(dir, "tokens.csv")
	if err := writeKey(saKey); err != nil {
		return nil, err
	}
	if err := os.WriteFile(tokens, []byte(adminToken+",admin,admin,system:masters\n"), 0o600); err != nil {
		return nil, err
	}
	cp.apiserver = &proc{name: "kube-apiserver", bin: filepath.Join(k8sBin, "kube-apiserver"), log: filepath.Join(dir, "kube-apiserver.log"), args: []string{
		"--etcd-servers=" + etcdURL, "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", ports[2]), "--cert-dir=" + filepath.Join(dir, "certs"),
		"--service-account-issuer=https://kubernetes.default.svc", "--service-account-key-file=" + saKey,
		"--service-account-signing-key-file=" + saKey, "--token-auth-file=" + tokens,
		"--authorization-mode=RBAC", "--allow-privileged=true",
		"--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
		"--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
	}}
	cp.config = &rest.Config{
		Host: fmt.Sprintf("https://127.0.0.1:%d", ports[2]), BearerToken: adminToken,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 500, Burst: 1000,
	}
	if err := cp.startAPIServer(ctx); err != nil {
		cp.stop()
		return nil, err
	}
	cp.kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := writeKubeconfig(cp.kubeconfig, cp.config); err != nil {
		cp.stop()
		return nil, err
	}
	cp.kcm = &proc{name: "kube-controller-manager", bin: filepath.Join(k8sBin, "kube-controller-manager"), log: filepath.Join(dir, "kube-controller-manager.log"), args: []string{
		"--kubeconfig=" + cp.kubeconfig, "--authentication-kubeconfig=" + cp.kubeconfig, "--authorization-kubeconfig=" + cp.kubeconfig,
		"--controllers=deployment-controller,replicaset-controller,garbage-collector-controller",
		"--leader-elect=false", "--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", ports[3]),
	}}
	if err := cp.kcm.start(); err != nil {
		cp.stop()
		return nil, err
	}
	return cp, nil
}

// startAPIServer starts (or restarts) kube-apiserver and waits until it is ready.
func (cp *controlPlane) startAPIServer(ctx context.Context) error {
	if err := cp.apiserver.start(); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cp.config)
	if err != nil {
		return err
	}
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		if cp.apiserver.exited() {
			return false, fmt.Errorf("kube-apiserver exited; see %s", cp.apiserver.log)
		}
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver did not become ready: %w", err)
	}
	return nil
}

func (cp *controlPlane) stop() {
	for _, p := range []*proc{cp.kcm, cp.apiserver, cp.etcd} {
		if p != nil {
			p.stop()
		}
	}
}

func waitHTTP(ctx context.Context, p *proc, url string) error {
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		if p.exited() {
			return false, fmt.Errorf("%s exited; see %s", p.name, p.log)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, nil
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return fmt.Errorf("%s did not become healthy: %w", p.name, err)
	}
	return nil
}

func writeKey(path string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
}

func writeKubeconfig(path string, cfg *rest.Config) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["dynamig-local"] = &clientcmdapi.Cluster{Server: cfg.Host, InsecureSkipTLSVerify: true}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: cfg.BearerToken}
	kc.Contexts["dynamig-local"] = &clientcmdapi.Context{Cluster: "dynamig-local", AuthInfo: "admin"}
	kc.CurrentContext = "dynamig-local"
	return clientcmd.WriteToFile(*kc, path)
}
