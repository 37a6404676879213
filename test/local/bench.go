package local

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/dynamig/dynamig/manifests"
	"github.com/dynamig/dynamig/test/nodesim"
)

// BenchOptions size the latency benchmark.
type BenchOptions struct {
	Nodes, GPUsPerNode, Pods, CPUPods int
	Seed                              uint64
	// Only, if not empty, names the runs to make as plugin/hardware
	// ("agent/realistic"); the throughput comparison runs with
	// nvidia/instant.
	Only []string
	// Dir, if set, keeps each run's cluster (logs included) in
	// Dir/<plugin>-<hardware> (use a new Dir: etcd data is not cleared).
	Dir string
}

// benchMode is how fast the simulated hardware is.
type benchMode struct {
	name                          string
	devicePluginDelay, sliceDelay time.Duration
}

// benchProfiles are the profiles of the burst, weighted by repetition.
var benchProfiles = []string{"1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "2g.20gb", "2g.20gb", "3g.40gb", "3g.40gb", "4g.40gb", "7g.80gb"}

// Bench measures, on local clusters of Nodes × GPUsPerNode A100-80GB, the
// time from creating a burst of Pods MIG pods of mixed profiles to each
// being bound and Running — in each device-plugin mode (NVIDIA's plugin,
// restarted by the agent; the agent's own), with instant NVML and
// device-plugin restarts, then with realistic delays (1 s per slice
// created, 10 s per device-plugin restart) — and the scheduler's
// throughput for CPUPods non-GPU pods with and without DynamicMIG. It
// prints a table.
func Bench(ctx context.Context, o BenchOptions, out io.Writer) error {
	fmt.Fprintf(out, "burst of %d MIG pods (mixed profiles, seed %d) on %d nodes × %d A100-80GB\n\n", o.Pods, o.Seed, o.Nodes, o.GPUsPerNode)
	fmt.Fprintf(out, "%-7s %-10s %-8s %8s %8s %8s %8s\n", "plugin", "hardware", "to", "p50", "p95", "p99", "max")
	var throughput string
	ran := 0
	for _, plugin := range []string{DevicePluginNVIDIA, DevicePluginAgent} {
		for i, mode := range []benchMode{{"instant", 0, 0}, {"realistic", 10 * time.Second, time.Second}} {
			if len(o.Only) > 0 && !slices.Contains(o.Only, plugin+"/"+mode.name) {
				continue
			}
			ran++
			dir := ""
			if o.Dir != "" {
				dir = filepath.Join(o.Dir, plugin+"-"+mode.name)
			}
			c, err := Start(ctx, Options{Dir: dir, DevicePluginDelay: mode.devicePluginDelay, SliceDelay: mode.sliceDelay, DevicePluginTimeout: 5 * time.Minute, DevicePlugin: plugin})
			if err != nil {
				return err
			}
			err = benchBurst(ctx, c, o, plugin, mode, out)
			if err == nil && i == 0 && plugin == DevicePluginNVIDIA && o.CPUPods > 0 {
				throughput, err = benchThroughput(ctx, c, o)
			}
			c.Stop()
			if err != nil {
				return err
			}
		}
	}
	if ran == 0 {
		return fmt.Errorf("no benchmark run is named %q: they are nvidia/instant, nvidia/realistic, agent/instant and agent/realistic", o.Only)
	}
	fmt.Fprint(out, throughput)
	return nil
}

// podTimes records when each pod of a namespace was bound and Running.
type podTimes struct {
	mu             sync.Mutex
	bound, running map[string]time.Time
}

func watchPods(ctx context.Context, kube kubernetes.Interface, ns string) *podTimes {
	pt := &podTimes{bound: map[string]time.Time{}, running: map[string]time.Time{}}
	f := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(ns))
	record := func(obj any) {
		p, ok := obj.(*v1.Pod)
		if !ok {
			return
		}
		now := time.Now()
		pt.mu.Lock()
		defer pt.mu.Unlock()
		if _, seen := pt.bound[p.Name]; !seen && p.Spec.NodeName != "" {
			pt.bound[p.Name] = now
		}
		if _, seen := pt.running[p.Name]; !seen && p.Status.Phase == v1.PodRunning {
			pt.running[p.Name] = now
		}
	}
	_, _ = f.Core().V1().Pods().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: record, UpdateFunc: func(_, obj any) { record(obj) }})
	f.Start(ctx.Done())
	f.WaitForCacheSync(ctx.Done())
	return pt
}

func (pt *podTimes) count(running bool) int {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	if running {
		return len(pt.running)
	}
	return len(pt.bound)
}

