package agent

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/guard"
	"github.com/dynamig/dynamig/pkg/mig"
)

// advertisable counts, per resource, the slices the NVIDIA device plugin
// advertises (gpu.Slice.Advertised).
func advertisable(observed []Observed) map[v1.ResourceName]int64 {
	out := map[v1.ResourceName]int64{}
	for _, o := range observed {
		for _, s := range o.Slices {
			if s.Advertised() {
				out[v1.ResourceName(s.Profile.ResourceName())]++
			}
		}
	}
	return out
}

// allocatableDiff says which MIG resources Node allocatable still shows
// fewer of than want; "" if none. The agent goes by it only when it
// cannot ask kubelet (PodResources unavailable): a node whose slices did
// not change and whose Node allocatable shows them needs no
// re-advertisement. More than want is not a difference: kubelet writes a
// resource's drop only at its next status update, and when that update
// fails at the moment kubelet retires a resource (5 minutes after its
// plugin left) the stale value stays on the Node for good, as kubelet no
// longer reports the resource.
func allocatableDiff(node *v1.Node, want map[v1.ResourceName]int64) string {
	var diffs []string
	for r, n := range want {
		if q := node.Status.Allocatable[r]; q.Value() < n {
			diffs = append(diffs, fmt.Sprintf("%s: allocatable %d, slices %d", r, q.Value(), n))
		}
	}
	sort.Strings(diffs)
	return strings.Join(diffs, "; ")
}

// identityDiff says how the MIG devices kubelet can allocate, per
// resource name, differ from the slices the device plugin should
// advertise (by MIG UUID under the profile's resource name); "" if they
// do not.
func identityDiff(allocatable map[string][]string, observed []Observed) string {
	want := map[string]bool{}
	for _, o := range observed {
		for _, s := range o.Slices {
			if s.Advertised() {
				want[s.Profile.ResourceName()+" "+s.UUID] = true
			}
		}
	}
	have := map[string]bool{}
	for r, ids := range allocatable {
		for _, id := range ids {
			have[r+" "+id] = true
		}
	}
	var missing, extra []string
	for d := range want {
		if !have[d] {
			missing = append(missing, d)
		}
	}
	for d := range have {
		if !want[d] {
			extra = append(extra, d)
		}
	}
	if len(missing)+len(extra) == 0 || guard.Off(guard.Identity) {
		return ""
	}
	sort.Strings(missing)
	sort.Strings(extra)
	return fmt.Sprintf("kubelet cannot allocate %v and can allocate %v", missing, extra)
}

// errKubeletUnknown: what kubelet can allocate is unknown, so a
// re-advertisement cannot be confirmed.
var errKubeletUnknown = errors.New("cannot confirm what kubelet can allocate")

// advertise makes the device plugin advertise the observed slices: the
// agent's own (advertiseOwn), or NVIDIA's, after the agent changed them
// (changed) or when the device IDs kubelet can allocate are not exactly
// them (Node allocatable shows too few, when kubelet cannot be asked).
// kubelet fails the
// admission of a pod asking for a resource whose plugin restarts, for
// good, so before the restart it marks the NodePartition
// DevicePluginRestarting (the scheduler binds no MIG pod to the node
// then), and holds off (errWait) while a pod bound to the node is not
// admitted, checking again after the mark for one bound just before it.
// Other errors: kubelet unknown (errKubeletUnknown), or the plugin did not
// re-advertise within DevicePluginTimeout.
func (a *Agent) advertise(ctx context.Context, np *v1alpha1.NodePartition, node *v1.Node, obs *observation, changed bool) error {
	if a.cfg.Plugin != nil {
		return a.advertiseOwn(ctx, obs)
	}
	if obs.kubeletErr != nil {
		if !changed && allocatableDiff(node, advertisable(obs.gpus)) == "" {
			return nil // nothing changed; nothing to confirm
		}
		return fmt.Errorf("%w: %w", errKubeletUnknown, obs.kubeletErr)
	}
	if !changed && identityDiff(obs.allocatable, obs.gpus) == "" {
		return nil
	}
	if pods := obs.anyWaiting(); len(pods) > 0 && !guard.Off(guard.Admission) {
		return errWait{why: notAdmitted(pods) + " before restarting the device plugin"}
	}
	if err := a.markRestarting(ctx, np); err != nil {
		return err
	}
	if again, err := a.observe(ctx); err == nil && !guard.Off(guard.Admission) {
		if pods := again.anyWaiting(); len(pods) > 0 {
			return errWait{why: notAdmitted(pods) + " before restarting the device plugin"}
		}
	}
	return a.readvertise(ctx, obs)
}

