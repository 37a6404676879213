package gpu

import (
	"errors"
	"fmt"
	"sort"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/dynamig/dynamig/pkg/mig"
)

// NVML implements Lib on an nvml.Interface: the driver's library
// (nvml.New()) or a Simulator.
type NVML struct {
	lib nvml.Interface

	mu       sync.Mutex
	profiles map[string][]profile // discovered profiles by GPU UUID, while MIG mode is on
}

var _ Lib = &NVML{}

// profile is a discovered profile with the NVML info that creates it.
type profile struct {
	Profile
	info nvml.GpuInstanceProfileInfo
}

// Open initialises NVML. Without the driver's library it fails with
// ErrLibraryNotFound, without crashing: go-nvml loads it at Init.
func Open(lib nvml.Interface) (*NVML, error) {
	if ret := lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
			return nil, ErrLibraryNotFound
		}
		return nil, call(ret, "initialising NVML")
	}
	return &NVML{lib: lib, profiles: map[string][]profile{}}, nil
}

// OpenLibrary opens the driver's NVML library: at path, or found by the
// dynamic linker if path is empty.
func OpenLibrary(path string) (*NVML, error) {
	var opts []nvml.LibraryOption
	if path != "" {
		opts = append(opts, nvml.WithLibraryPath(path))
	}
	return Open(nvml.New(opts...))
}

// Interface is the nvml.Interface the GPUs are read through.
func (n *NVML) Interface() nvml.Interface { return n.lib }

// Close shuts NVML down.
func (n *NVML) Close() error {
	return call(n.lib.Shutdown(), "shutting NVML down")
}

// GPUs lists the GPUs that support MIG, in index order.
func (n *NVML) GPUs() ([]GPU, error) {
	count, ret := n.lib.DeviceGetCount()
	if err := call(ret, "counting GPUs"); err != nil {
		return nil, err
	}
	var out []GPU
	for i := range count {
		d, err := n.device(i)
		if err != nil {
			return nil, err
		}
		current, pending, ret := d.GetMigMode()
		if ret == nvml.ERROR_NOT_SUPPORTED {
			continue // not a MIG-capable GPU
		}
		if err := call(ret, "gpu %d: reading MIG mode", i); err != nil {
			return nil, err
		}
		g := GPU{Index: i, MIG: MIGMode{Current: current == nvml.DEVICE_MIG_ENABLE, Pending: pending == nvml.DEVICE_MIG_ENABLE}}
		if g.UUID, ret = d.GetUUID(); ret != nvml.SUCCESS {
			return nil, call(ret, "gpu %d: reading UUID", i)
		}
		if g.Name, ret = d.GetName(); ret != nvml.SUCCESS {
			return nil, call(ret, "gpu %d: reading name", i)
		}
		pci, ret := d.GetPciInfo()
		if err := call(ret, "gpu %d: reading PCI info", i); err != nil {
			return nil, err
		}
		g.PCIDeviceID = pci.PciDeviceId
		mem, ret := d.GetMemoryInfo()
		if err := call(ret, "gpu %d: reading memory size", i); err != nil {
			return nil, err
		}
		g.MemoryMiB = int(mem.Total >> 20)
		if !g.MIG.Current {
			n.mu.Lock()
			delete(n.profiles, g.UUID) // profiles are only valid for one MIG mode session
			n.mu.Unlock()
		}
		out = append(out, g)
	}
	return out, nil
}

func (n *NVML) device(gpu int) (nvml.Device, error) {
	d, ret := n.lib.DeviceGetHandleByIndex(gpu)
	if err := call(ret, "gpu %d: getting its handle", gpu); err != nil {
		return nil, err
	}
	return d, nil
}

// Profiles returns the GPU's profiles, discovered once per MIG mode
// session (NVML's profile info is immutable while the mode lasts).
func (n *NVML) Profiles(gpu int) ([]Profile, error) {
	_, ps, err := n.discovered(gpu)
	if err != nil {
		return nil, err
	}
	out := make([]Profile, len(ps))
	for i, p := range ps {
		out[i] = p.Profile
		out[i].Starts = append([]int(nil), p.Starts...)
	}
	return out, nil
}

