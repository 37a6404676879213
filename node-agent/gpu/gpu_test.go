package gpu

import (
	"errors"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/google/go-cmp/cmp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dynamig/dynamig/pkg/mig"
)

func open(t *testing.T, models ...string) (*Simulator, *NVML) {
	t.Helper()
	sim, err := NewSimulator(t.Name(), models...)
	require.NoError(t, err)
	lib, err := Open(sim.Interface())
	require.NoError(t, err)
	t.Cleanup(func() { _ = lib.Close() })
	return sim, lib
}

func TestOpenWithoutDriver(t *testing.T) {
	_, err := OpenLibrary("/nonexistent/libnvidia-ml.so.1")
	require.ErrorIs(t, err, ErrLibraryNotFound)
	assert.Contains(t, err.Error(), "libnvidia-ml.so.1")
}

// Discovery on the simulator reproduces every catalog model: names as the
// device plugin computes them from NVML's memory sizes, placements and max
// counts — and the model is recognised from what NVML reports.
func TestDiscoveryMatchesCatalog(t *testing.T) {
	for _, m := range mig.Models() {
		t.Run(m.Name, func(t *testing.T) {
			_, lib := open(t, m.Name)
			gpus, err := lib.GPUs()
			require.NoError(t, err)
			require.Len(t, gpus, 1)
			g := gpus[0]
			assert.Equal(t, MIGMode{Current: true, Pending: true}, g.MIG)
			assert.Regexp(t, `^GPU-[0-9a-f-]{36}$`, g.UUID)
			byName, ok := mig.ModelByNVMLName(g.Name)
			require.True(t, ok, g.Name)
			byPCI, ok := mig.ModelByPCIDeviceID(g.PCIDeviceID)
			require.True(t, ok)
			assert.Equal(t, m.Name, byName.Name)
			assert.Equal(t, m.Name, byPCI.Name)

			got, err := lib.Profiles(0)
			require.NoError(t, err)
			var want, have []mig.Profile
			for _, p := range m.Profiles {
				want = append(want, p)
			}
			for _, p := range got {
				have = append(have, p.Profile)
			}
			sortProfiles(want)
			sortProfiles(have)
			if d := cmp.Diff(want, have, cmp.Comparer(func(a, b mig.ProfileName) bool { return a == b })); d != "" {
				t.Errorf("discovered profiles differ from the catalog (-catalog +discovered):\n%s", d)
			}
		})
	}
}

func sortProfiles(ps []mig.Profile) {
	for i := range ps {
		for j := i + 1; j < len(ps); j++ {
			if ps[j].Name.String() < ps[i].Name.String() {
				ps[i], ps[j] = ps[j], ps[i]
			}
		}
	}
}

// Every valid layout of A100-80GB and H100-80GB is created slice by slice
// at its placements, read back exactly with MIG UUIDs, and destroyed again,
// as mig-parted tests its apply on the mocks.
func TestRoundTripEveryLayout(t *testing.T) {
	for _, model := range []string{"A100-80GB", "H100-80GB"} {
		t.Run(model, func(t *testing.T) {
			sim, lib := open(t, model)
			m, err := mig.ModelByName(model)
			require.NoError(t, err)
			layouts := m.Layouts(nil)
			require.Len(t, layouts, 2318+1, "mig-facts §2.3: 2,318 placement layouts, plus the empty one")
			for _, layout := range layouts {
				uuids := map[string]bool{}
				for _, s := range layout {
					got, err := lib.Create(0, s.Profile, s.Start)
					require.NoError(t, err, "layout %v: creating %s", layout, s)
					require.Regexp(t, `^MIG-[0-9a-f-]{36}$`, got.UUID)
					uuids[got.UUID] = true
				}
				require.Len(t, uuids, len(layout), "layout %v: MIG UUIDs are not distinct", layout)
				slices, err := lib.Slices(0)
				require.NoError(t, err)
				require.Equal(t, sorted(layout), sorted(mig.LayoutOf(slices)), "layout read back")
				require.Equal(t, sorted(layout), sim.Layout(0))
				for _, s := range layout {
					require.NoError(t, lib.Destroy(0, s.Profile, s.Start), "layout %v: destroying %s", layout, s)
				}
				require.Empty(t, sim.Layout(0), "layout %v left slices", layout)
			}
		})
	}
}

