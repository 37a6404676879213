package local

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/dynamig/dynamig/manifests"
	"github.com/dynamig/dynamig/pkg/client"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

// ScaleOptions size a scale run (Scale).
type ScaleOptions struct {
	Nodes, GPUsPerNode, Pods int
	// CPUPods and Pairs size the non-GPU throughput comparison: Pairs
	// alternating runs with and without DynamicMIG, of CPUPods pods each
	// (0: skipped).
	CPUPods, Pairs int
	Seed           uint64
	// ApplyDelay is how long the node model takes to apply a new spec
	// (0: at once, instant hardware).
	ApplyDelay time.Duration
	// SteadyRate, if not 0, adds a steady phase after the burst:
	// SteadyPods more MIG pods (0: as many as Pods), each asking for a
	// whole GPU as one slice (7g.80gb), created SteadyRate a second, so
	// that each gets a plan of its own (PostFilter latency over about as
	// many plans as pods).
	SteadyRate float64
	SteadyPods int
	// Dir keeps the cluster's files and logs (use a new one); a temporary
	// directory, removed at the end, if empty.
	Dir string
	// Stall ends a wait for binds after this long without one: the pods
	// left are reported unserved, with the scheduler's reason.
	Stall time.Duration
	// Progress receives what the run is doing.
	Progress io.Writer
}

// ScaleResult is what a scale run measured, one field per measure.
type ScaleResult struct {
	Nodes int `json:"nodes"`
	GPUs  int `json:"gpus"`
	// Pods is the burst's MIG pods, the pod that only the last node may
	// take included; Bound of them were bound.
	Pods  int `json:"pods"`
	Bound int `json:"bound"`
	// BurstBoundSeconds is from the first pod's creation to the last bind.
	BurstBoundSeconds float64 `json:"burstBoundSeconds"`
	// Plans is the plans DynamicMIG computed (every result), PlansPerPod
	// per burst pod; the PostFilter quantiles are over them, from the
	// scheduler's histogram (dynamig_scheduler_plan_duration_seconds,
	// interpolated within its buckets); the Publish quantiles are of the
	// part of it spent writing NodePartition specs
	// (dynamig_scheduler_plan_publish_duration_seconds).
	Plans           int     `json:"plans"`
	PlansPerPod     float64 `json:"plansPerPod"`
	PostFilterP50Ms float64 `json:"postFilterP50Ms"`
	PostFilterP99Ms float64 `json:"postFilterP99Ms"`
	PublishP50Ms    float64 `json:"publishP50Ms"`
	PublishP99Ms    float64 `json:"publishP99Ms"`
	// SteadyPlans and the SteadyPostFilter quantiles are those of the
	// steady phase (SteadyRate): SteadyPods more pods, created one by
	// one, each needing a new layout.
	SteadyPlans int `json:"steadyPlans,omitempty"`
	// SteadyConflicts is how many of them a NodePartition write changed
	// under (result conflict): their pods were planned again.
	SteadyConflicts       int     `json:"steadyConflicts,omitempty"`
	SteadyPostFilterP50Ms float64 `json:"steadyPostFilterP50Ms,omitempty"`
	SteadyPostFilterP99Ms float64 `json:"steadyPostFilterP99Ms,omitempty"`
	SteadyPublishP50Ms    float64 `json:"steadyPublishP50Ms,omitempty"`
	SteadyPublishP99Ms    float64 `json:"steadyPublishP99Ms,omitempty"`
	// SteadyThrottleP99Ms is the p99 of the time the scheduler's requests
	// waited for its client's rate limiter in the steady phase
	// (rest_client_rate_limiter_duration_seconds, every verb).
	SteadyThrottleP99Ms float64 `json:"steadyThrottleP99Ms,omitempty"`
	// SteadyAPIServerPutMeanMs and P99Ms are kube-apiserver's own latency
	// for NodePartition spec writes in the steady phase
	// (apiserver_request_duration_seconds, resource nodepartitions, verb
	// PUT, no subresource), to tell the server's share of a write from
	// the scheduler's: the mean, as its buckets (5, 25, 50, 100, 200,
	// 400 ms …) are too coarse for a p50.
	SteadyAPIServerPutMeanMs float64 `json:"steadyAPIServerPutMeanMs,omitempty"`
	SteadyAPIServerPutP99Ms  float64 `json:"steadyAPIServerPutP99Ms,omitempty"`
	// SteadyCPUSeconds is the CPU time each process used in the steady
	// phase (scheduler, kube-apiserver, etcd, kube-controller-manager and
	// the harness with its node model), SteadySeconds the phase's length:
	// on a machine of few cores they share, this says who was busy.
	SteadyCPUSeconds map[string]float64 `json:"steadyCPUSeconds,omitempty"`
	SteadySeconds    float64            `json:"steadySeconds,omitempty"`
	// SchedulerPeakRSSMiB is the scheduler process's peak resident memory (VmHWM).
	SchedulerPeakRSSMiB float64 `json:"schedulerPeakRSSMiB"`
	// APIRequestsPerPod is the scheduler's API requests during the burst
	// (rest_client_requests_total) per burst pod bound.
	APIRequestsPerPod float64 `json:"apiRequestsPerPod"`
	// LastNodeServed: the pod that only the last node may take was bound there.
	LastNodeServed bool `json:"lastNodeServed"`
	// NonGPUWith and NonGPUWithout are pods/s of each paired run, from the
	// first bind to the last; NonGPURatio is the median of the pairs'
	// ratios, NonGPURatioMin and Max their spread.
	NonGPUWith     []float64 `json:"nonGPUPodsPerSecondWith,omitempty"`
	NonGPUWithout  []float64 `json:"nonGPUPodsPerSecondWithout,omitempty"`
	NonGPURatio    float64   `json:"nonGPUThroughputRatio,omitempty"`
	NonGPURatioMin float64   `json:"nonGPUThroughputRatioMin,omitempty"`
	NonGPURatioMax float64   `json:"nonGPUThroughputRatioMax,omitempty"`
	// Unserved names the burst pods not bound, with the scheduler's reason.
	Unserved []string `json:"unserved,omitempty"`
	// ModelViolations is what the node model saw go wrong (a pod that
	// failed admission, a plan refused): none in a correct run.
	ModelViolations []string `json:"modelViolations,omitempty"`
}