func (n *NVML) discovered(gpu int) (nvml.Device, []profile, error) {
	d, err := n.device(gpu)
	if err != nil {
		return nil, nil, err
	}
	uuid, ret := d.GetUUID()
	if err := call(ret, "gpu %d: reading UUID", gpu); err != nil {
		return nil, nil, err
	}
	n.mu.Lock()
	ps, ok := n.profiles[uuid]
	n.mu.Unlock()
	if ok {
		return d, ps, nil
	}
	if ps, err = discover(gpu, d); err != nil {
		return nil, nil, err
	}
	n.mu.Lock()
	n.profiles[uuid] = ps
	n.mu.Unlock()
	return d, ps, nil
}

// discover walks NVML's profile enum, skipping the profiles the GPU does
// not offer, and reads each profile's possible placements.
func discover(gpu int, d nvml.Device) ([]profile, error) {
	current, _, ret := d.GetMigMode()
	if err := call(ret, "gpu %d: reading MIG mode", gpu); err != nil {
		return nil, err
	}
	if current != nvml.DEVICE_MIG_ENABLE {
		return nil, fmt.Errorf("gpu %d: MIG mode is off: %w", gpu, ErrNotSupported)
	}
	mem, ret := d.GetMemoryInfo()
	if err := call(ret, "gpu %d: reading memory size", gpu); err != nil {
		return nil, err
	}
	var out []profile
	seen := map[mig.ProfileName]int{}
	for enum := range nvml.GPU_INSTANCE_PROFILE_COUNT {
		info, ret := d.GetGpuInstanceProfileInfo(enum)
		if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if err := call(ret, "gpu %d: reading GPU-instance profile %d", gpu, enum); err != nil {
			return nil, err
		}
		name, err := profileName(enum, int(info.SliceCount), info.MemorySizeMB, mem.Total>>20)
		if err != nil {
			return nil, fmt.Errorf("gpu %d: naming GPU-instance profile %d: %w", gpu, enum, err)
		}
		if other, dup := seen[name]; dup {
			return nil, fmt.Errorf("gpu %d: GPU-instance profiles %d and %d are both named %s", gpu, other, enum, name)
		}
		seen[name] = enum
		placements, ret := d.GetGpuInstancePossiblePlacements(&info)
		if err := call(ret, "gpu %d: reading the placements of %s", gpu, name); err != nil {
			return nil, err
		}
		if len(placements) == 0 {
			continue
		}
		p := profile{info: info, Profile: Profile{Profile: mig.Profile{
			Name: name, ComputeSlices: int(info.SliceCount), MemorySlices: int(placements[0].Size),
			MaxCount: int(info.InstanceCount),
		}, MemoryMiB: int(info.MemorySizeMB)}}
		for _, pl := range placements {
			p.Starts = append(p.Starts, int(pl.Start))
		}
		sort.Ints(p.Starts)
		out = append(out, p)
	}
	return out, nil
}

func find(gpu int, ps []profile, name mig.ProfileName) (profile, error) {
	for _, p := range ps {
		if p.Name == name {
			return p, nil
		}
	}
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = p.Name.String()
	}
	return profile{}, fmt.Errorf("gpu %d offers no profile %s (it offers %v): %w", gpu, name, names, ErrNotSupported)
}

// Slices lists the GPU instances on the GPU, in placement order, with
// their compute instances and MIG device UUIDs.
func (n *NVML) Slices(gpu int) ([]Slice, error) {
	d, ps, err := n.discovered(gpu)
	if err != nil {
		return nil, err
	}
	devices, err := migDevices(gpu, d)
	if err != nil {
		return nil, err
	}
	var out []Slice
	for _, p := range ps {
		gis, ret := d.GetGpuInstances(&p.info)
		if err := call(ret, "gpu %d: listing %s instances", gpu, p.Name); err != nil {
			return nil, err
		}
		for _, gi := range gis {
			s, err := slice(gpu, p, gi, devices)
			if err != nil {
				return nil, err
			}
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start < out[j].Start })
	return out, nil
}

// migDevice is a MIG device handle's identity.
type migDevice struct {
	uuid  string
	index int
}

