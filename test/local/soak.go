package local

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
	"github.com/dynamig/dynamig/test/kubeletnode"
	"github.com/dynamig/dynamig/test/nodesim"
)

// SoakOptions configure Soak.
type SoakOptions struct {
	// Cluster configures the local cluster RunSoak starts.
	Cluster Options
	// Runs is the number of random scenarios; run i has seed Seed+i.
	Runs int
	Seed uint64
	// RunTimeout bounds one run: its pods must all have finished by then
	// (default 3m).
	RunTimeout time.Duration
	// Faults are those a run picks from (default SoakFaults).
	Faults []string
}

// RunSoak starts a local cluster, soaks it (Soak) and stops it, keeping
// its directory and logs if anything was violated.
func RunSoak(ctx context.Context, o SoakOptions, out io.Writer) (int, error) {
	o.Cluster.Progress = out
	c, stop, err := startLogged(ctx, o.Cluster)
	if err != nil {
		return 0, err
	}
	violations, err := Soak(ctx, c, o, out)
	stop(violations > 0 || err != nil)
	return violations, err
}

// soakPool is the soak's nodes, shared by every run, so that each run
// starts from the slices the runs before it left: churn.
var soakPool = []kubeletnode.Options{
	{Name: "soak-a100", Models: []string{"A100-80GB", "A100-80GB"}},
	{Name: "soak-h100", Models: []string{"H100-80GB"}},
	{Name: "soak-a30", Models: []string{"A30"}},
}

// SoakFaults are what a run may inject, at a random moment of its burst.
// bound-by-hand creates a pod with spec.nodeName set, as users and other
// controllers may: only the agent's rules stand between it and a slice a
// plan destroys.
var SoakFaults = []string{"none", "agent-killed", "nvml-create-fails", "device-plugin-slow", "scheduler-restart", "apiserver-restart", "kubelet-restart", "allocate-slow", "bound-by-hand"}

// Soak runs random scenarios on the local cluster, one after another on the
// same nodes: a burst of pods asking for random profiles of the nodes'
// GPUs (one or two slices, running 0.5–4 s) and one fault at a random
// moment. After each run it checks, from the simulators' own records,
// that every pod ran and finished, no device was destroyed or handed out
// twice while held, no pod failed because of a MIG device (Violations),
// and no GPU changed for a plan its agent had refused. It prints a line per run, with its seed and every
// violation, and returns the number of violations.
func Soak(ctx context.Context, c *Cluster, o SoakOptions, out io.Writer) (int, error) {
	if o.RunTimeout == 0 {
		o.RunTimeout = 3 * time.Minute
	}
	if len(o.Faults) == 0 {
		o.Faults = SoakFaults
	}
	for _, f := range o.Faults {
		if !slices.Contains(SoakFaults, f) {
			return 0, fmt.Errorf("unknown soak fault %q (known: %s)", f, strings.Join(SoakFaults, ", "))
		}
	}
	var nodes []*kubeletnode.Node
	for _, opts := range soakPool {
		opts.Labels = map[string]string{"dynamig-soak": "true"}
		n, err := c.AddNode(opts)
		if err != nil {
			return 0, err
		}
		if err := waitReported(ctx, c, n.Name); err != nil {
			return 0, fmt.Errorf("node %s not reported: %w", n.Name, err)
		}
		nodes = append(nodes, n)
	}
	plans := watchPlans(ctx, c)
	reported := map[string]bool{}
	var letOffs []func(nodesim.Failure) bool
	total, failed := 0, 0
	start := time.Now()
	for i := range o.Runs {
		seed := o.Seed + uint64(i)
		t0 := time.Now()
		desc, problems, letOff, err := soakRun(ctx, c, nodes, seed, o.RunTimeout, o.Faults)
		if err != nil {
			return total, fmt.Errorf("run %d (seed %d): %w", i+1, seed, err)
		}
		letOffs = append(letOffs, letOff)
		problems = append(problems, halfApplied(ctx, c, nodes)...)
		for _, n := range nodes {
			found := violations(n.Name, n.Sim, n, func(f nodesim.Failure) bool {
				return slices.ContainsFunc(letOffs, func(l func(nodesim.Failure) bool) bool { return l(f) })
			})
			for _, v := range append(found, plans.pursued(n.Name, n.Sim.Ops(), t0)...) {
				if !reported[v] {
					reported[v] = true
					problems = append(problems, v)
				}
			}
		}
		if ctx.Err() != nil {
			return total, fmt.Errorf("run %d (seed %d) interrupted: %w", i+1, seed, ctx.Err())
		}
		verdict := "ok"
		if len(problems) > 0 {
			verdict = fmt.Sprintf("%d VIOLATIONS", len(problems))
		}
		fmt.Fprintf(out, "run %d/%d seed %d: %s, %.1fs: %s\n", i+1, o.Runs, seed, desc, time.Since(t0).Seconds(), verdict)
		for _, p := range problems {
			fmt.Fprintf(out, "  violation (seed %d): %s\n", seed, p)
		}
		total += len(problems)
		if len(problems) > 0 {
			failed++
		}
	}
	fmt.Fprintf(out, "%d runs (seeds %d–%d), %d violations, %s\n", o.Runs, o.Seed, o.Seed+uint64(o.Runs)-1, total, time.Since(start).Round(time.Second))
	fmt.Fprintf(out, "soak: %d passed, %d failed\n", o.Runs-failed, failed)
	return total, nil
}