// scaleModels are the GPU models of a scale run, one per node.
var scaleModels = []string{"A100-80GB", "H100-80GB"}

// lastNodeLabel marks the last node; one burst pod selects it.
const lastNodeLabel = "scale.dynamig.io/last"

// Scale measures dynamig-scheduler on a large cluster: real etcd,
// kube-apiserver and the dynamig-scheduler binary (built from
// cmd/scheduler) with the shipped configuration — its client settings
// and leader election included — against Nodes light nodes (scaleModel)
// of GPUsPerNode GPUs, A100-80GB and H100-80GB mixed, 60 % of the GPUs
// partitioned and half their slices used. It creates a burst of Pods MIG
// pods of mixed profiles (plus one only the last node may take) and waits
// until all are bound or none was bound for Stall.
func Scale(ctx context.Context, o ScaleOptions) (*ScaleResult, error) {
	if o.Nodes < 1 || o.GPUsPerNode < 1 || o.Pods < 0 {
		return nil, fmt.Errorf("scale: want at least 1 node and 1 GPU per node and no negative pods; got %d nodes, %d GPUs per node, %d pods", o.Nodes, o.GPUsPerNode, o.Pods)
	}
	if o.Stall == 0 {
		o.Stall = time.Minute
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	dir := o.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "dynamig-scale-")
		if err != nil {
			return nil, err
		}
		defer func() { _ = os.RemoveAll(d) }()
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	bin := filepath.Join(moduleRoot(), "bin")
	if err := EnsureBinaries(ctx, bin, "", o.Progress); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Progress, "building dynamig-scheduler into %s\n", bin)
	build := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(bin, "dynamig-scheduler"), "./cmd/scheduler")
	build.Dir, build.Stdout, build.Stderr = moduleRoot(), o.Progress, o.Progress
	if err := build.Run(); err != nil {
		return nil, fmt.Errorf("building dynamig-scheduler: %w", err)
	}
	k8sBin, err := binDir(bin, "")
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Progress, "starting etcd and kube-apiserver (logs in %s)\n", dir)
	cp, err := startControlPlane(ctx, dir, bin, k8sBin)
	if err != nil {
		return nil, err
	}
	defer cp.stop()
	// The harness's own client (the node model, the pods) is not the
	// scheduler's: generous, so that it does not hold the run back.
	cfg := rest.CopyConfig(cp.config)
	cfg.QPS, cfg.Burst = 2000, 4000
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	dyn, err := client.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := InstallCRDs(ctx, cfg); err != nil {
		return nil, err
	}
	for _, ns := range []string{"dynamig-system", "scale"} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}

	var models []*mig.Model
	for _, name := range scaleModels {
		m, err := mig.ModelByName(name)
		if err != nil {
			return nil, err
		}
		models = append(models, m)
	}
	snap := planner.Random(rand.New(rand.NewPCG(o.Seed, 13)), planner.RandomOptions{
		Nodes: o.Nodes, GPUsPerNode: o.GPUsPerNode, Models: models, Pods: o.Pods, Partitioned: 0.6, Used: 0.5,
	})
	last := snap.Nodes[len(snap.Nodes)-1]
	start := time.Now()
	fmt.Fprintf(o.Progress, "creating %d nodes and their NodePartitions\n", o.Nodes)
	mctx, stopModel := context.WithCancel(ctx)
	defer stopModel()
	m, err := newScaleModel(mctx, kube, dyn, snap, map[string]map[string]string{last.Name: {lastNodeLabel: "true"}}, o.ApplyDelay, 32)
	if err != nil {
		return nil, err
	}
	if err := m.start(mctx); err != nil {
		return nil, err
	}
	modelDone := make(chan struct{})
	go func() { m.run(mctx, 8); close(modelDone) }()
	defer func() { stopModel(); <-modelDone }()
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Minute, true, func(context.Context) (bool, error) {
		return m.settled(), nil
	}); err != nil {
		return nil, fmt.Errorf("the node model did not start the %d pods holding used slices: %w", m.holders, err)
	}
	fmt.Fprintf(o.Progress, "cluster ready in %s\n", time.Since(start).Round(time.Second))

	res := &ScaleResult{Nodes: o.Nodes, GPUs: o.Nodes * o.GPUsPerNode}
	sched, err := startSchedulerProc(ctx, dir, cp, manifests.SchedulerConfig, "burst")
	if err != nil {
		return nil, err
	}
	defer sched.stop()
	before, err := sched.metrics(ctx)
	if err != nil {
		return nil, err
	}

	pods := burstPods(snap, last, "burst")
	res.Pods = len(pods)
	fmt.Fprintf(o.Progress, "creating a burst of %d MIG pods\n", len(pods))
	bound, took, err := createAndBind(ctx, kube, pods, 0, o.Stall)
	if err != nil {
		return nil, err
	}
	res.Bound, res.BurstBoundSeconds = bound, took.Seconds()
	after, err := sched.metrics(ctx)
	if err != nil {
		return nil, err
	}
	res.measure(before, after)
	if o.SteadyPods == 0 {
		o.SteadyPods = o.Pods
	}
	if o.SteadyRate > 0 && o.SteadyPods > 0 {
		// Pods that ask for a whole GPU as one slice (7g.80gb, which both
		// models offer), one by one: no free slice serves one, so each
		// gets a plan of its own — PostFilter over as many plans as pods.
		var steady []*v1.Pod
		for i := range o.SteadyPods {
			p := Pod(fmt.Sprintf("steady-%05d", i), map[string]int64{"nvidia.com/mig-7g.80gb": 1})
			p.Namespace = "scale"
			steady = append(steady, p)
		}
		fmt.Fprintf(o.Progress, "creating %d more MIG pods, %g a second\n", len(steady), o.SteadyRate)
		procs := map[string]*proc{"scheduler": sched.proc, "kube-apiserver": cp.apiserver, "etcd": cp.etcd, "kube-controller-manager": cp.kcm}
		cpuBefore, err := cpuTimes(procs)
		if err != nil {
			return nil, err
		}
		serverBefore, err := apiserverMetrics(ctx, kube)
		if err != nil {
			return nil, err
		}
		steadyStart := time.Now()
		if _, _, err := createAndBind(ctx, kube, steady, o.SteadyRate, o.Stall); err != nil {
			return nil, err
		}
		res.SteadySeconds = time.Since(steadyStart).Seconds()
		if res.SteadyCPUSeconds, err = cpuTimes(procs); err != nil {
			return nil, err
		}
		for name, t := range cpuBefore {
			res.SteadyCPUSeconds[name] -= t
		}
		serverAfter, err := apiserverMetrics(ctx, kube)
		if err != nil {
			return nil, err
		}
		putsBefore, err := nodePartitionPuts(serverBefore)
		if err != nil {
			return nil, err
		}
		putsAfter, err := nodePartitionPuts(serverAfter)
		if err != nil {
			return nil, err
		}
		puts := histogramDelta(putsBefore, putsAfter)
		res.SteadyAPIServerPutMeanMs, res.SteadyAPIServerPutP99Ms = 1000*puts.mean(), 1000*puts.quantile(0.99)
		end, err := sched.metrics(ctx)
		if err != nil {
			return nil, err
		}
		res.SteadyPlans, res.SteadyPostFilterP50Ms, res.SteadyPostFilterP99Ms, res.SteadyPublishP50Ms, res.SteadyPublishP99Ms = plans(after, end)
		res.SteadyConflicts = int(conflicts(end) - conflicts(after))
		throttle := histogramDelta(after["rest_client_rate_limiter_duration_seconds"], end["rest_client_rate_limiter_duration_seconds"])
		res.SteadyThrottleP99Ms = 1000 * throttle.quantile(0.99)
		pods = append(pods, steady...)
	}
	res.SchedulerPeakRSSMiB = sched.peakRSS()
	for _, p := range pods {
		got, err := kube.CoreV1().Pods("scale").Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		if got.Spec.NodeName == "" {
			res.Unserved = append(res.Unserved, p.Name+": "+unschedulableReason(got))
		}
		if p.Spec.NodeSelector[lastNodeLabel] != "" {
			res.LastNodeServed = got.Spec.NodeName == last.Name
		}
	}
	sched.stop()

	if o.Pairs > 0 && o.CPUPods > 0 {
		if err := res.throughput(ctx, kube, dir, cp, o); err != nil {
			return nil, err
		}
	}
	res.ModelViolations = m.Violations()
	return res, nil
}

