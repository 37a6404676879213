package gpu

import (
	"fmt"
	"math"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/dynamig/dynamig/pkg/mig"
)

// variants maps NVML's GPU-instance profile enum to the name suffix the
// device plugin gives it (go-nvlib: REV1 → "+me", ALL_ME → "+me.all",
// NO_ME → "-me", GFX → "+gfx"; REV2, the double-memory 1g, has none).
// Enums not listed are plain profiles.
var variants = map[int]mig.Variant{
	nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV1:   mig.VariantME,
	nvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1:   mig.VariantME,
	nvml.GPU_INSTANCE_PROFILE_1_SLICE_GFX:    mig.VariantGFX,
	nvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX:    mig.VariantGFX,
	nvml.GPU_INSTANCE_PROFILE_3_SLICE_GFX:    mig.VariantGFX,
	nvml.GPU_INSTANCE_PROFILE_4_SLICE_GFX:    mig.VariantGFX,
	nvml.GPU_INSTANCE_PROFILE_1_SLICE_NO_ME:  mig.VariantNoME,
	nvml.GPU_INSTANCE_PROFILE_2_SLICE_NO_ME:  mig.VariantNoME,
	nvml.GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: mig.VariantMEAll,
	nvml.GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: mig.VariantMEAll,
}

// plainEnums is the plain profile enum per compute-slice count.
var plainEnums = map[int]int{
	1: nvml.GPU_INSTANCE_PROFILE_1_SLICE,
	2: nvml.GPU_INSTANCE_PROFILE_2_SLICE,
	3: nvml.GPU_INSTANCE_PROFILE_3_SLICE,
	4: nvml.GPU_INSTANCE_PROFILE_4_SLICE,
	6: nvml.GPU_INSTANCE_PROFILE_6_SLICE,
	7: nvml.GPU_INSTANCE_PROFILE_7_SLICE,
	8: nvml.GPU_INSTANCE_PROFILE_8_SLICE,
}

// profileName names a profile as go-nvlib (and so the device plugin and
// GPU Feature Discovery) does: the memory is the profile's share of the
// GPU rounded up to eighths, times the GPU's memory in whole GiB, rounded.
// On an A100-80GB (81920 MiB) a 1-slice profile of 9728 MiB is "1g.10gb".
func profileName(enum, computeSlices int, memoryMiB, totalMiB uint64) (mig.ProfileName, error) {
	if totalMiB == 0 || memoryMiB == 0 {
		return mig.ProfileName{}, fmt.Errorf("profile enum %d: memory %d MiB of %d MiB", enum, memoryMiB, totalMiB)
	}
	share := math.Ceil(float64(memoryMiB)/float64(totalMiB)*8) / 8
	totalGiB := math.Ceil(float64(totalMiB) / 1024)
	p := mig.ProfileName{Compute: computeSlices, MemoryGB: int(math.Round(share * totalGiB)), Variant: variants[enum]}
	// Round-trip through the parser: the name must be one the device plugin
	// can advertise and the CRD accepts.
	return mig.ParseProfile(p.String())
}

// profileEnum is the NVML enum of a catalog profile of a model: the
// variant's enum for its compute slices, REV2 for a 1-slice plain profile
// with more memory slices than the model's smallest 1-slice profile.
func profileEnum(m *mig.Model, p mig.Profile) (int, error) {
	for enum, v := range variants {
		if v == p.Name.Variant && p.Name.Variant != mig.VariantNone && enumSlices(enum) == p.ComputeSlices {
			return enum, nil
		}
	}
	if p.Name.Variant == mig.VariantNone {
		if p.ComputeSlices == 1 && p.MemorySlices > smallestOneSlice(m) {
			return nvml.GPU_INSTANCE_PROFILE_1_SLICE_REV2, nil
		}
		if enum, ok := plainEnums[p.ComputeSlices]; ok {
			return enum, nil
		}
	}
	return 0, fmt.Errorf("model %s: no NVML profile enum for %s", m.Name, p.Name)
}

// enumSlices is the compute-slice count an enum's name states.
func enumSlices(enum int) int {
	switch enum {
	case nvml.GPU_INSTANCE_PROFILE_2_SLICE_REV1, nvml.GPU_INSTANCE_PROFILE_2_SLICE_GFX,
		nvml.GPU_INSTANCE_PROFILE_2_SLICE_NO_ME, nvml.GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME:
		return 2
	case nvml.GPU_INSTANCE_PROFILE_3_SLICE_GFX:
		return 3
	case nvml.GPU_INSTANCE_PROFILE_4_SLICE_GFX:
		return 4
	}
	for c, e := range plainEnums {
		if e == enum {
			return c
		}
	}
	return 1
}

func smallestOneSlice(m *mig.Model) int {
	least := math.MaxInt
	for _, p := range m.Profiles {
		if p.ComputeSlices == 1 && p.Name.Variant == mig.VariantNone {
			least = min(least, p.MemorySlices)
		}
	}
	return least
}