func sorted(l []mig.Slice) []mig.Slice {
	out := append([]mig.Slice{}, l...)
	mig.SortSlices(out)
	return out
}

// The simulator refuses what real NVML refuses, and the boundary maps
// each refusal to a typed error naming the GPU and profile.
func TestSimulatorEnforcesNVMLRules(t *testing.T) {
	p := mig.MustParseProfile
	t.Run("overlap", func(t *testing.T) {
		_, lib := open(t, "A100-80GB")
		_, err := lib.Create(0, p("3g.40gb"), 0)
		require.NoError(t, err)
		_, err = lib.Create(0, p("2g.20gb"), 2)
		require.ErrorIs(t, err, ErrInsufficientResources)
		assert.Contains(t, err.Error(), "gpu 0: creating GPU instance 2g.20gb at 2")
		assert.Equal(t, "INSUFFICIENT_RESOURCES", Code(err))
	})
	t.Run("three 7g on one GPU", func(t *testing.T) {
		sim, lib := open(t, "H200-141GB")
		info := profileInfo(t, lib, p("7g.141gb"))
		d, _ := sim.Interface().DeviceGetHandleByIndex(0)
		_, ret := d.CreateGpuInstance(&info)
		require.Equal(t, nvml.SUCCESS, ret)
		_, ret = d.CreateGpuInstance(&info)
		require.Equal(t, nvml.ERROR_INSUFFICIENT_RESOURCES, ret, "go-nvml's mock says SUCCESS here")
		s, err := lib.Create(0, p("7g.141gb"), 0)
		require.NoError(t, err, "creating what exists completes it")
		assert.NotEmpty(t, s.UUID)
	})
	t.Run("max count and media engines", func(t *testing.T) {
		_, lib := open(t, "A100-80GB")
		_, err := lib.Create(0, p("1g.10gb+me"), 0)
		require.NoError(t, err)
		_, err = lib.Create(0, p("1g.10gb+me"), 1)
		require.ErrorIs(t, err, ErrInsufficientResources)
	})
	t.Run("bad placement", func(t *testing.T) {
		_, lib := open(t, "A100-80GB")
		_, err := lib.Create(0, p("3g.40gb"), 2)
		require.Error(t, err)
		assert.Equal(t, "INVALID_ARGUMENT", Code(err))
	})
	t.Run("unknown profile", func(t *testing.T) {
		_, lib := open(t, "A100-80GB")
		_, err := lib.Create(0, p("1g.18gb"), 0)
		require.ErrorIs(t, err, ErrNotSupported)
		assert.Contains(t, err.Error(), "gpu 0 offers no profile 1g.18gb")
	})
	t.Run("GPU instance with a compute instance", func(t *testing.T) {
		_, lib := open(t, "A100-80GB")
		s, err := lib.Create(0, p("1g.10gb"), 3)
		require.NoError(t, err)
		d, _ := lib.device(0)
		gi, ret := d.GetGpuInstanceById(s.GI)
		require.Equal(t, nvml.SUCCESS, ret)
		assert.Equal(t, nvml.ERROR_IN_USE, gi.Destroy(), "a GPU instance with a live compute instance")
	})
	t.Run("process on the slice", func(t *testing.T) {
		sim, lib := open(t, "A100-80GB")
		s, err := lib.Create(0, p("1g.10gb"), 3)
		require.NoError(t, err)
		require.NoError(t, sim.SetProcess(s.UUID, true))
		err = lib.Destroy(0, p("1g.10gb"), 3)
		require.ErrorIs(t, err, ErrInUse)
		assert.Contains(t, err.Error(), "gpu 0: destroying a compute instance of 1g.10gb at 3")
		assert.Equal(t, []mig.Slice{{Profile: p("1g.10gb"), Start: 3}}, sim.Layout(0))
		require.NoError(t, sim.SetProcess(s.UUID, false))
		require.NoError(t, lib.Destroy(0, p("1g.10gb"), 3))
		require.NoError(t, lib.Destroy(0, p("1g.10gb"), 3), "destroying what is gone is a no-op")
	})
	t.Run("MIG mode off", func(t *testing.T) {
		sim, lib := open(t, "A100-80GB", "A100-80GB")
		sim.SetMIGMode(1, false, true)
		gpus, err := lib.GPUs()
		require.NoError(t, err)
		assert.Equal(t, MIGMode{Current: false, Pending: true}, gpus[1].MIG)
		_, err = lib.Profiles(1)
		require.ErrorIs(t, err, ErrNotSupported)
		_, err = lib.Profiles(0)
		require.NoError(t, err)
	})
}