// burstPods are the snapshot's pods as MIG pods of the scale namespace,
// named with prefix, and one pod that only the last node may take, asking
// for its model's smallest profile.
func burstPods(snap *planner.Snapshot, last planner.Node, prefix string) []*v1.Pod {
	var pods []*v1.Pod
	for _, sp := range snap.Pods {
		req := map[string]int64{}
		for prof, n := range sp.Requests {
			req[prof.ResourceName()] = int64(n)
		}
		p := Pod(prefix+"-"+sp.Name, req)
		p.Namespace = "scale"
		pods = append(pods, p)
	}
	p := Pod(prefix+"-last-node", map[string]int64{last.GPUs[0].Model.Profiles[0].Name.ResourceName(): 1})
	p.Namespace = "scale"
	p.Spec.NodeSelector = map[string]string{lastNodeLabel: "true"}
	return append(pods, p)
}

// createAndBind creates the pods, rate a second (0: all at once), and
// waits until they are bound or none was for stall: how many were, and
// the time from the first creation to the last bind.
func createAndBind(ctx context.Context, kube kubernetes.Interface, pods []*v1.Pod, rate float64, stall time.Duration) (int, time.Duration, error) {
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	pt := watchPods(wctx, kube, pods[0].Namespace)
	created := time.Now()
	workers, every := 16, time.Duration(0)
	if rate > 0 {
		workers, every = 1, time.Duration(float64(time.Second)/rate)
	}
	if err := parallel(ctx, len(pods), workers, func(ctx context.Context, i int) error {
		if every > 0 {
			time.Sleep(time.Until(created.Add(time.Duration(i) * every)))
		}
		_, err := kube.CoreV1().Pods(pods[i].Namespace).Create(ctx, pods[i], metav1.CreateOptions{})
		return err
	}); err != nil {
		return 0, 0, err
	}
	lastBind := waitBound(ctx, pt, len(pods), stall)
	return pt.count(false), lastBind.Sub(created), nil
}