// migDevices maps (GPU instance, compute instance) to MIG device UUID and
// enumeration index, walking the GPU's MIG device handles as the device
// plugin does.
func migDevices(gpu int, d nvml.Device) (map[[2]int]migDevice, error) {
	count, ret := d.GetMaxMigDeviceCount()
	if err := call(ret, "gpu %d: reading the MIG device count", gpu); err != nil {
		return nil, err
	}
	out := map[[2]int]migDevice{}
	for i := range count {
		md, ret := d.GetMigDeviceHandleByIndex(i)
		if ret == nvml.ERROR_NOT_FOUND || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if err := call(ret, "gpu %d: getting MIG device %d", gpu, i); err != nil {
			return nil, err
		}
		gi, ret := md.GetGpuInstanceId()
		if err := call(ret, "gpu %d: MIG device %d: reading its GPU instance", gpu, i); err != nil {
			return nil, err
		}
		ci, ret := md.GetComputeInstanceId()
		if err := call(ret, "gpu %d: MIG device %d: reading its compute instance", gpu, i); err != nil {
			return nil, err
		}
		uuid, ret := md.GetUUID()
		if err := call(ret, "gpu %d: MIG device %d: reading its UUID", gpu, i); err != nil {
			return nil, err
		}
		out[[2]int{gi, ci}] = migDevice{uuid: uuid, index: i}
	}
	return out, nil
}

// slice describes a GPU instance: its placement, its full-size compute
// instance (one whose slice count is the GPU instance's) and any other.
func slice(gpu int, p profile, gi nvml.GpuInstance, devices map[[2]int]migDevice) (Slice, error) {
	info, ret := gi.GetInfo()
	if err := call(ret, "gpu %d: reading a %s instance", gpu, p.Name); err != nil {
		return Slice{}, err
	}
	s := Slice{Slice: mig.Slice{Profile: p.Name, Start: int(info.Placement.Start)}, GI: int(info.Id), CI: -1, MIGIndex: -1}
	err := computeInstances(gpu, p, gi, func(ciProfile nvml.ComputeInstanceProfileInfo, ci nvml.ComputeInstance) error {
		ciInfo, ret := ci.GetInfo()
		if err := call(ret, "gpu %d: reading a compute instance of %s@%d", gpu, p.Name, s.Start); err != nil {
			return err
		}
		if ciProfile.SliceCount != p.info.SliceCount || s.CI >= 0 {
			s.OtherComputeInstances++
			return nil
		}
		s.CI = int(ciInfo.Id)
		if md, ok := devices[[2]int{s.GI, s.CI}]; ok {
			s.UUID, s.MIGIndex = md.uuid, md.index
		}
		return nil
	})
	return s, err
}