func profileInfo(t *testing.T, lib *NVML, name mig.ProfileName) nvml.GpuInstanceProfileInfo {
	_, ps, err := lib.discovered(0)
	require.NoError(t, err)
	pr, err := find(0, ps, name)
	require.NoError(t, err)
	return pr.info
}

func TestComputeInstanceFailureRollsBack(t *testing.T) {
	sim, lib := open(t, "H100-80GB")
	sim.FailCall(MethodCreateComputeInstance, 1, nvml.ERROR_UNKNOWN)
	_, err := lib.Create(0, mig.MustParseProfile("2g.20gb"), 2)
	require.Error(t, err)
	assert.Equal(t, "UNKNOWN", Code(err))
	assert.Empty(t, sim.Layout(0), "the GPU instance is rolled back")

	sim.FailCall(MethodCreateComputeInstance, 1, nvml.ERROR_UNKNOWN)
	sim.FailCall(MethodDestroyGPUInstance, 1, nvml.ERROR_IN_USE)
	_, err = lib.Create(0, mig.MustParseProfile("2g.20gb"), 2)
	require.ErrorIs(t, err, ErrInUse, "the failed rollback is reported too")
	assert.Contains(t, err.Error(), "rolling the GPU instance back failed too")
	// What is left is a GPU instance without compute instance; creating it
	// again completes it.
	slices, err := lib.Slices(0)
	require.NoError(t, err)
	require.Len(t, slices, 1)
	assert.Equal(t, -1, slices[0].CI)
	s, err := lib.Create(0, mig.MustParseProfile("2g.20gb"), 2)
	require.NoError(t, err)
	assert.NotEmpty(t, s.UUID)
}

func TestRebootAndStableUUIDs(t *testing.T) {
	sim, lib := open(t, "A30")
	gpusBefore, err := lib.GPUs()
	require.NoError(t, err)
	a, err := lib.Create(0, mig.MustParseProfile("2g.12gb"), 2)
	require.NoError(t, err)
	sim.Reboot()
	slices, err := lib.Slices(0)
	require.NoError(t, err)
	assert.Empty(t, slices, "MIG slices do not survive a reboot")
	b, err := lib.Create(0, mig.MustParseProfile("2g.12gb"), 2)
	require.NoError(t, err)
	assert.Equal(t, a.UUID, b.UUID, "same GPU, GPU instance and compute instance: same MIG UUID")
	gpusAfter, err := lib.GPUs()
	require.NoError(t, err)
	assert.Equal(t, gpusBefore, gpusAfter)
	again, err := NewSimulator(t.Name(), "A30")
	require.NoError(t, err)
	d, _ := again.Interface().DeviceGetHandleByIndex(0)
	uuid, _ := d.GetUUID()
	assert.Equal(t, gpusBefore[0].UUID, uuid, "same seed, same GPU UUID")
}

// NVML gives a new GPU instance the lowest free ID, so a destroyed
// slice's ID goes to the next slice created, whatever its profile, and
// with it the MIG UUID (derived from GPU, GPU instance and compute
// instance here; real NVML may repeat UUIDs too). A UUID is no identity
// across a destroy.
func TestInstanceIDsAreReused(t *testing.T) {
	p := mig.MustParseProfile
	_, lib := open(t, "A100-80GB")
	a, err := lib.Create(0, p("1g.10gb"), 0)
	require.NoError(t, err)
	b, err := lib.Create(0, p("1g.10gb"), 1)
	require.NoError(t, err)
	assert.Equal(t, []int{1, 2}, []int{a.GI, b.GI}, "IDs from 1, lowest free")
	require.NoError(t, lib.Destroy(0, p("1g.10gb"), 0))

	c, err := lib.Create(0, p("3g.40gb"), 4)
	require.NoError(t, err)
	assert.Equal(t, a.GI, c.GI, "the destroyed slice's GPU-instance ID is reused")
	assert.Equal(t, a.CI, c.CI)
	assert.Equal(t, a.UUID, c.UUID, "and so its MIG UUID, now for a 3g.40gb")
	assert.NotEqual(t, b.UUID, c.UUID)

	d, err := lib.Create(0, p("1g.10gb"), 0)
	require.NoError(t, err)
	assert.Equal(t, 3, d.GI, "no free ID below 3")
	require.NoError(t, lib.Destroy(0, p("1g.10gb"), 1))
	e, err := lib.Create(0, p("2g.20gb"), 2)
	require.NoError(t, err)
	assert.Equal(t, b.GI, e.GI)
	assert.Equal(t, b.UUID, e.UUID)
}

