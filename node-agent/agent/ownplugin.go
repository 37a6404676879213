package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
	"github.com/dynamig/dynamig/pkg/mig"
)

// Plugin is the agent's own device plugin (deviceplugin.Plugin), on nodes
// in agent mode: the agent advertises the slices through it, at once after
// a change, instead of restarting NVIDIA's.
type Plugin interface {
	Set(devices map[string][]deviceplugin.Device)
	Run(ctx context.Context) error
	// Kubelet says whether the kubelet went and when the plugin was last
	// registered with a restarted one; KubeletChanged is signalled when
	// that changes.
	Kubelet() deviceplugin.KubeletState
	KubeletChanged() <-chan struct{}
}

// ownDevices is what the agent's plugin advertises: a resource for every
// profile the node's GPUs offer, with or without slices (so that a new
// profile never needs a registration), holding the slices with a
// full-size compute instance by MIG UUID; and nvidia.com/gpu for each GPU
// with MIG off (and no change to it pending), by GPU UUID.
func ownDevices(observed []Observed) map[string][]deviceplugin.Device {
	out := map[string][]deviceplugin.Device{}
	for _, o := range observed {
		if !o.GPU.MIG.Current && !o.GPU.MIG.Pending && o.GPU.UUID != "" {
			out[wholeGPU] = append(out[wholeGPU], deviceplugin.Device{ID: o.GPU.UUID, CDIName: deviceplugin.CDIName(o.GPU.UUID)})
		}
		for _, p := range o.Profiles {
			if _, ok := out[p.Name.ResourceName()]; !ok {
				out[p.Name.ResourceName()] = nil
			}
		}
		for _, s := range o.Slices {
			if s.Advertised() {
				r := s.Profile.ResourceName()
				out[r] = append(out[r], deviceplugin.Device{ID: s.UUID, CDIName: deviceplugin.CDIName(s.UUID)})
			}
		}
	}
	return out
}

// wholeGPU is the resource of a GPU with MIG off.
const wholeGPU = "nvidia.com/gpu"

// errCDI: the CDI specs of the devices could not be written.
var errCDI = errors.New("CDI specs")

// errTwoPlugins: NVIDIA's device plugin runs on a node in agent mode.
var errTwoPlugins = errors.New("two device plugins")

