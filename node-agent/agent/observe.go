package agent

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/demand"
	"github.com/dynamig/dynamig/pkg/mig"
)

// observation is what the agent saw of the node in one pass: every
// MIG-capable GPU with its model, profiles and slices and who holds them,
// the MIG devices kubelet can allocate, and the pods bound to the node
// that kubelet does not show holding all their slices.
type observation struct {
	gpus []Observed
	// kubeletErr is why kubelet could not say who holds the slices (its
	// PodResources API did not answer, or it names devices by index): the
	// holders are unknown, so every slice counts as used, and the agent
	// reports and creates but destroys nothing.
	kubeletErr error
	// allocatable are the MIG device IDs kubelet can allocate, per resource.
	allocatable map[string][]string
	// waiting lists, per profile, the pods bound to the node that ask for
	// it and that kubelet has not admitted yet: kubelet may still give them
	// any free slice of the profile it advertises.
	waiting map[mig.ProfileName][]string
}

// observe reads every MIG-capable GPU from NVML: with MIG on, the
// profiles it offers, its model (mig.ResolveModel: from those profiles,
// else the catalog) and its slices, each with the pod kubelet says holds
// it; and, from the pods bound to the node, those kubelet has not
// admitted or does not show holding all their slices. An error is an NVML
// failure; a profile-discovery failure is kept on the GPU (ModelErr)
// instead, as only plans for that GPU need its model.
func (a *Agent) observe(ctx context.Context) (observation, error) {
	gpus, err := a.lib.GPUs()
	if err != nil {
		return observation{}, err
	}
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		return observation{}, fmt.Errorf("listing the pods bound to node %s: %w", a.cfg.NodeName, err)
	}
	devices, kubeletErr := a.kubelet.Devices(ctx, mig.ResourcePrefix, quietAsk(pods))
	if kubeletErr == nil {
		kubeletErr = indexIDs(devices)
	}
	obs := observation{gpus: make([]Observed, 0, len(gpus)), kubeletErr: kubeletErr, allocatable: devices.Allocatable}
	for _, g := range gpus {
		o := Observed{GPU: g}
		if g.MIG.Current {
			o.Profiles, o.Model, o.ModelErr = a.model(g)
			ss, err := a.lib.Slices(g.Index)
			if err != nil {
				return observation{}, err
			}
			for _, s := range ss {
				o.Slices = append(o.Slices, ObservedSlice{Slice: s, Holder: devices.Used[s.UUID]})
			}
		}
		obs.gpus = append(obs.gpus, o)
	}
	obs.holders(pods, devices)
	return obs, nil
}

// quietAsk is nil (ask kubelet with List) unless a pod bound to the node
// may be in kubelet's admission; then it names the pods bound to the node
// that are not finished, to be asked about one by one. A List while a
// pod's devices are being allocated can make kubelet hand them to the next
// pod as well (podresources.Client.Devices). A pod kubelet runs whose API
// object is gone (force-deleted) is not asked about then; NVML's in-use
// check still stands between its slice and a destroy.
func quietAsk(pods []*v1.Pod) []string {
	var ask []string
	admitting := false
	for _, p := range pods {
		if p.Status.Phase == v1.PodSucceeded || p.Status.Phase == v1.PodFailed {
			continue
		}
		ask = append(ask, p.Namespace+"/"+p.Name)
		// Until kubelet admits a pod and writes its status, the pod has
		// no container statuses.
		admitting = admitting || p.Status.Phase == v1.PodPending && p.DeletionTimestamp == nil &&
			len(p.Status.ContainerStatuses) == 0 && len(p.Status.InitContainerStatuses) == 0
	}
	if !admitting {
		return nil
	}
	sort.Strings(ask)
	return ask
}