func benchBurst(ctx context.Context, c *Cluster, o BenchOptions, plugin string, mode benchMode, out io.Writer) error {
	for i := range o.Nodes {
		models := make([]string, o.GPUsPerNode)
		for g := range models {
			models[g] = "A100-80GB"
		}
		if _, err := c.AddSimNode(nodesim.Options{Name: fmt.Sprintf("bench-%02d", i), Models: models}); err != nil {
			return err
		}
	}
	for i := range o.Nodes {
		if err := waitReported(ctx, c, fmt.Sprintf("bench-%02d", i)); err != nil {
			return err
		}
	}
	const ns = "bench"
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pt := watchPods(ctx, c.Kube, ns)
	r := rand.New(rand.NewPCG(o.Seed, 1))
	created := map[string]time.Time{}
	for i := range o.Pods {
		prof := benchProfiles[r.IntN(len(benchProfiles))]
		p := Pod(fmt.Sprintf("mig-%03d", i), map[string]int64{"nvidia.com/mig-" + prof: 1})
		p.Namespace = ns
		created[p.Name] = time.Now()
		if _, err := c.Kube.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 15*time.Minute, true, func(context.Context) (bool, error) {
		return pt.count(true) == o.Pods, nil
	})
	if err != nil {
		return fmt.Errorf("%s, %s: %d of %d pods running after 15 minutes", plugin, mode.name, pt.count(true), o.Pods)
	}
	pt.mu.Lock()
	defer pt.mu.Unlock()
	for _, phase := range []struct {
		name  string
		times map[string]time.Time
	}{{"bound", pt.bound}, {"running", pt.running}} {
		var d []time.Duration
		for name, t := range phase.times {
			d = append(d, t.Sub(created[name]))
		}
		slices.Sort(d)
		fmt.Fprintf(out, "%-7s %-10s %-8s %8s %8s %8s %8s\n", plugin, mode.name, phase.name, q(d, 0.50), q(d, 0.95), q(d, 0.99), q(d, 1))
	}
	return nil
}

// q is the nearest-rank quantile of sorted durations, in seconds.
func q(sorted []time.Duration, p float64) string {
	i := int(float64(len(sorted))*p+0.999999) - 1
	i = max(0, min(i, len(sorted)-1))
	return fmt.Sprintf("%.2fs", sorted[i].Seconds())
}

// benchThroughput binds CPUPods pending non-GPU pods with the shipped
// profile, then with the same profile without DynamicMIG, and says pods/s
// from the scheduler's start to the last bind (its start, a fraction of a
// second, is counted in both).
func benchThroughput(ctx context.Context, c *Cluster, o BenchOptions) (string, error) {
	without, err := withoutDynamicMIG(manifests.SchedulerConfig)
	if err != nil {
		return "", err
	}
	rates := map[string]float64{}
	for _, run := range []struct {
		name   string
		config []byte
	}{{"with DynamicMIG", manifests.SchedulerConfig}, {"without", without}} {
		// Pods first, scheduler second: the rate is the scheduler's, not
		// the client's creating them.
		c.StopScheduler()
		ns := fmt.Sprintf("cpu-%d", len(rates))
		if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return "", err
		}
		wctx, cancel := context.WithCancel(ctx)
		pt := watchPods(wctx, c.Kube, ns)
		for i := range o.CPUPods {
			p := Pod(fmt.Sprintf("cpu-%04d", i), nil)
			p.Namespace = ns
			p.Spec.Containers[0].Resources.Requests = v1.ResourceList{v1.ResourceCPU: resource.MustParse("10m")}
			if _, err := c.Kube.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
				cancel()
				return "", err
			}
		}
		start := time.Now()
		if err := c.StartSchedulerWithConfig(run.config); err != nil {
			cancel()
			return "", fmt.Errorf("scheduler %s: %w", run.name, err)
		}
		err := wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, 10*time.Minute, true, func(context.Context) (bool, error) {
			return pt.count(false) == o.CPUPods, nil
		})
		took := time.Since(start)
		cancel()
		if err != nil {
			return "", fmt.Errorf("non-GPU pods %s: %d of %d bound", run.name, pt.count(false), o.CPUPods)
		}
		rates[run.name] = float64(o.CPUPods) / took.Seconds()
	}
	return fmt.Sprintf("\nnon-GPU pods (%d pending, from scheduler start to all bound): with DynamicMIG %.0f pods/s, without %.0f pods/s: %.0f %%\n",
		o.CPUPods, rates["with DynamicMIG"], rates["without"], 100*rates["with DynamicMIG"]/rates["without"]), nil
}

// withoutDynamicMIG is the shipped configuration with the plugin taken out
// of every extension point and its arguments removed.
func withoutDynamicMIG(config []byte) ([]byte, error) {
	out := config
	for _, cut := range []string{
		"    preFilter:\n      enabled:\n      - name: DynamicMIG\n",
		"      - name: DynamicMIG\n      - name: NodeUnschedulable\n",
		"    postFilter:\n      enabled:\n      - name: DynamicMIG\n",
	} {
		if !bytes.Contains(out, []byte(cut)) {
			return nil, fmt.Errorf("the shipped scheduler configuration changed: no %q", cut)
		}
		replacement := ""
		if bytes.HasPrefix([]byte(cut), []byte("      - name: DynamicMIG\n      - name: NodeUnschedulable")) {
			replacement = "      - name: NodeUnschedulable\n"
		}
		out = bytes.Replace(out, []byte(cut), []byte(replacement), 1)
	}
	i := bytes.Index(out, []byte("  pluginConfig:\n"))
	if i < 0 {
		return nil, fmt.Errorf("the shipped scheduler configuration changed: no pluginConfig")
	}
	return out[:i], nil
}