// soakRun runs the scenario of one seed: it returns what it did, the pods
// that did not run and finish, and which admission failures its fault
// excuses.
func soakRun(ctx context.Context, c *Cluster, nodes []*kubeletnode.Node, seed uint64, timeout time.Duration, faults []string) (string, []string, func(nodesim.Failure) bool, error) {
	r := rand.New(rand.NewPCG(seed, 0x50a4))
	ns := fmt.Sprintf("soak-%d", seed)
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return "", nil, nil, err
	}
	defer func() {
		_ = c.Kube.CoreV1().Pods(ns).DeleteCollection(context.WithoutCancel(ctx), metav1.DeleteOptions{}, metav1.ListOptions{})
	}()

	type arrival struct {
		pod *v1.Pod
		at  time.Duration
	}
	// Half the runs are focused: two profiles of one model, so that pods
	// keep repartitioning the same GPUs around free slices of the same
	// profile — where kubelet's device choice and the agent's destroys
	// meet.
	var focus []mig.Profile
	if r.IntN(2) == 0 {
		m, err := mig.ModelByName(soakPool[r.IntN(len(soakPool))].Models[0])
		if err != nil {
			return "", nil, nil, err
		}
		focus = []mig.Profile{m.Profiles[r.IntN(len(m.Profiles))], m.Profiles[r.IntN(len(m.Profiles))]}
	}
	var pods []arrival
	for i := range 2 + r.IntN(7) {
		var prof mig.Profile
		if focus != nil {
			prof = focus[r.IntN(len(focus))]
		} else {
			opts := soakPool[r.IntN(len(soakPool))]
			m, err := mig.ModelByName(opts.Models[r.IntN(len(opts.Models))])
			if err != nil {
				return "", nil, nil, err
			}
			prof = m.Profiles[r.IntN(len(m.Profiles))]
		}
		count := int64(1)
		if prof.MaxCount > 1 && r.IntN(5) == 0 {
			count = 2
		}
		p := Pod(fmt.Sprintf("p%d-%s", i, dnsLabel(prof.Name)), map[string]int64{prof.Name.ResourceName(): count})
		p.Namespace = ns
		p.Spec.NodeSelector = map[string]string{"dynamig-soak": "true"}
		RunFor(p, 0.5+3.5*r.Float64())
		pods = append(pods, arrival{pod: p, at: time.Duration(r.IntN(3000)) * time.Millisecond})
	}
	fault := faults[r.IntN(len(faults))]
	faultAt := time.Duration(r.IntN(4000)) * time.Millisecond
	victim := nodes[r.IntN(len(nodes))]
	hand := handPod{ns: ns, pick: r.IntN(1 << 20), seconds: 0.5 + 3.5*r.Float64()}
	// Half the runs on hardware as slow as real GPUs: plans stay in
	// flight for seconds, while pods come and go.
	sliceDelay := c.opts.SliceDelay
	if r.IntN(2) == 0 {
		sliceDelay = time.Second
	}
	for _, n := range nodes {
		n.Sim.SetLatency(gpu.MethodCreateGPUInstance, sliceDelay)
	}

	begin := time.Now()
	slices.SortFunc(pods, func(a, b arrival) int { return int(a.at - b.at) })
	injected := false
	injectNow := func() error {
		time.Sleep(time.Until(begin.Add(faultAt)))
		injected = true
		if fault == "bound-by-hand" {
			return hand.create(ctx, c, victim)
		}
		return inject(ctx, c, victim, fault)
	}
	for _, a := range pods {
		if !injected && faultAt <= a.at {
			if err := injectNow(); err != nil {
				return "", nil, nil, err
			}
		}
		time.Sleep(time.Until(begin.Add(a.at)))
		if _, err := c.Kube.CoreV1().Pods(ns).Create(ctx, a.pod, metav1.CreateOptions{}); err != nil {
			return "", nil, nil, fmt.Errorf("creating pod %s: %w", a.pod.Name, err)
		}
	}
	if !injected {
		if err := injectNow(); err != nil {
			return "", nil, nil, err
		}
	}
	want := len(pods)
	if hand.name != "" {
		want++
	}
	what := fmt.Sprintf("%d pods", len(pods))
	if focus != nil {
		what += fmt.Sprintf(" of %s and %s", focus[0].Name, focus[1].Name)
	}
	desc := fmt.Sprintf("%s, %s per slice, fault %s on %s at %.1fs", what, sliceDelay, fault, victim.Name, faultAt.Seconds())
	if hand.name != "" {
		desc += " (pod " + hand.name + ")"
	}

	var problems []string
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		list, err := c.Kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		problems = problems[:0]
		done := 0
		for _, p := range list.Items {
			switch p.Status.Phase {
			case v1.PodSucceeded:
				done++
			case v1.PodFailed:
				done++
				if kubeletnode.RejectedForMIG(&p) && hand.excuses(nodesim.Failure{Kind: nodesim.FailureAdmission, Pod: ns + "/" + p.Name, Reason: p.Status.Reason}) {
					continue
				}
				problems = append(problems, fmt.Sprintf("pod %s/%s failed: %s %s", ns, p.Name, p.Status.Reason, p.Status.Message))
			}
		}
		return done == want, nil
	})
	if err != nil {
		printPending(ctx, c, ns, &problemWriter{&problems})
		problems = append(problems, fmt.Sprintf("pods of %s not all finished within %s", ns, timeout))
	}
	return desc, problems, hand.excuses, nil
}