// nvidiaPlugins names NVIDIA's device-plugin pods on this node that are
// not going (DevicePluginNamespace, DevicePluginSelector), from the
// agent's cache of the node's pods: no API request per sync.
func (a *Agent) nvidiaPlugins() ([]string, error) {
	sel, err := labels.Parse(a.cfg.DevicePluginSelector)
	if err != nil {
		return nil, fmt.Errorf("device-plugin selector %q: %w", a.cfg.DevicePluginSelector, err)
	}
	pods, err := a.podLister.Pods(a.cfg.DevicePluginNamespace).List(sel)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, p := range pods {
		if p.DeletionTimestamp == nil && p.Status.Phase != v1.PodSucceeded && p.Status.Phase != v1.PodFailed {
			out = append(out, p.Namespace+"/"+p.Name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// advertiseOwn writes the CDI specs of the observed slices (and removes
// those of slices gone), makes the agent's plugin advertise the slices
// (but those withdrawn to be destroyed) and waits until kubelet can
// allocate exactly them, by identity; obs then
// holds what kubelet can allocate, which the status reports per slice
// (advertised) and the scheduler counts, without waiting for the
// kubelet's next node-status update. Nothing restarts: other resources
// are not disturbed, and no pod fails admission meanwhile.
func (a *Agent) advertiseOwn(ctx context.Context, obs *observation) error {
	if pods, err := a.nvidiaPlugins(); err != nil {
		return err
	} else if len(pods) > 0 {
		obs.allocatable = nil // the devices kubelet lists are not the agent's to vouch for
		return fmt.Errorf("%w: NVIDIA's device plugin runs on this node (%s) while the agent is its device plugin: both would serve the same resource names, and kubelet takes the last to register; label the node nvidia.com/gpu.deploy.device-plugin=false (GPU Operator) or remove that plugin; the agent advertises nothing until then",
			errTwoPlugins, strings.Join(pods, ", "))
	}
	if a.cfg.CDI != nil {
		// Every slice that exists keeps its spec, a withdrawn one too:
		// its holder's container may be restarted.
		var ids []string
		for _, ds := range ownDevices(obs.gpus) {
			for _, d := range ds {
				ids = append(ids, d.ID)
			}
		}
		if err := a.cfg.CDI.Sync(ids); err != nil {
			return fmt.Errorf("%w: %w", errCDI, err)
		}
	}
	shown := except(obs.gpus, a.withdrawn)
	a.cfg.Plugin.Set(ownDevices(shown))
	if obs.kubeletErr != nil {
		node, err := a.node()
		if err == nil && allocatableDiff(node, advertisable(obs.gpus)) == "" {
			return nil // nothing to confirm
		}
		return fmt.Errorf("%w: %w", errKubeletUnknown, obs.kubeletErr)
	}
	start := time.Now()
	missing := ""
	var confirmed map[string][]string
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, a.cfg.DevicePluginTimeout, true, func(ctx context.Context) (bool, error) {
		allocatable, err := a.kubelet.Allocatable(ctx, mig.ResourcePrefix)
		if err != nil {
			missing = err.Error()
			return false, nil
		}
		missing, confirmed = identityDiff(allocatable, shown), allocatable
		return missing == "", nil
	})
	if err != nil {
		obs.allocatable = nil // unconfirmed: no slice is reported advertised (see readvertise)
		return fmt.Errorf("kubelet did not take the agent's device list within %s: %s", a.cfg.DevicePluginTimeout, missing)
	}
	obs.allocatable = confirmed
	klog.FromContext(ctx).V(2).Info("kubelet can allocate the slices", "took", time.Since(start))
	return nil
}

// withdraw stops advertising every slice the steps destroy, at once,
// adding them to a.withdrawn, and waits until kubelet can allocate none of
// them: from then on kubelet gives them to no pod, and every slice it can
// allocate is one the plan keeps or creates. A slice without a MIG UUID
// was never advertised. The error names the slices kubelet still offers.
func (a *Agent) withdraw(ctx context.Context, steps []Step, observed []Observed) error {
	going := map[string]ObservedSlice{}
	for _, st := range steps {
		if s, ok := observedSlice(st, observed); ok && st.Kind == Destroy && s.UUID != "" {
			going[s.UUID] = s
			a.withdrawn[s.UUID] = true
		}
	}
	if len(going) == 0 {
		return nil
	}
	a.cfg.Plugin.Set(ownDevices(except(observed, a.withdrawn)))
	var offered []string
	err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, a.cfg.DevicePluginTimeout, true, func(ctx context.Context) (bool, error) {
		allocatable, err := a.kubelet.Allocatable(ctx, mig.ResourcePrefix)
		if err != nil {
			offered = []string{fmt.Sprintf("the slices (PodResources: %v)", err)}
			return false, nil
		}
		offered = nil
		for id, s := range going {
			if slices.Contains(allocatable[s.Profile.ResourceName()], id) {
				offered = append(offered, s.Slice.Slice.String())
			}
		}
		return len(offered) == 0, nil
	})
	if err != nil {
		sort.Strings(offered)
		return fmt.Errorf("kubelet still offers %s after it was withdrawn", strings.Join(offered, ", "))
	}
	return nil
}

// except is observed without the slices whose MIG UUIDs are in ids.
func except(observed []Observed, ids map[string]bool) []Observed {
	if len(ids) == 0 {
		return observed
	}
	out := make([]Observed, len(observed))
	for i, o := range observed {
		out[i] = o
		out[i].Slices = slices.DeleteFunc(slices.Clone(o.Slices), func(s ObservedSlice) bool { return ids[s.UUID] })
	}
	return out
}

// observedSlice finds the observed slice a step is about.
func observedSlice(st Step, observed []Observed) (ObservedSlice, bool) {
	for _, o := range observed {
		if o.GPU.Index != st.GPU {
			continue
		}
		for _, s := range o.Slices {
			if s.Slice.Slice == st.Slice {
				return s, true
			}
		}
	}
	return ObservedSlice{}, false
}
