package partition

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/builders"
)

func slice(profile string, start int) mig.Slice {
	return mig.Slice{Profile: mig.MustParseProfile(profile), Start: start}
}

func TestDecode(t *testing.T) {
	applied := Decode(builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0)), builders.GPU(1, "NVIDIA H100 80GB HBM3")))
	require.NoError(t, applied.Err)
	assert.False(t, applied.InFlight)
	require.Len(t, applied.GPUs, 2)
	assert.Equal(t, []Slice{{Slice: slice("3g.40gb", 0), Used: true}}, applied.GPUs[0].Start(applied.InFlight))
	assert.Equal(t, "H100-80GB", applied.GPUs[1].Model.Name, "NVML names resolve too")
	assert.Equal(t, 1, applied.Used)

	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := Decode(builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0))))
	require.NoError(t, inflight.Err)
	assert.True(t, inflight.InFlight)
	assert.Equal(t, []Slice{{Slice: slice("3g.40gb", 0), Used: true}, {Slice: slice("3g.40gb", 4)}},
		inflight.GPUs[0].Start(inflight.InFlight), "a plan in flight is the layout to plan from")

	off := Decode(builders.NodePartition(nil, "", "", v1alpha1.GPUStatus{Index: 0, Model: "A100-80GB", MIGMode: v1alpha1.MIGDisabled}, builders.GPU(1, "GeForce RTX 4090")))
	require.ErrorContains(t, off.Err, "no GPU with MIG enabled and a known model")
	assert.Nil(t, off.GPUs[1].Model)

	bad := Decode(builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0), builders.Used("4g.40gb", 0))))
	require.ErrorContains(t, bad.Err, "gpu 0: invalid MIG layout")

	malformed := Decode(builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB", builders.Used("3g.40", 0))))
	require.ErrorContains(t, malformed.Err, `gpu 0: invalid MIG profile "3g.40"`)
}

// A GPU whose status lists the profiles NVML offers is modelled with those:
// here an older driver without 1g.20gb, on a GPU the catalog does not know.
func TestDecodePrefersDiscoveredProfiles(t *testing.T) {
	a100, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	offered := builders.Without(a100.Profiles, "1g.20gb")
	g := EncodeGPU(0, "GPU-1", "NVIDIA A100 80GB PCIe (custom)", v1alpha1.MIGEnabled, offered, []Slice{{Slice: slice("3g.40gb", 4), Used: true}})
	n := Decode(builders.NodePartition(nil, "", "", g))
	require.NoError(t, n.Err)
	m := n.GPUs[0].Model
	assert.Equal(t, "NVIDIA A100 80GB PCIe (custom)", m.Name)
	_, ok := m.ProfileIndex(mig.MustParseProfile("1g.20gb"))
	assert.False(t, ok, "not offered by this driver")
	assert.Same(t, m, Decode(builders.NodePartition(nil, "", "", g)).GPUs[0].Model, "one model per GPU kind")

	decoded, err := Profiles(g.Profiles)
	require.NoError(t, err)
	assert.Equal(t, offered, decoded, "EncodeGPU and Profiles are inverses")

	g.Profiles[0].Starts = []int32{9}
	require.ErrorContains(t, Decode(builders.NodePartition(nil, "", "", g)).Err, "discovered profiles")
}

func TestSetLayoutsAndDesiredLayouts(t *testing.T) {
	obj := builders.NodePartition(nil, "", "")
	at := time.Date(2026, 11, 29, 15, 0, 0, 0, time.UTC)
	SetLayouts(obj, "p-9", at, map[int][]mig.Slice{1: {slice("7g.80gb", 0)}, 0: {}})
	assert.Equal(t, "p-9", obj.Spec.PlanID)
	assert.Equal(t, []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{}}, {Index: 1, Slices: []v1alpha1.Slice{{Profile: "7g.80gb"}}}}, obj.Spec.GPUs,
		"by index; an emptied GPU lists no slices (not null)")
	assert.Equal(t, at, Decode(obj).PlanTime)

	obj.Spec.GPUs = append(obj.Spec.GPUs, v1alpha1.GPULayout{Index: 2, Slices: []v1alpha1.Slice{{Profile: "7g"}}})
	layouts, errs := DesiredLayouts(obj)
	assert.Equal(t, map[int][]mig.Slice{0: {}, 1: {slice("7g.80gb", 0)}}, layouts)
	require.Len(t, errs, 1)
	assert.ErrorContains(t, errs[2], `invalid MIG profile "7g"`)
}