// readvertise makes the NVIDIA device plugin, which scans MIG devices only
// when it starts, advertise the node's slices: it deletes the plugin's pod
// on this node, waits for a replacement (a new UID) to be Ready, then for
// kubelet to be able to allocate exactly their MIG UUIDs (identity, not
// counts: an unchanged count matches before the new plugin registers).
// Not for Node allocatable: kubelet writes it only at its next status
// update, up to nodeStatusUpdateFrequency (10 s) later, and admits from
// its device manager, which already has the devices; the status reports
// them advertised and the scheduler counts those. Waiting on observed
// state, not a sleep, bounded by DevicePluginTimeout.
func (a *Agent) readvertise(ctx context.Context, obs *observation) error {
	logger := klog.FromContext(ctx)
	start := time.Now()
	pods, err := a.kube.CoreV1().Pods(a.cfg.DevicePluginNamespace).List(ctx, metav1.ListOptions{
		LabelSelector: a.cfg.DevicePluginSelector, FieldSelector: "spec.nodeName=" + a.cfg.NodeName,
	})
	if err != nil {
		return fmt.Errorf("listing device-plugin pods (%s, %s): %w", a.cfg.DevicePluginNamespace, a.cfg.DevicePluginSelector, err)
	}
	if a.replaced == nil {
		a.replaced = map[types.UID]bool{}
	}
	for _, p := range pods.Items {
		if len(a.replaced) > 0 && !a.replaced[p.UID] {
			// Started after the agent deleted its predecessor, so after the
			// layout changed: it scans the slices that exist. Deleting it
			// again would restart a plugin that is still coming up, for
			// good if it takes longer than DevicePluginTimeout.
			logger.V(2).Info("waiting for the device-plugin pod started after the change", "pod", klog.KObj(&p))
			continue
		}
		a.replaced[p.UID] = true
		if err := a.kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("restarting device-plugin pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		logger.V(2).Info("deleted the device-plugin pod so that it re-advertises", "pod", klog.KObj(&p))
	}
	if len(a.replaced) == 0 {
		logger.Info("no device-plugin pod on this node; waiting only for kubelet to be able to allocate the slices", "namespace", a.cfg.DevicePluginNamespace, "selector", a.cfg.DevicePluginSelector)
	}
	missing := ""
	var confirmed map[string][]string
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, a.cfg.DevicePluginTimeout, true, func(ctx context.Context) (bool, error) {
		if len(a.replaced) > 0 {
			ready, err := a.replacementReady(ctx, a.replaced)
			if err != nil || !ready {
				missing = "no new device-plugin pod is Ready"
				return false, nil
			}
		}
		allocatable, err := a.kubelet.Allocatable(ctx, mig.ResourcePrefix)
		if err != nil {
			missing = err.Error()
			return false, nil
		}
		missing, confirmed = identityDiff(allocatable, obs.gpus), allocatable
		return missing == "", nil
	})
	if err != nil {
		// What kubelet could allocate before the restart is no longer
		// so, and what it lists now is not what it should: the status
		// marks no slice advertised, so that the scheduler binds nothing
		// to the node until a re-advertisement is confirmed.
		obs.allocatable = nil
		return fmt.Errorf("the device plugin (%s, %s) did not re-advertise the slices within %s: %s", a.cfg.DevicePluginNamespace, a.cfg.DevicePluginSelector, a.cfg.DevicePluginTimeout, missing)
	}
	obs.allocatable = confirmed
	devicePluginRestart.Observe(time.Since(start).Seconds())
	logger.V(2).Info("device plugin re-advertised the slices", "took", time.Since(start))
	return nil
}

// replacementReady reports whether a device-plugin pod that is not one of
// old, and is not terminating, is Ready on this node.
func (a *Agent) replacementReady(ctx context.Context, old map[types.UID]bool) (bool, error) {
	pods, err := a.kube.CoreV1().Pods(a.cfg.DevicePluginNamespace).List(ctx, metav1.ListOptions{
		LabelSelector: a.cfg.DevicePluginSelector, FieldSelector: "spec.nodeName=" + a.cfg.NodeName,
	})
	if err != nil {
		return false, err
	}
	for _, p := range pods.Items {
		if old[p.UID] || p.DeletionTimestamp != nil {
			continue
		}
		for _, c := range p.Status.Conditions {
			if c.Type == v1.PodReady && c.Status == v1.ConditionTrue {
				return true, nil
			}
		}
	}
	return false, nil
}