// kubeletDevices asks kubelet who holds the MIG devices, quietly while a
// pod may be in admission (quietAsk).
func (a *Agent) kubeletDevices(ctx context.Context) (podresources.Devices, error) {
	pods, err := a.podLister.List(labels.Everything())
	if err != nil {
		return podresources.Devices{}, fmt.Errorf("listing the pods bound to node %s: %w", a.cfg.NodeName, err)
	}
	return a.kubelet.Devices(ctx, mig.ResourcePrefix, quietAsk(pods))
}

// unknownHolder is the holder of a slice the agent cannot prove free.
const unknownHolder = "(unknown)"

// holders completes the observation from the pods bound to the node. If
// kubelet could not be asked, every slice is held by an unknown pod. A
// pod that asks for a profile and that kubelet has not admitted is
// waiting. One that kubelet admitted but does not show holding all its
// slices of a profile (an init container's devices are not in
// PodResources; a device may have vanished) may hold any slice of it: the
// free ones count as held by it.
func (o *observation) holders(pods []*v1.Pod, devices podresources.Devices) {
	if o.kubeletErr != nil {
		for i := range o.gpus {
			for j := range o.gpus[i].Slices {
				o.gpus[i].Slices[j].Holder = unknownHolder
			}
		}
		return
	}
	held := map[string]map[mig.ProfileName]int{}
	for _, g := range o.gpus {
		for _, s := range g.Slices {
			if s.Holder != "" {
				if held[s.Holder] == nil {
					held[s.Holder] = map[mig.ProfileName]int{}
				}
				held[s.Holder][s.Profile]++
			}
		}
	}
	unseen := map[mig.ProfileName]string{}
	o.waiting = map[mig.ProfileName][]string{}
	for _, pod := range pods {
		if pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed {
			continue
		}
		d, err := demand.Of(pod)
		if err != nil {
			continue // a resource that names no profile: no plugin advertises it, so kubelet gives the pod no MIG device
		}
		key := pod.Namespace + "/" + pod.Name
		for prof, n := range d {
			switch {
			case !devices.Pods[key]:
				o.waiting[prof] = append(o.waiting[prof], key)
			case held[key][prof] < n:
				unseen[prof] = key
			}
		}
	}
	for i := range o.gpus {
		for j := range o.gpus[i].Slices {
			s := &o.gpus[i].Slices[j]
			if pod, ok := unseen[s.Profile]; ok && s.Holder == "" {
				s.Holder = pod + " " + unknownHolder
			}
		}
	}
}

// anyWaiting lists the pods bound to the node that kubelet has not
// admitted, whatever they ask for.
func (o *observation) anyWaiting() []string {
	set := map[string]bool{}
	for _, pods := range o.waiting {
		for _, p := range pods {
			set[p] = true
		}
	}
	out := make([]string, 0, len(set))
	for p := range set {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// indexIDs refuses device IDs that are not MIG UUIDs: with the NVIDIA
// device plugin's deviceIDStrategy=index, kubelet's IDs ("0:1") date from
// the plugin's last start and name other slices after every change.
func indexIDs(d podresources.Devices) error {
	for _, id := range slices.Concat(slices.Collect(maps.Values(d.Allocatable))...) {
		if !strings.HasPrefix(id, "MIG-") {
			return fmt.Errorf("kubelet lists MIG device %q, not a MIG UUID: set the NVIDIA device plugin's deviceIDStrategy to uuid (index IDs change after every repartition, so dynamig cannot tell which slice a pod holds)", id)
		}
	}
	return nil
}

// model discovers a GPU's profiles and resolves its model from them.
func (a *Agent) model(g gpu.GPU) ([]mig.Profile, *mig.Model, error) {
	ps, err := a.lib.Profiles(g.Index)
	if err != nil {
		return nil, nil, err
	}
	profiles := make([]mig.Profile, len(ps))
	for i, p := range ps {
		profiles[i] = p.Profile
	}
	m, err := mig.ResolveModel(g.Name, g.PCIDeviceID, profiles)
	if err == nil && m == nil {
		err = fmt.Errorf("model %s: NVML offers no MIG profile and the catalog does not know it", g.Name)
	}
	return profiles, m, err
}