// dnsLabel writes a profile name as a pod name may hold it.
func dnsLabel(p mig.ProfileName) string {
	return strings.NewReplacer(".", "-", "+", "-").Replace(p.String())
}

// handPod is the pod of a bound-by-hand fault. It asks for the profile of
// a free slice on the node (of any slice, or any profile, if none is
// free) so that kubelet may admit it, picked by pick, and kubelet's
// Allocate is slowed for a while, as in allocate-slow: the pod is bound
// but not admitted for seconds, and only the agent's admission rule keeps
// a plan from destroying the slice kubelet is giving it.
type handPod struct {
	ns      string
	pick    int
	seconds float64
	// Set once created.
	name, resource string
	node           *kubeletnode.Node
	created        time.Time
}

func (h *handPod) create(ctx context.Context, c *Cluster, n *kubeletnode.Node) error {
	np, err := c.Partition(ctx, n.Name)
	if err != nil {
		return err
	}
	var free, all []string
	for _, g := range np.Status.GPUs {
		for _, s := range g.Slices {
			if !s.Used {
				free = append(free, s.Profile)
			}
			all = append(all, s.Profile)
		}
		for _, p := range g.Profiles {
			all = append(all, p.Name)
		}
	}
	for _, m := range np.Status.Models {
		for _, p := range m.Profiles {
			all = append(all, p.Name)
		}
	}
	if len(free) == 0 {
		free = all
	}
	if len(free) == 0 {
		return fmt.Errorf("node %s reports no GPU profile", n.Name)
	}
	slices.Sort(free)
	prof, err := mig.ParseProfile(free[h.pick%len(free)])
	if err != nil {
		return err
	}
	p := Pod("hand-"+dnsLabel(prof), map[string]int64{prof.ResourceName(): 1})
	p.Namespace, p.Spec.NodeName = h.ns, n.Name
	RunFor(p, h.seconds)
	n.SetAllocateDelay(2 * time.Second)
	go func() {
		time.Sleep(5 * time.Second)
		n.SetAllocateDelay(0)
	}()
	h.created = time.Now()
	if _, err := c.Kube.CoreV1().Pods(h.ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating pod %s: %w", p.Name, err)
	}
	h.name, h.resource, h.node = p.Name, prof.ResourceName(), n
	return nil
}

