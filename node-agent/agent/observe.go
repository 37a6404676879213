package agent

import (
	"context"
	"fmt"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/node-agent/podresources"
	"github.com/dynamig/dynamig/pkg/mig"
)

// observation is what the agent saw of the node in one pass: every
// MIG-capable GPU with its model, profiles and slices, and whether kubelet
// could say who holds the slices.
type observation struct {
	gpus []Observed
	// kubeletErr is why kubelet's PodResources API did not answer: the
	// holders are unknown, so the agent reports and creates but destroys
	// nothing.
	kubeletErr error
}

// observe reads every MIG-capable GPU from NVML: with MIG on, the
// profiles it offers, its model (mig.ResolveModel: from those profiles,
// else the catalog) and its slices, each with the pod kubelet says holds
// it. An error is an NVML failure; a profile-discovery failure is kept on
// the GPU (ModelErr) instead, as only plans for that GPU need its model.
func (a *Agent) observe(ctx context.Context) (observation, error) {
	gpus, err := a.lib.GPUs()
	if err != nil {
		return observation{}, err
	}
	devices, kubeletErr := a.kubelet.Devices(ctx, mig.ResourcePrefix)
	obs := observation{gpus: make([]Observed, 0, len(gpus)), kubeletErr: kubeletErr}
	for _, g := range gpus {
		o := Observed{GPU: g}
		if g.MIG.Current {
			o.Profiles, o.Model, o.ModelErr = a.model(g)
			ss, err := a.lib.Slices(g.Index)
			if err != nil {
				return observation{}, err
			}
			for _, s := range ss {
				o.Slices = append(o.Slices, ObservedSlice{Slice: s, Holder: holder(devices, g.Index, s)})
			}
		}
		obs.gpus = append(obs.gpus, o)
	}
	return obs, nil
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

// holder is the pod kubelet says holds a slice, by the MIG UUID or the
// "<gpu>:<mig index>" ID of deviceIDStrategy=index.
func holder(d podresources.Devices, gpuIndex int, s gpu.Slice) string {
	if s.UUID == "" {
		return ""
	}
	if pod, ok := d.Used[s.UUID]; ok {
		return pod
	}
	return d.Used[fmt.Sprintf("%d:%d", gpuIndex, s.MIGIndex)]
}