// waitBound waits until n pods are bound, or none was for stall, and
// returns when the last was.
func waitBound(ctx context.Context, pt *podTimes, n int, stall time.Duration) time.Time {
	seen, since := -1, time.Now()
	for ctx.Err() == nil {
		c := pt.count(false)
		if c == n {
			break
		}
		if c != seen {
			seen, since = c, time.Now()
		} else if time.Since(since) > stall {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	pt.mu.Lock()
	defer pt.mu.Unlock()
	var lastBind time.Time
	for _, t := range pt.bound {
		if t.After(lastBind) {
			lastBind = t
		}
	}
	return lastBind
}

// unschedulableReason is the pod's PodScheduled condition message.
func unschedulableReason(p *v1.Pod) string {
	for _, c := range p.Status.Conditions {
		if c.Type == v1.PodScheduled && c.Status == v1.ConditionFalse {
			return c.Message
		}
	}
	return "no scheduling attempt recorded"
}

// measure fills the plan count, PostFilter quantiles and API requests from
// the scheduler's metrics before and after the burst.
func (r *ScaleResult) measure(before, after map[string]*dto.MetricFamily) {
	r.Plans, r.PostFilterP50Ms, r.PostFilterP99Ms, r.PublishP50Ms, r.PublishP99Ms = plans(before, after)
	if r.Pods > 0 {
		r.PlansPerPod = float64(r.Plans) / float64(r.Pods)
	}
	if r.Bound > 0 {
		r.APIRequestsPerPod = (counterSum(after, "rest_client_requests_total") - counterSum(before, "rest_client_requests_total")) / float64(r.Bound)
	}
}

// plans is how many plans DynamicMIG made between two scrapes, their
// PostFilter p50 and p99, and those of the specs' writes, in milliseconds.
func plans(before, after map[string]*dto.MetricFamily) (n int, p50, p99, publishP50, publishP99 float64) {
	n = int(counterSum(after, "dynamig_scheduler_plans_total") - counterSum(before, "dynamig_scheduler_plans_total"))
	h := histogramDelta(before["dynamig_scheduler_plan_duration_seconds"], after["dynamig_scheduler_plan_duration_seconds"])
	w := histogramDelta(before["dynamig_scheduler_plan_publish_duration_seconds"], after["dynamig_scheduler_plan_publish_duration_seconds"])
	return n, 1000 * h.quantile(0.5), 1000 * h.quantile(0.99), 1000 * w.quantile(0.5), 1000 * w.quantile(0.99)
}

// throughput binds CPUPods pending non-GPU pods Pairs times with the
// shipped configuration and with the same without DynamicMIG, alternating
// which goes first; pods/s from the first bind to the last (the
// scheduler's start and informer sync are not counted).
func (r *ScaleResult) throughput(ctx context.Context, kube kubernetes.Interface, dir string, cp *controlPlane, o ScaleOptions) error {
	without, err := withoutDynamicMIG(manifests.SchedulerConfig)
	if err != nil {
		return err
	}
	var ratios []float64
	for pair := range o.Pairs {
		rates := map[bool]float64{}
		for _, with := range []bool{pair%2 == 0, pair%2 != 0} {
			config := without
			if with {
				config = manifests.SchedulerConfig
			}
			rate, err := cpuRun(ctx, kube, dir, cp, config, fmt.Sprintf("cpu-%d-%t", pair, with), o)
			if err != nil {
				return err
			}
			rates[with] = rate
			fmt.Fprintf(o.Progress, "non-GPU pair %d, DynamicMIG %t: %.0f pods/s\n", pair, with, rate)
		}
		r.NonGPUWith, r.NonGPUWithout = append(r.NonGPUWith, rates[true]), append(r.NonGPUWithout, rates[false])
		ratios = append(ratios, rates[true]/rates[false])
	}
	slices.Sort(ratios)
	r.NonGPURatio, r.NonGPURatioMin, r.NonGPURatioMax = ratios[len(ratios)/2], ratios[0], ratios[len(ratios)-1]
	if len(ratios)%2 == 0 {
		r.NonGPURatio = (ratios[len(ratios)/2-1] + ratios[len(ratios)/2]) / 2
	}
	return nil
}

// cpuRun creates o.CPUPods pending pods in namespace ns, starts a
// scheduler with config, measures pods/s from its first bind to its last,
// then stops it and deletes the pods.
func cpuRun(ctx context.Context, kube kubernetes.Interface, dir string, cp *controlPlane, config []byte, ns string, o ScaleOptions) (float64, error) {
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return 0, err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pt := watchPods(wctx, kube, ns)
	if err := parallel(ctx, o.CPUPods, 16, func(ctx context.Context, i int) error {
		p := Pod(fmt.Sprintf("cpu-%05d", i), nil)
		p.Namespace = ns
		p.Spec.Containers[0].Resources.Requests = v1.ResourceList{v1.ResourceCPU: resource.MustParse("10m")}
		_, err := kube.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
		return err
	}); err != nil {
		return 0, err
	}
	sched, err := startSchedulerProc(ctx, dir, cp, config, ns)
	if err != nil {
		return 0, err
	}
	lastBind := waitBound(ctx, pt, o.CPUPods, o.Stall)
	sched.stop()
	pt.mu.Lock()
	first, n := lastBind, len(pt.bound)
	for _, t := range pt.bound {
		if t.Before(first) {
			first = t
		}
	}
	pt.mu.Unlock()
	if n < o.CPUPods || n < 2 {
		return 0, fmt.Errorf("non-GPU run %s: %d of %d pods bound", ns, n, o.CPUPods)
	}
	zero := int64(0)
	if err := kube.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{}); err != nil {
		return 0, err
	}
	return float64(n-1) / lastBind.Sub(first).Seconds(), nil
}

// schedulerProc is a dynamig-scheduler process and where its metrics are.
type schedulerProc struct {
	*proc
	metricsURL string
}

// startSchedulerProc runs bin/dynamig-scheduler with config, completed
// with the kubeconfig (clientConnection.kubeconfig) and a lease of its
// own (tag), and waits until it leads and its informers are synced
// (/readyz).
func startSchedulerProc(ctx context.Context, dir string, cp *controlPlane, config []byte, tag string) (*schedulerProc, error) {
	if bytes.Contains(config, []byte("clientConnection:")) {
		return nil, fmt.Errorf("the scheduler configuration sets clientConnection: the scale run cannot add its kubeconfig")
	}
	config = bytes.Replace(config, []byte("resourceName: dynamig-scheduler\n"), []byte("resourceName: dynamig-scheduler-"+tag+"\n"), 1)
	config = append(slices.Clone(config), []byte("clientConnection:\n  kubeconfig: "+cp.kubeconfig+"\n")...)
	file := filepath.Join(dir, "scheduler-"+tag+".yaml")
	if err := os.WriteFile(file, config, 0o644); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &schedulerProc{
		proc: &proc{name: "dynamig-scheduler", bin: filepath.Join(moduleRoot(), "bin", "dynamig-scheduler"), log: filepath.Join(dir, "scheduler-"+tag+".log"), args: []string{
			"--config=" + file, "--v=2", "--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", port),
			"--authentication-kubeconfig=" + cp.kubeconfig, "--authorization-kubeconfig=" + cp.kubeconfig,
		}},
		metricsURL: fmt.Sprintf("https://127.0.0.1:%d", port),
	}
	if err := p.start(); err != nil {
		return nil, err
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		if p.exited() {
			return false, fmt.Errorf("dynamig-scheduler exited; see %s", p.log)
		}
		body, err := p.get(ctx, "/readyz")
		return err == nil && string(body) == "ok", nil
	})
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("dynamig-scheduler did not become ready: %w", err)
	}
	return p, nil
}

