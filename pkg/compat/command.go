package compat

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

// Timeout bounds how long the scheduler keeps asking an API server that
// does not answer, or lacks an API that may yet come (the CRDs), before it
// exits with the reason.
const Timeout = 2 * time.Minute

// Wrap makes the kube-scheduler command check the API server before it
// starts the scheduler (CheckAndApply): it reaches the server as the
// scheduler will (--config's clientConnection.kubeconfig, else
// --kubeconfig; --master; else in-cluster), keeps the feature gates set
// with --feature-gates, and on failure says why in an Event on its own
// pod (POD_NAMESPACE and POD_NAME from the downward API) as well as in
// its error.
func Wrap(cmd *cobra.Command) {
	run := cmd.RunE
	cmd.RunE = func(c *cobra.Command, args []string) error {
		if f := c.Flags().Lookup("version"); f != nil && f.Changed {
			return run(c, args)
		}
		ctx := c.Context()
		if ctx == nil {
			ctx = context.Background()
		}
		cfg, err := restConfig(c)
		if err != nil {
			return err
		}
		if err := FitToServer(ctx, cfg, userGates(c)); err != nil {
			reportOnPod(ctx, cfg, err)
			return err
		}
		return run(c, args)
	}
}

// FitToServer checks the server behind cfg and switches off the feature
// gates of the process whose APIs it does not serve, except those in set.
func FitToServer(ctx context.Context, cfg *rest.Config, set map[string]bool) error {
	d, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	r, err := CheckAndApply(ctx, d, utilfeature.DefaultMutableFeatureGate, set, Timeout)
	if err == nil {
		klog.FromContext(ctx).Info("API server checked", "apiServer", r.Server, "gatesOff", len(r.Off))
	}
	return err
}

func restConfig(c *cobra.Command) (*rest.Config, error) {
	flag := func(name string) string {
		if f := c.Flags().Lookup(name); f != nil {
			return f.Value.String()
		}
		return ""
	}
	kubeconfig := flag("kubeconfig")
	if file := flag("config"); file != "" {
		cfg, err := options.LoadConfigFromFile(klog.Background(), file)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", file, err)
		}
		kubeconfig = cfg.ClientConnection.Kubeconfig
	}
	return clientcmd.BuildConfigFromFlags(flag("master"), kubeconfig)
}

// userGates names the gates set with --feature-gates ("A=true,B=false",
// a component prefix such as "kube:" allowed).
func userGates(c *cobra.Command) map[string]bool {
	set := map[string]bool{}
	f := c.Flags().Lookup("feature-gates")
	if f == nil || !f.Changed {
		return set
	}
	for _, kv := range strings.Split(f.Value.String(), ",") {
		name, _, _ := strings.Cut(strings.TrimSpace(kv), "=")
		if i := strings.LastIndex(name, ":"); i >= 0 {
			name = name[i+1:]
		}
		if name != "" {
			set[name] = true
		}
	}
	return set
}

// reportOnPod records why the scheduler cannot start as a Warning Event
// on its pod, where kubectl describe shows it; best effort.
func reportOnPod(ctx context.Context, cfg *rest.Config, cause error) {
	ns, name := os.Getenv("POD_NAMESPACE"), os.Getenv("POD_NAME")
	if ns == "" || name == "" {
		return
	}
	logger := klog.FromContext(ctx)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pod, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		logger.Error(err, "Could not report on the scheduler's pod")
		return
	}
	now := metav1.Now()
	_, err = cs.CoreV1().Events(ns).Create(ctx, &v1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: name + "."},
		InvolvedObject: v1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: ns, Name: name, UID: pod.UID},
		Type:           v1.EventTypeWarning, Reason: "UnsupportedAPIServer", Message: cause.Error(),
		Source:         v1.EventSource{Component: "dynamig-scheduler"},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}, metav1.CreateOptions{})
	if err != nil {
		logger.Error(err, "Could not report on the scheduler's pod")
	}
}