// computeInstances calls visit for each compute instance of a GPU
// instance, walking the compute-instance profile enum.
func computeInstances(gpu int, p profile, gi nvml.GpuInstance, visit func(nvml.ComputeInstanceProfileInfo, nvml.ComputeInstance) error) error {
	for enum := range nvml.COMPUTE_INSTANCE_PROFILE_COUNT {
		ciProfile, ret := gi.GetComputeInstanceProfileInfo(enum, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		if ret == nvml.ERROR_NOT_SUPPORTED || ret == nvml.ERROR_INVALID_ARGUMENT {
			continue
		}
		if err := call(ret, "gpu %d: reading compute-instance profile %d of %s", gpu, enum, p.Name); err != nil {
			return err
		}
		cis, ret := gi.GetComputeInstances(&ciProfile)
		if err := call(ret, "gpu %d: listing the compute instances of %s", gpu, p.Name); err != nil {
			return err
		}
		for _, ci := range cis {
			if err := visit(ciProfile, ci); err != nil {
				return err
			}
		}
	}
	return nil
}

// instanceAt finds the GPU instance of a profile at a placement start.
func instanceAt(gpu int, d nvml.Device, p profile, start int) (nvml.GpuInstance, error) {
	gis, ret := d.GetGpuInstances(&p.info)
	if err := call(ret, "gpu %d: listing %s instances", gpu, p.Name); err != nil {
		return nil, err
	}
	for _, gi := range gis {
		info, ret := gi.GetInfo()
		if err := call(ret, "gpu %d: reading a %s instance", gpu, p.Name); err != nil {
			return nil, err
		}
		if int(info.Placement.Start) == start {
			return gi, nil
		}
	}
	return nil, nil
}

// Create makes the slice at an explicit placement (never letting the
// driver choose), then its full-size compute instance, and reads it back.
// A compute instance that cannot be created rolls the GPU instance back.
func (n *NVML) Create(gpu int, name mig.ProfileName, start int) (Slice, error) {
	d, ps, err := n.discovered(gpu)
	if err != nil {
		return Slice{}, err
	}
	p, err := find(gpu, ps, name)
	if err != nil {
		return Slice{}, err
	}
	gi, err := instanceAt(gpu, d, p, start)
	if err != nil {
		return Slice{}, err
	}
	fresh := gi == nil
	if fresh {
		placement := nvml.GpuInstancePlacement{Start: uint32(start), Size: uint32(p.MemorySlices)}
		var ret nvml.Return
		gi, ret = d.CreateGpuInstanceWithPlacement(&p.info, &placement)
		if err := call(ret, "gpu %d: creating GPU instance %s at %d", gpu, name, start); err != nil {
			return Slice{}, err
		}
	}
	if err := ensureComputeInstance(gpu, p, gi, start); err != nil {
		if fresh {
			if rb := errorOf(gi.Destroy()); rb != nil {
				return Slice{}, fmt.Errorf("%w; rolling the GPU instance back failed too: %w", err, rb)
			}
		}
		return Slice{}, err
	}
	slices, err := n.Slices(gpu)
	if err != nil {
		return Slice{}, err
	}
	for _, s := range slices {
		if s.Profile == name && s.Start == start && s.CI >= 0 {
			return s, nil
		}
	}
	return Slice{}, fmt.Errorf("gpu %d: created %s at %d, but NVML does not list it", gpu, name, start)
}

// ensureComputeInstance creates the GPU instance's full-size compute
// instance unless it has one.
func ensureComputeInstance(gpu int, p profile, gi nvml.GpuInstance, start int) error {
	var full *nvml.ComputeInstanceProfileInfo
	has := false
	err := computeInstances(gpu, p, gi, func(ciProfile nvml.ComputeInstanceProfileInfo, _ nvml.ComputeInstance) error {
		has = has || ciProfile.SliceCount == p.info.SliceCount
		return nil
	})
	if err != nil || has {
		return err
	}
	for enum := range nvml.COMPUTE_INSTANCE_PROFILE_COUNT {
		ciProfile, ret := gi.GetComputeInstanceProfileInfo(enum, nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
		if ret == nvml.SUCCESS && ciProfile.SliceCount == p.info.SliceCount {
			full = &ciProfile
			break
		}
	}
	if full == nil {
		return fmt.Errorf("gpu %d: %s at %d has no full-size compute-instance profile: %w", gpu, p.Name, start, ErrNotSupported)
	}
	_, ret := gi.CreateComputeInstance(full)
	return call(ret, "gpu %d: creating the compute instance of %s at %d", gpu, p.Name, start)
}

// Destroy removes a slice's compute instances, then its GPU instance.
// NVML refuses with ErrInUse while a process runs on it; NOT_FOUND means
// someone else removed it first, which is what was wanted.
func (n *NVML) Destroy(gpu int, name mig.ProfileName, start int) error {
	d, ps, err := n.discovered(gpu)
	if err != nil {
		return err
	}
	p, err := find(gpu, ps, name)
	if err != nil {
		return err
	}
	gi, err := instanceAt(gpu, d, p, start)
	if err != nil || gi == nil {
		return err
	}
	err = computeInstances(gpu, p, gi, func(_ nvml.ComputeInstanceProfileInfo, ci nvml.ComputeInstance) error {
		if err := errorOf(ci.Destroy()); err != nil && !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("gpu %d: destroying a compute instance of %s at %d: %w", gpu, name, start, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := errorOf(gi.Destroy()); err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("gpu %d: destroying GPU instance %s at %d: %w", gpu, name, start, err)
	}
	return nil
}
