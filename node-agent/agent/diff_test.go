package agent

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/mig"
)

func sl(profile string, start int) mig.Slice {
	return mig.Slice{Profile: mig.MustParseProfile(profile), Start: start}
}

func obs(index int, slices ...ObservedSlice) Observed {
	return Observed{GPU: gpu.GPU{Index: index, MIG: gpu.MIGMode{Current: true, Pending: true}}, Slices: slices}
}

func have(profile string, start int, holder string) ObservedSlice {
	return ObservedSlice{Slice: gpu.Slice{Slice: sl(profile, start), CI: 0, UUID: "MIG-" + profile}, Holder: holder}
}

func TestDiff(t *testing.T) {
	noCI := have("3g.40gb", 4, "")
	noCI.CI = -1
	off := obs(1)
	off.GPU.MIG = gpu.MIGMode{}
	pending := obs(1)
	pending.GPU.MIG = gpu.MIGMode{Pending: true}
	tests := []struct {
		name      string
		observed  []Observed
		spec      map[int][]mig.Slice
		verified  bool
		steps     []Step
		conflicts []Conflict
	}{{
		name:     "empty GPU: create in start order",
		observed: []Observed{obs(0)},
		spec:     map[int][]mig.Slice{0: {sl("1g.10gb", 2), sl("1g.10gb", 0), sl("3g.40gb", 4)}},
		verified: true,
		steps: []Step{
			{Create, 0, sl("1g.10gb", 0)}, {Create, 0, sl("1g.10gb", 2)}, {Create, 0, sl("3g.40gb", 4)},
		},
	}, {
		name:     "already applied: nothing",
		observed: []Observed{obs(0, have("1g.10gb", 0, "a/b"), have("3g.40gb", 4, ""))},
		spec:     map[int][]mig.Slice{0: {sl("3g.40gb", 4), sl("1g.10gb", 0)}},
		verified: true,
	}, {
		name: "destroys of every GPU before any create",
		observed: []Observed{
			obs(0, have("7g.80gb", 0, "")),
			obs(1, have("4g.40gb", 0, ""), have("1g.10gb", 4, "team/x")),
		},
		spec: map[int][]mig.Slice{
			0: {sl("3g.40gb", 0), sl("3g.40gb", 4)},
			1: {sl("1g.10gb", 4), sl("2g.20gb", 0), sl("2g.20gb", 2)},
		},
		verified: true,
		steps: []Step{
			{Destroy, 0, sl("7g.80gb", 0)}, {Destroy, 1, sl("4g.40gb", 0)},
			{Create, 0, sl("3g.40gb", 0)}, {Create, 0, sl("3g.40gb", 4)},
			{Create, 1, sl("2g.20gb", 0)}, {Create, 1, sl("2g.20gb", 2)},
		},
	}, {
		name:      "a used slice in the way: the GPU is left alone, others proceed",
		observed:  []Observed{obs(0, have("4g.40gb", 0, "team/train")), obs(1)},
		spec:      map[int][]mig.Slice{0: {sl("7g.80gb", 0)}, 1: {sl("7g.80gb", 0)}},
		verified:  true,
		steps:     []Step{{Create, 1, sl("7g.80gb", 0)}},
		conflicts: []Conflict{{0, ReasonSliceInUse, "gpu 0: not changed: 4g.40gb@0 (MIG-4g.40gb) is used by pod team/train"}},
	}, {
		name:      "kubelet not reachable: no destroy, creates into free space go ahead",
		observed:  []Observed{obs(0, have("1g.10gb", 0, "")), obs(1, have("1g.10gb", 0, ""))},
		spec:      map[int][]mig.Slice{0: {sl("2g.20gb", 0)}, 1: {sl("1g.10gb", 0), sl("1g.10gb", 1)}},
		verified:  false,
		steps:     []Step{{Create, 1, sl("1g.10gb", 1)}},
		conflicts: []Conflict{{0, ReasonKubeletUnreachable, "gpu 0: not changed: 1g.10gb@0 (MIG-1g.10gb) may be in use: kubelet could not be asked"}},
	}, {
		name:     "a slice without its compute instance is completed",
		observed: []Observed{obs(0, noCI)},
		spec:     map[int][]mig.Slice{0: {sl("3g.40gb", 4)}},
		verified: true,
		steps:    []Step{{Create, 0, sl("3g.40gb", 4)}},
	}, {
		name:     "a GPU the spec does not list keeps its slices; an empty list empties the GPU",
		observed: []Observed{obs(0, have("1g.10gb", 0, "")), obs(1, have("1g.10gb", 0, ""))},
		spec:     map[int][]mig.Slice{1: {}},
		verified: true,
		steps:    []Step{{Destroy, 1, sl("1g.10gb", 0)}},
	}, {
		name:     "MIG mode off, pending, or no such GPU",
		observed: []Observed{obs(0), off},
		spec:     map[int][]mig.Slice{1: {sl("1g.10gb", 0)}, 2: {sl("1g.10gb", 0)}},
		verified: true,
		conflicts: []Conflict{
			{1, ReasonMIGDisabled, "gpu 1: MIG mode is disabled: drain the node, run `nvidia-smi -i 1 -mig 1` (then reset the GPU or reboot if it says so); dynamig never changes MIG mode itself"},
			{2, ReasonNoSuchGPU, "gpu 2: no MIG-capable GPU with this index on the node"},
		},
	}, {
		name:      "MIG mode pending",
		observed:  []Observed{pending},
		spec:      map[int][]mig.Slice{1: {sl("1g.10gb", 0)}},
		verified:  true,
		conflicts: []Conflict{{1, ReasonMIGDisabled, "gpu 1: MIG mode is enabled but pending a GPU reset or reboot: drain the node, then run `nvidia-smi -i 1 -r` or reboot it"}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			steps, conflicts := Diff(tt.observed, tt.spec, tt.verified)
			opt := cmp.Comparer(func(a, b mig.ProfileName) bool { return a == b })
			if d := cmp.Diff(tt.steps, steps, opt); d != "" {
				t.Errorf("steps (-want +got):\n%s", d)
			}
			if d := cmp.Diff(tt.conflicts, conflicts); d != "" {
				t.Errorf("conflicts (-want +got):\n%s", d)
			}
		})
	}
}