// excuses reports whether a failure is one a pod bound by hand may
// cause without any fault of dynamig's:
//   - kubelet rejecting it at admission (no free device, or the device
//     plugin restarting when it came), or rejecting another pod of the
//     run for the slice it took (OutOf<resource>; kube-scheduler's own
//     resources race the same way);
//   - in restart mode, its container given a device destroyed before the
//     pod was created: NVIDIA's device plugin advertises a destroyed slice
//     until the agent restarts it, and nothing keeps a pod that skips the
//     scheduler from arriving in between (agent mode withdraws the slice
//     first).
func (h *handPod) excuses(f nodesim.Failure) bool {
	if h.name == "" {
		return false
	}
	ns, name, _ := strings.Cut(f.Pod, "/")
	if ns != h.ns {
		return false
	}
	if f.Kind == nodesim.FailureAdmission {
		return name == h.name || f.Reason == "OutOf"+h.resource
	}
	return name == h.name && f.Device != "" && slices.ContainsFunc(h.node.Sim.Ops(), func(op gpu.Op) bool {
		return op.Kind == "destroy-ci" && op.UUID == f.Device && op.Time.Before(h.created)
	})
}

// halfApplied waits up to 30 s for every node to settle once its pods
// are done — no plan in flight, no device-plugin restart under way, and an
// applied plan's layout on the GPUs — and names those that do not.
func halfApplied(ctx context.Context, c *Cluster, nodes []*kubeletnode.Node) []string {
	var out []string
	// Reads use ctx, not the poll's: its deadline would fail the last read.
	_ = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		out = out[:0]
		for _, n := range nodes {
			np, err := c.Partition(ctx, n.Name)
			if err != nil {
				out = append(out, fmt.Sprintf("node %s: reading its NodePartition: %v", n.Name, err))
				continue
			}
			pn := partition.Decode(np)
			switch {
			case pn.InFlight:
				out = append(out, fmt.Sprintf("node %s left half-applied: plan %s still in flight (observed %q)", n.Name, np.Spec.PlanID, np.Status.ObservedPlanID))
			case pn.Restarting:
				out = append(out, fmt.Sprintf("node %s left half-applied: its device plugin still restarting", n.Name))
			case meta.IsStatusConditionTrue(np.Status.Conditions, v1alpha1.ConditionApplied):
				layouts, _ := partition.DesiredLayouts(np)
				for g, want := range layouts {
					if got := n.Sim.Layout(g); !sameLayout(got, want) {
						out = append(out, fmt.Sprintf("node %s left half-applied: plan %s applied, gpu %d has %v, the plan %v", n.Name, np.Spec.PlanID, g, got, want))
					}
				}
			}
		}
		return len(out) == 0, nil
	})
	return out
}

// sameLayout reports whether two layouts hold the same slices.
func sameLayout(a, b []mig.Slice) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	mig.SortSlices(a)
	mig.SortSlices(b)
	return slices.Equal(a, b)
}

// inject makes a fault happen now; a lasting one heals by itself.
func inject(ctx context.Context, c *Cluster, n *kubeletnode.Node, fault string) error {
	switch fault {
	case "agent-killed":
		c.StopAgent(n.Name)
		time.Sleep(500 * time.Millisecond)
		return c.StartAgent(n.Name)
	case "nvml-create-fails":
		n.Sim.FailCall(gpu.MethodCreateGPUInstance, 1, gpu.FaultUnknown)
	case "device-plugin-slow":
		n.PauseDevicePlugin(true)
		go func() {
			time.Sleep(3 * time.Second)
			n.PauseDevicePlugin(false)
		}()
	case "scheduler-restart":
		c.StopScheduler()
		return c.StartScheduler()
	case "apiserver-restart":
		return c.RestartAPIServer(ctx)
	case "kubelet-restart":
		return n.RestartKubelet(2 * time.Second)
	case "allocate-slow":
		n.SetAllocateDelay(2 * time.Second)
		go func() {
			time.Sleep(5 * time.Second)
			n.SetAllocateDelay(0)
		}()
	}
	return nil
}

// problemWriter collects printed lines as problems.
type problemWriter struct{ lines *[]string }

func (w *problemWriter) Write(b []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			*w.lines = append(*w.lines, l)
		}
	}
	return len(b), nil
}