// get reads a path of the scheduler's secure port as the cluster admin.
func (p *schedulerProc) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.metricsURL+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // the local scheduler's self-signed certificate
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	return body, err
}

// metrics scrapes the scheduler's /metrics.
func (p *schedulerProc) metrics(ctx context.Context) (map[string]*dto.MetricFamily, error) {
	body, err := p.get(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	return parseMetrics(body)
}

// parseMetrics parses a /metrics page in Prometheus' text format.
func parseMetrics(body []byte) (map[string]*dto.MetricFamily, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	return parser.TextToMetricFamilies(bytes.NewReader(body))
}

// peakRSS is the process's peak resident memory in MiB (VmHWM), 0 if unknown.
func (p *schedulerProc) peakRSS() float64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb float64
			if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%f kB", &kb); err == nil {
				return kb / 1024
			}
		}
	}
	return 0
}

// apiserverMetrics scrapes kube-apiserver's /metrics.
func apiserverMetrics(ctx context.Context, kube kubernetes.Interface) (map[string]*dto.MetricFamily, error) {
	body, err := kube.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading kube-apiserver's metrics: %w", err)
	}
	return parseMetrics(body)
}

// nodePartitionPuts is kube-apiserver's request-duration histogram for
// NodePartition writes (PUT, the spec: no subresource) alone.
func nodePartitionPuts(families map[string]*dto.MetricFamily) (*dto.MetricFamily, error) {
	f := families["apiserver_request_duration_seconds"]
	if f == nil {
		return nil, fmt.Errorf("kube-apiserver's metrics have no apiserver_request_duration_seconds")
	}
	only := &dto.MetricFamily{Name: f.Name, Type: f.Type}
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["resource"] == "nodepartitions" && labels["verb"] == "PUT" && labels["subresource"] == "" {
			only.Metric = append(only.Metric, m)
		}
	}
	return only, nil
}