// Compute-instance IDs within a GPU instance are reused lowest-free too,
// from 0.
func TestComputeInstanceIDsAreReused(t *testing.T) {
	sim, lib := open(t, "A100-80GB")
	info := profileInfo(t, lib, mig.MustParseProfile("7g.80gb"))
	d, _ := sim.Interface().DeviceGetHandleByIndex(0)
	gi, ret := d.CreateGpuInstance(&info)
	require.Equal(t, nvml.SUCCESS, ret)
	ciInfo, ret := gi.GetComputeInstanceProfileInfo(nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
	require.Equal(t, nvml.SUCCESS, ret)
	var cis []nvml.ComputeInstance
	for range 3 {
		ci, ret := gi.CreateComputeInstance(&ciInfo)
		require.Equal(t, nvml.SUCCESS, ret)
		cis = append(cis, ci)
	}
	id := func(ci nvml.ComputeInstance) uint32 {
		t.Helper()
		info, ret := ci.GetInfo()
		require.Equal(t, nvml.SUCCESS, ret)
		return info.Id
	}
	assert.Equal(t, []uint32{0, 1, 2}, []uint32{id(cis[0]), id(cis[1]), id(cis[2])})
	require.Equal(t, nvml.SUCCESS, cis[1].Destroy())
	again, ret := gi.CreateComputeInstance(&ciInfo)
	require.Equal(t, nvml.SUCCESS, ret)
	assert.Equal(t, uint32(1), id(again), "the destroyed compute instance's ID is reused")
	_, ret = cis[1].GetInfo()
	assert.Equal(t, nvml.ERROR_NOT_FOUND, ret, "the old handle stays gone")
	assert.Equal(t, nvml.ERROR_IN_USE, gi.Destroy(), "a GPU instance with compute instances")
}

// IN_USE on destroying a compute instance holds exactly while a process
// runs on it; a process cannot start on a device that does not exist, and
// stopping one that does not run is an error, not a no-op.
func TestProcessesAndInUse(t *testing.T) {
	p := mig.MustParseProfile
	sim, lib := open(t, "A100-80GB")
	s, err := lib.Create(0, p("2g.20gb"), 2)
	require.NoError(t, err)
	require.Error(t, sim.SetProcess(s.UUID, false), "no process runs yet")
	require.NoError(t, sim.SetProcess(s.UUID, true))
	require.NoError(t, sim.SetProcess(s.UUID, true))
	require.NoError(t, sim.SetProcess(s.UUID, false))
	require.ErrorIs(t, lib.Destroy(0, p("2g.20gb"), 2), ErrInUse, "one process still runs")
	assert.Equal(t, 1, sim.Processes(s.UUID))
	require.NoError(t, sim.SetProcess(s.UUID, false))
	assert.Zero(t, sim.Processes(s.UUID))
	require.NoError(t, lib.Destroy(0, p("2g.20gb"), 2), "free once the last process stops")
	err = sim.SetProcess(s.UUID, true)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no MIG device "+s.UUID)
}

func TestCodes(t *testing.T) {
	assert.Equal(t, "", Code(errors.New("plain")))
	assert.Equal(t, "IN_USE", Code(call(nvml.ERROR_IN_USE, "x")))
	assert.Equal(t, "12345", Code(call(nvml.Return(12345), "x")))
	assert.NoError(t, call(nvml.SUCCESS, "x"))
}