// cpuTimes is the user and system CPU time, in seconds, each process has
// used so far, and the harness's own under "harness (node model, pods)".
func cpuTimes(procs map[string]*proc) (map[string]float64, error) {
	pids := map[string]string{"harness (node model, pods)": "self"}
	for name, p := range procs {
		pids[name] = strconv.Itoa(p.cmd.Process.Pid)
	}
	times := map[string]float64{}
	for name, pid := range pids {
		t, err := cpuSeconds(pid)
		if err != nil {
			return nil, fmt.Errorf("CPU time of %s: %w", name, err)
		}
		times[name] = t
	}
	return times, nil
}

// cpuSeconds reads a process's utime and stime from /proc/<pid>/stat (in
// clock ticks, 100 a second on Linux).
func cpuSeconds(pid string) (float64, error) {
	stat, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	// The fields after the command name, which is in parentheses and may
	// hold spaces: the state is the first, utime the 12th, stime the 13th.
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%s/stat has %d fields after the command", pid, len(f))
	}
	utime, err := strconv.ParseFloat(f[11], 64)
	if err != nil {
		return 0, err
	}
	stime, err := strconv.ParseFloat(f[12], 64)
	if err != nil {
		return 0, err
	}
	return (utime + stime) / 100, nil
}

// conflicts is DynamicMIG's count of plans a NodePartition write changed
// under (dynamig_scheduler_plans_total, result conflict).
func conflicts(families map[string]*dto.MetricFamily) float64 {
	for _, m := range families["dynamig_scheduler_plans_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "result" && l.GetValue() == "conflict" {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// counterSum adds every series of a counter.
func counterSum(families map[string]*dto.MetricFamily, name string) float64 {
	total := 0.0
	if f := families[name]; f != nil {
		for _, m := range f.GetMetric() {
			total += m.GetCounter().GetValue()
		}
	}
	return total
}

// histogram is a Prometheus histogram's cumulative bucket counts.
type histogram struct {
	bounds []float64
	counts []float64
	sum    float64 // of the observations
}

// histogramDelta is after's series, added up (they share their buckets),
// minus before's.
func histogramDelta(before, after *dto.MetricFamily) histogram {
	var h histogram
	add := func(f *dto.MetricFamily, sign float64) {
		for _, m := range f.GetMetric() {
			bounds, counts := buckets(m.GetHistogram())
			if h.bounds == nil {
				h.bounds, h.counts = bounds, make([]float64, len(counts))
			}
			for i := range min(len(counts), len(h.counts)) {
				h.counts[i] += sign * counts[i]
			}
			h.sum += sign * m.GetHistogram().GetSampleSum()
		}
	}
	add(after, 1)
	if h.bounds != nil {
		add(before, -1)
	}
	return h
}

// buckets are a histogram's bounds and cumulative counts, +Inf last.
func buckets(h *dto.Histogram) (bounds, counts []float64) {
	for _, b := range h.GetBucket() {
		bounds = append(bounds, b.GetUpperBound())
		counts = append(counts, float64(b.GetCumulativeCount()))
	}
	if len(bounds) == 0 || !math.IsInf(bounds[len(bounds)-1], 1) {
		bounds = append(bounds, math.Inf(1))
		counts = append(counts, float64(h.GetSampleCount()))
	}
	return bounds, counts
}

// mean is the observations' mean; 0 without any.
func (h histogram) mean() float64 {
	if len(h.counts) == 0 || h.counts[len(h.counts)-1] == 0 {
		return 0
	}
	return h.sum / h.counts[len(h.counts)-1]
}

// quantile interpolates linearly within the bucket that holds it, as
// Prometheus' histogram_quantile does; 0 without observations, the
// largest finite bound if it falls past it.
func (h histogram) quantile(q float64) float64 {
	if len(h.counts) == 0 || h.counts[len(h.counts)-1] == 0 {
		return 0
	}
	rank := q * h.counts[len(h.counts)-1]
	lower, below := 0.0, 0.0
	for i, c := range h.counts {
		if c >= rank {
			if math.IsInf(h.bounds[i], 1) {
				return lower
			}
			return lower + (h.bounds[i]-lower)*(rank-below)/(c-below)
		}
		lower, below = h.bounds[i], c
	}
	return lower
}

// PrintScale prints a scale run's measures as a table.
func PrintScale(w io.Writer, r *ScaleResult) {
	row := func(what, value string) { fmt.Fprintf(w, "%-44s %s\n", what, value) }
	row("nodes × GPUs", fmt.Sprintf("%d × %d = %d GPUs", r.Nodes, r.GPUs/max(r.Nodes, 1), r.GPUs))
	row("MIG burst: pods bound", fmt.Sprintf("%d of %d", r.Bound, r.Pods))
	row("MIG burst: creation to last bind", fmt.Sprintf("%.1f s", r.BurstBoundSeconds))
	row("pod eligible only on the last node served", fmt.Sprint(r.LastNodeServed))
	row("plans (per burst pod)", fmt.Sprintf("%d (%.2f)", r.Plans, r.PlansPerPod))
	row("PostFilter plan p50 / p99 (histogram)", fmt.Sprintf("%.1f ms / %.1f ms", r.PostFilterP50Ms, r.PostFilterP99Ms))
	row("  of which writing specs, p50 / p99", fmt.Sprintf("%.1f ms / %.1f ms", r.PublishP50Ms, r.PublishP99Ms))
	if r.SteadyPlans > 0 {
		row("steady phase: plans (conflicts)", fmt.Sprintf("%d (%d)", r.SteadyPlans, r.SteadyConflicts))
		row("steady phase: PostFilter p50 / p99", fmt.Sprintf("%.1f ms / %.1f ms", r.SteadyPostFilterP50Ms, r.SteadyPostFilterP99Ms))
		row("  of which writing specs, p50 / p99", fmt.Sprintf("%.1f ms / %.1f ms", r.SteadyPublishP50Ms, r.SteadyPublishP99Ms))
		row("steady phase: API client rate-limiter wait p99", fmt.Sprintf("%.1f ms", r.SteadyThrottleP99Ms))
		row("steady phase: kube-apiserver spec PUT mean / p99", fmt.Sprintf("%.1f ms / %.1f ms", r.SteadyAPIServerPutMeanMs, r.SteadyAPIServerPutP99Ms))
		var names []string
		for name := range r.SteadyCPUSeconds {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			row("steady phase: CPU, "+name, fmt.Sprintf("%.1f s of %.1f s (%.0f %% of a core)", r.SteadyCPUSeconds[name], r.SteadySeconds, 100*r.SteadyCPUSeconds[name]/r.SteadySeconds))
		}
	}
	row("scheduler peak RSS", fmt.Sprintf("%.0f MiB", r.SchedulerPeakRSSMiB))
	row("scheduler API requests per bound MIG pod", fmt.Sprintf("%.1f", r.APIRequestsPerPod))
	if len(r.NonGPUWith) > 0 {
		row("non-GPU pods/s with DynamicMIG", fmt.Sprintf("%.0f", r.NonGPUWith))
		row("non-GPU pods/s without", fmt.Sprintf("%.0f", r.NonGPUWithout))
		row("non-GPU throughput ratio, median (min–max)", fmt.Sprintf("%.0f %% (%.0f–%.0f %%)", 100*r.NonGPURatio, 100*r.NonGPURatioMin, 100*r.NonGPURatioMax))
	}
	for _, u := range r.Unserved {
		row("unserved", u)
	}
	for _, v := range r.ModelViolations {
		row("node-model violation", v)
	}
}
