package gpu

import (
	"fmt"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/google/uuid"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Simulator is a node's GPUs in software, on go-nvml's mock server, with
// the rules real NVML enforces and the mocks do not: placements and
// overlap (INSUFFICIENT_RESOURCES), per-profile max counts and media-engine
// exclusions, a GPU instance with compute instances or a compute instance
// with a process cannot be destroyed (IN_USE), nothing MIG works with MIG
// mode off (NOT_SUPPORTED). Profiles and placements come from the catalog;
// profile IDs are deliberately not NVML's, so that code that hard-codes
// them fails here. GPU-instance and compute-instance IDs are the lowest
// free ones, as NVML gives them: a destroyed instance's ID goes to the next
// instance created. MIG UUIDs are derived from (GPU, GPU instance, compute
// instance), so a new slice, of any profile, can carry the UUID of a
// destroyed one, as on real GPUs; never take a UUID for a slice's identity
// across a destroy. Faults and latency can be injected per method, and
// every change is logged.
//
// Its zero value is not usable; build it with NewSimulator.
type Simulator struct {
	srv *server.Server

	mu      sync.Mutex
	gpus    []*simGPU
	faults  map[string][]fault
	latency map[string]time.Duration
	calls   map[string]int
	ops     []Op
	now     func() time.Time
}

// Op is one change the simulator made: a slice created or destroyed.
type Op struct {
	Time  time.Time
	Kind  string // "create", "create-ci", "destroy-ci" or "destroy"
	GPU   int
	Slice mig.Slice
	UUID  string
}

// Methods that take faults and latency.
const (
	MethodCreateGPUInstance     = "CreateGpuInstanceWithPlacement"
	MethodCreateComputeInstance = "CreateComputeInstance"
	MethodDestroyGPUInstance    = "GpuInstance.Destroy"
	MethodDestroyComputeInst    = "ComputeInstance.Destroy"
	MethodGetGPUInstances       = "GetGpuInstances"
)

// FaultUnknown is NVML's ERROR_UNKNOWN, to inject with FailCall from
// packages that do not import go-nvml (only this package does).
const FaultUnknown = nvml.ERROR_UNKNOWN

type fault struct {
	nth int // 1-based call count, counted from when the fault was set
	ret nvml.Return
}

type simGPU struct {
	dev              *server.Device
	model            *mig.Model
	byID             map[uint32]int // profile ID → model profile index
	info             []nvml.GpuInstanceProfileInfo
	current, pending bool
	gis              []*simGI
}

type simGI struct {
	handle    *mock.GpuInstance
	gpu       *simGPU
	id        int
	profile   int
	start     int
	cis       []*simCI
	destroyed bool
}

type simCI struct {
	handle    *mock.ComputeInstance
	device    *mock.Device // the MIG device handle
	gi        *simGI
	id        int
	slices    int
	uuid      string
	processes int
	destroyed bool
}

// profileIDBase offsets simulated profile IDs from NVML's enum values (the
// mock servers use the enum as ID; real GPUs use other numbers again).
const profileIDBase = 100

// NewSimulator builds GPUs of the named catalog models ("A100-80GB",
// "H100-80GB", …), MIG mode on, no slices. seed makes GPU UUIDs
// deterministic: the same seed and index give the same UUID.
func NewSimulator(seed string, models ...string) (*Simulator, error) {
	s := &Simulator{faults: map[string][]fault{}, latency: map[string]time.Duration{}, calls: map[string]int{}, now: time.Now}
	configs := make([]gpus.Config, len(models))
	for i, name := range models {
		m, err := mig.ModelByName(name)
		if err != nil {
			return nil, fmt.Errorf("simulated gpu %d: %w", i, err)
		}
		configs[i] = gpus.Config{Name: m.NVMLNames[0], MemoryMB: uint64(m.MemoryMiB), PciDeviceId: m.PCIDeviceIDs[0]}
		g := &simGPU{model: m, byID: map[uint32]int{}, current: true, pending: true}
		for pi, p := range m.Profiles {
			enum, err := profileEnum(m, p)
			if err != nil {
				return nil, err
			}
			mem, err := memoryFor(p.Name, m.MemoryMiB)
			if err != nil {
				return nil, fmt.Errorf("model %s: %w", m.Name, err)
			}
			id := uint32(profileIDBase + enum)
			g.byID[id] = pi
			g.info = append(g.info, nvml.GpuInstanceProfileInfo{
				Id: id, SliceCount: uint32(p.ComputeSlices), InstanceCount: uint32(p.MaxCount), MemorySizeMB: uint64(mem),
			})
		}
		s.gpus = append(s.gpus, g)
	}
	s.srv = server.NewServerWithGPUs("580.95.05", "13.580.95.05", 13000, configs...)
	for i, g := range s.gpus {
		g.dev = s.srv.Devices[i].(*server.Device)
		g.dev.UUID = "GPU-" + uuid.NewSHA1(uuid.NameSpaceOID, fmt.Appendf(nil, "%s/%d", seed, i)).String()
		s.wireDevice(g)
	}
	byGPUUUID := s.srv.DeviceGetHandleByUUIDFunc
	s.srv.DeviceGetHandleByUUIDFunc = func(id string) (nvml.Device, nvml.Return) {
		// NVML takes the UUID of a MIG device that exists too.
		s.mu.Lock()
		_, ci := s.migDevice(id)
		s.mu.Unlock()
		if ci != nil {
			return ci.device, nvml.SUCCESS
		}
		return byGPUUUID(id)
	}
	return s, nil
}

// memoryFor is a profile memory size (MiB) that profileName turns back
// into the profile's name on a GPU of totalMiB.
func memoryFor(p mig.ProfileName, totalMiB int) (int, error) {
	totalGiB := math.Ceil(float64(totalMiB) / 1024)
	for eighths := 1; eighths <= 8; eighths++ {
		if int(math.Round(float64(eighths)/8*totalGiB)) == p.MemoryGB {
			return totalMiB*eighths/8 - totalMiB/64, nil
		}
	}
	return 0, fmt.Errorf("no memory size names %s on a GPU of %d MiB", p, totalMiB)
}

// Interface is the simulated NVML library, for Open.
func (s *Simulator) Interface() nvml.Interface { return s.srv }

// enter counts a call of method and returns the fault set for it, after
// its latency. It must be called without s.mu held.
func (s *Simulator) enter(method string) nvml.Return {
	s.mu.Lock()
	s.calls[method]++
	n := s.calls[method]
	delay := s.latency[method]
	ret := nvml.SUCCESS
	fs := s.faults[method]
	for i, f := range fs {
		if f.nth == n {
			ret = f.ret
			s.faults[method] = append(fs[:i:i], fs[i+1:]...)
			break
		}
	}
	s.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	return ret
}

// FailCall makes the nth call of method from now (1: the next) return ret.
func (s *Simulator) FailCall(method string, nth int, ret nvml.Return) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[method] = append(s.faults[method], fault{nth: s.calls[method] + nth, ret: ret})
}

// SetLatency makes every call of method take at least d.
func (s *Simulator) SetLatency(method string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency[method] = d
}

// SetMIGMode sets a GPU's current and pending MIG mode, as a reset would.
func (s *Simulator) SetMIGMode(gpu int, current, pending bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gpus[gpu].current, s.gpus[gpu].pending = current, pending
}

// SetProcess starts or stops a process on the MIG device with the UUID:
// while one runs, its compute instance cannot be destroyed (IN_USE), and
// only then. It fails for a UUID that names no MIG device now (a process
// cannot start on a destroyed slice), and for stopping a process that does
// not run.
func (s *Simulator) SetProcess(migUUID string, running bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ci := s.migDevice(migUUID)
	switch {
	case ci == nil:
		return fmt.Errorf("no MIG device %s", migUUID)
	case running:
		ci.processes++
	case ci.processes == 0:
		return fmt.Errorf("no process runs on MIG device %s", migUUID)
	default:
		ci.processes--
	}
	return nil
}

// MIGDevice finds the MIG device with the UUID now, as the container
// runtime resolves a device it is to hand to a container: the GPU and the
// slice of its GPU instance. It counts as no NVML call (takes no faults).
func (s *Simulator) MIGDevice(migUUID string) (gpu int, slice mig.Slice, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ci := s.migDevice(migUUID)
	if ci == nil {
		return 0, mig.Slice{}, false
	}
	gi := ci.gi
	return i, mig.Slice{Profile: gi.gpu.model.Profiles[gi.profile].Name, Start: gi.start}, true
}

// Processes counts the processes running on the MIG device with the
// UUID, as NVML's GetComputeRunningProcesses reports them; 0 for no such
// device. It counts as no NVML call.
func (s *Simulator) Processes(migUUID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ci := s.migDevice(migUUID); ci != nil {
		return ci.processes
	}
	return 0
}

// migDevice is the GPU index and compute instance of the MIG device with
// the UUID, nil if none exists; callers hold s.mu.
func (s *Simulator) migDevice(migUUID string) (int, *simCI) {
	for i, g := range s.gpus {
		for _, gi := range g.gis {
			for _, ci := range gi.cis {
				if ci.uuid == migUUID {
					return i, ci
				}
			}
		}
	}
	return 0, nil
}

// Reboot removes every slice (they do not survive a reboot) and applies
// pending MIG mode changes.
func (s *Simulator) Reboot() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.gpus {
		for _, gi := range g.gis {
			gi.destroyed = true
			for _, ci := range gi.cis {
				ci.destroyed = true
			}
		}
		g.gis = nil
		g.current = g.pending
	}
}

// Layout is a GPU's slices as the simulator holds them, in start order.
func (s *Simulator) Layout(gpu int) []mig.Slice {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.gpus[gpu]
	out := make([]mig.Slice, 0, len(g.gis))
	for _, gi := range g.gis {
		out = append(out, mig.Slice{Profile: g.model.Profiles[gi.profile].Name, Start: gi.start})
	}
	mig.SortSlices(out)
	return out
}

// Ops returns the log of changes, oldest first.
func (s *Simulator) Ops() []Op {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Op(nil), s.ops...)
}

func (s *Simulator) log(kind string, gi *simGI, ci *simCI) {
	op := Op{Time: s.now(), Kind: kind, GPU: gi.gpu.dev.Index, Slice: mig.Slice{Profile: gi.gpu.model.Profiles[gi.profile].Name, Start: gi.start}}
	if ci != nil {
		op.UUID = ci.uuid
	}
	s.ops = append(s.ops, op)
}

// occupancy is the GPU's layout state; callers hold s.mu.
func (g *simGPU) occupancy() mig.Occupancy {
	var o mig.Occupancy
	for _, gi := range g.gis {
		g.model.Add(&o, gi.profile, gi.start)
	}
	return o
}

func (s *Simulator) wireDevice(g *simGPU) {
	d := g.dev
	d.IsMigDeviceHandleFunc = func() (bool, nvml.Return) { return false, nvml.SUCCESS }
	d.GetMigModeFunc = func() (int, int, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		return migMode(g.current), migMode(g.pending), nvml.SUCCESS
	}
	d.SetMigModeFunc = func(mode int) (nvml.Return, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		g.pending = mode == nvml.DEVICE_MIG_ENABLE
		return nvml.SUCCESS, nvml.ERROR_RESET_REQUIRED
	}
	d.GetGpuInstanceProfileInfoFunc = func(enum int) (nvml.GpuInstanceProfileInfo, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !g.current {
			return nvml.GpuInstanceProfileInfo{}, nvml.ERROR_NOT_SUPPORTED
		}
		if enum < 0 || enum >= nvml.GPU_INSTANCE_PROFILE_COUNT {
			return nvml.GpuInstanceProfileInfo{}, nvml.ERROR_INVALID_ARGUMENT
		}
		for _, info := range g.info {
			if info.Id == uint32(profileIDBase+enum) {
				return info, nvml.SUCCESS
			}
		}
		return nvml.GpuInstanceProfileInfo{}, nvml.ERROR_NOT_SUPPORTED
	}
	d.GetGpuInstancePossiblePlacementsFunc = func(info *nvml.GpuInstanceProfileInfo) ([]nvml.GpuInstancePlacement, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		p, ret := g.profile(info)
		if ret != nvml.SUCCESS {
			return nil, ret
		}
		var out []nvml.GpuInstancePlacement
		for _, st := range p.Starts {
			out = append(out, nvml.GpuInstancePlacement{Start: uint32(st), Size: uint32(p.MemorySlices)})
		}
		return out, nvml.SUCCESS
	}
	d.GetGpuInstanceRemainingCapacityFunc = func(info *nvml.GpuInstanceProfileInfo) (int, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		p, ret := g.profile(info)
		if ret != nvml.SUCCESS {
			return 0, ret
		}
		o, pi := g.occupancy(), g.byID[info.Id]
		n := 0
		for _, st := range p.Starts {
			if g.model.CanAdd(&o, pi, st) {
				g.model.Add(&o, pi, st)
				n++
			}
		}
		return n, nvml.SUCCESS
	}
	d.CreateGpuInstanceWithPlacementFunc = func(info *nvml.GpuInstanceProfileInfo, pl *nvml.GpuInstancePlacement) (nvml.GpuInstance, nvml.Return) {
		if ret := s.enter(MethodCreateGPUInstance); ret != nvml.SUCCESS {
			return nil, ret
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		p, ret := g.profile(info)
		if ret != nvml.SUCCESS {
			return nil, ret
		}
		if int(pl.Size) != p.MemorySlices {
			return nil, nvml.ERROR_INVALID_ARGUMENT
		}
		return s.createGI(g, g.byID[info.Id], int(pl.Start))
	}
	d.CreateGpuInstanceFunc = func(info *nvml.GpuInstanceProfileInfo) (nvml.GpuInstance, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		p, ret := g.profile(info)
		if ret != nvml.SUCCESS {
			return nil, ret
		}
		o, pi := g.occupancy(), g.byID[info.Id]
		for _, st := range p.Starts {
			if g.model.CanAdd(&o, pi, st) {
				return s.createGI(g, pi, st)
			}
		}
		return nil, nvml.ERROR_INSUFFICIENT_RESOURCES
	}
	d.GetGpuInstancesFunc = func(info *nvml.GpuInstanceProfileInfo) ([]nvml.GpuInstance, nvml.Return) {
		if ret := s.enter(MethodGetGPUInstances); ret != nvml.SUCCESS {
			return nil, ret
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ret := g.profile(info); ret != nvml.SUCCESS {
			return nil, ret
		}
		var out []nvml.GpuInstance
		for _, gi := range g.gis {
			if gi.profile == g.byID[info.Id] {
				out = append(out, gi.handle)
			}
		}
		return out, nvml.SUCCESS
	}
	d.GetGpuInstanceByIdFunc = func(id int) (nvml.GpuInstance, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, gi := range g.gis {
			if gi.id == id {
				return gi.handle, nvml.SUCCESS
			}
		}
		return nil, nvml.ERROR_NOT_FOUND
	}
	d.GetMaxMigDeviceCountFunc = func() (int, nvml.Return) {
		return g.model.ComputeSlices, nvml.SUCCESS
	}
	d.GetMigDeviceHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if !g.current {
			return nil, nvml.ERROR_NOT_SUPPORTED
		}
		cis := g.migDevices()
		if i < 0 || i >= len(cis) {
			return nil, nvml.ERROR_NOT_FOUND
		}
		return cis[i].device, nvml.SUCCESS
	}
}

// migDevices are the GPU's MIG devices (compute instances) in the order
// of their indexes (GetMigDeviceHandleByIndex); callers hold s.mu.
func (g *simGPU) migDevices() []*simCI {
	var cis []*simCI
	for _, gi := range g.gis {
		cis = append(cis, gi.cis...)
	}
	sort.Slice(cis, func(a, b int) bool {
		if cis[a].gi.id != cis[b].gi.id {
			return cis[a].gi.id < cis[b].gi.id
		}
		return cis[a].id < cis[b].id
	})
	return cis
}

func migMode(on bool) int {
	if on {
		return nvml.DEVICE_MIG_ENABLE
	}
	return nvml.DEVICE_MIG_DISABLE
}

// profile checks that MIG is on and the info names one of the GPU's
// profiles; callers hold s.mu.
func (g *simGPU) profile(info *nvml.GpuInstanceProfileInfo) (*mig.Profile, nvml.Return) {
	if !g.current {
		return nil, nvml.ERROR_NOT_SUPPORTED
	}
	pi, ok := g.byID[info.Id]
	if !ok {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	return &g.model.Profiles[pi], nvml.SUCCESS
}

// createGI adds a GPU instance with the lowest free ID (1-based), as NVML
// does; callers hold s.mu.
func (s *Simulator) createGI(g *simGPU, pi, start int) (nvml.GpuInstance, nvml.Return) {
	if !containsStart(g.model.Profiles[pi].Starts, start) {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	o := g.occupancy()
	if !g.model.CanAdd(&o, pi, start) {
		return nil, nvml.ERROR_INSUFFICIENT_RESOURCES
	}
	taken := map[int]bool{}
	for _, other := range g.gis {
		taken[other.id] = true
	}
	id := lowestFree(taken, 1)
	gi := &simGI{handle: &mock.GpuInstance{}, gpu: g, id: id, profile: pi, start: start}
	s.wireGI(gi)
	g.gis = append(g.gis, gi)
	sort.Slice(g.gis, func(a, b int) bool { return g.gis[a].start < g.gis[b].start })
	s.log("create", gi, nil)
	return gi.handle, nvml.SUCCESS
}

// lowestFree is the smallest ID from first on that is not taken.
func lowestFree(taken map[int]bool, first int) int {
	id := first
	for taken[id] {
		id++
	}
	return id
}

func containsStart(starts []int, start int) bool {
	for _, s := range starts {
		if s == start {
			return true
		}
	}
	return false
}

// ciSlices are the compute-instance profile enums and their slice counts.
var ciSlices = map[int]int{
	nvml.COMPUTE_INSTANCE_PROFILE_1_SLICE: 1, nvml.COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
	nvml.COMPUTE_INSTANCE_PROFILE_3_SLICE: 3, nvml.COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
	nvml.COMPUTE_INSTANCE_PROFILE_7_SLICE: 7, nvml.COMPUTE_INSTANCE_PROFILE_8_SLICE: 8,
	nvml.COMPUTE_INSTANCE_PROFILE_6_SLICE: 6,
}

func (s *Simulator) wireGI(gi *simGI) {
	h, g := gi.handle, gi.gpu
	size := g.model.Profiles[gi.profile].ComputeSlices
	h.GetInfoFunc = func() (nvml.GpuInstanceInfo, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if gi.destroyed {
			return nvml.GpuInstanceInfo{}, nvml.ERROR_NOT_FOUND
		}
		p := g.model.Profiles[gi.profile]
		return nvml.GpuInstanceInfo{Device: g.dev, Id: uint32(gi.id), ProfileId: g.info[gi.profile].Id,
			Placement: nvml.GpuInstancePlacement{Start: uint32(gi.start), Size: uint32(p.MemorySlices)}}, nvml.SUCCESS
	}
	h.GetComputeInstanceProfileInfoFunc = func(enum, engine int) (nvml.ComputeInstanceProfileInfo, nvml.Return) {
		n, ok := ciSlices[enum]
		switch {
		case enum < 0 || enum >= nvml.COMPUTE_INSTANCE_PROFILE_COUNT:
			return nvml.ComputeInstanceProfileInfo{}, nvml.ERROR_INVALID_ARGUMENT
		case engine != nvml.COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED || !ok || n > size:
			return nvml.ComputeInstanceProfileInfo{}, nvml.ERROR_NOT_SUPPORTED
		}
		return nvml.ComputeInstanceProfileInfo{Id: uint32(profileIDBase + enum), SliceCount: uint32(n), InstanceCount: uint32(size / n)}, nvml.SUCCESS
	}
	h.GetComputeInstanceByIdFunc = func(id int) (nvml.ComputeInstance, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, ci := range gi.cis {
			if ci.id == id && !gi.destroyed {
				return ci.handle, nvml.SUCCESS
			}
		}
		return nil, nvml.ERROR_NOT_FOUND
	}
	h.CreateComputeInstanceFunc = func(info *nvml.ComputeInstanceProfileInfo) (nvml.ComputeInstance, nvml.Return) {
		if ret := s.enter(MethodCreateComputeInstance); ret != nvml.SUCCESS {
			return nil, ret
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if gi.destroyed {
			return nil, nvml.ERROR_NOT_FOUND
		}
		used := 0
		for _, ci := range gi.cis {
			used += ci.slices
		}
		if info.SliceCount == 0 || used+int(info.SliceCount) > size {
			return nil, nvml.ERROR_INSUFFICIENT_RESOURCES
		}
		taken := map[int]bool{}
		for _, ci := range gi.cis {
			taken[ci.id] = true
		}
		id := lowestFree(taken, 0) // compute-instance IDs are 0-based and reused too
		ci := &simCI{handle: &mock.ComputeInstance{}, device: &mock.Device{}, gi: gi, id: id, slices: int(info.SliceCount),
			uuid: "MIG-" + uuid.NewSHA1(uuid.NameSpaceOID, fmt.Appendf(nil, "%s/%d/%d", g.dev.UUID, gi.id, id)).String()}
		s.wireCI(ci, info.Id)
		gi.cis = append(gi.cis, ci)
		s.log("create-ci", gi, ci)
		return ci.handle, nvml.SUCCESS
	}
	h.GetComputeInstancesFunc = func(info *nvml.ComputeInstanceProfileInfo) ([]nvml.ComputeInstance, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if gi.destroyed {
			return nil, nvml.ERROR_NOT_FOUND
		}
		var out []nvml.ComputeInstance
		for _, ci := range gi.cis {
			if ci.slices == int(info.SliceCount) {
				out = append(out, ci.handle)
			}
		}
		return out, nvml.SUCCESS
	}
	h.DestroyFunc = func() nvml.Return {
		if ret := s.enter(MethodDestroyGPUInstance); ret != nvml.SUCCESS {
			return ret
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		switch {
		case gi.destroyed:
			return nvml.ERROR_NOT_FOUND
		case len(gi.cis) > 0:
			return nvml.ERROR_IN_USE
		}
		gi.destroyed = true
		for i, other := range g.gis {
			if other == gi {
				g.gis = append(g.gis[:i:i], g.gis[i+1:]...)
				break
			}
		}
		s.log("destroy", gi, nil)
		return nvml.SUCCESS
	}
}

func (s *Simulator) wireCI(ci *simCI, profileID uint32) {
	gi := ci.gi
	ci.handle.GetInfoFunc = func() (nvml.ComputeInstanceInfo, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if ci.destroyed {
			return nvml.ComputeInstanceInfo{}, nvml.ERROR_NOT_FOUND
		}
		return nvml.ComputeInstanceInfo{Device: gi.gpu.dev, GpuInstance: gi.handle, Id: uint32(ci.id), ProfileId: profileID}, nvml.SUCCESS
	}
	ci.handle.DestroyFunc = func() nvml.Return {
		if ret := s.enter(MethodDestroyComputeInst); ret != nvml.SUCCESS {
			return ret
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		switch {
		case ci.destroyed:
			return nvml.ERROR_NOT_FOUND
		case ci.processes > 0:
			return nvml.ERROR_IN_USE
		}
		ci.destroyed = true
		for i, other := range gi.cis {
			if other == ci {
				gi.cis = append(gi.cis[:i:i], gi.cis[i+1:]...)
				break
			}
		}
		s.log("destroy-ci", gi, ci)
		return nvml.SUCCESS
	}
	md := ci.device
	md.IsMigDeviceHandleFunc = func() (bool, nvml.Return) { return true, nvml.SUCCESS }
	md.GetUUIDFunc = func() (string, nvml.Return) { return ci.uuid, nvml.SUCCESS }
	md.GetGpuInstanceIdFunc = func() (int, nvml.Return) { return gi.id, nvml.SUCCESS }
	md.GetComputeInstanceIdFunc = func() (int, nvml.Return) { return ci.id, nvml.SUCCESS }
	md.GetDeviceHandleFromMigDeviceHandleFunc = func() (nvml.Device, nvml.Return) { return gi.gpu.dev, nvml.SUCCESS }
	md.GetAttributesFunc = func() (nvml.DeviceAttributes, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if ci.destroyed {
			return nvml.DeviceAttributes{}, nvml.ERROR_NOT_FOUND
		}
		p := gi.gpu.model.Profiles[gi.profile]
		return nvml.DeviceAttributes{GpuInstanceSliceCount: uint32(p.ComputeSlices), ComputeInstanceSliceCount: uint32(ci.slices),
			MemorySizeMB: gi.gpu.info[gi.profile].MemorySizeMB}, nvml.SUCCESS
	}
	md.GetIndexFunc = func() (int, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		for i, other := range gi.gpu.migDevices() {
			if other == ci {
				return i, nvml.SUCCESS
			}
		}
		return 0, nvml.ERROR_NOT_FOUND
	}
	md.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		s.mu.Lock()
		defer s.mu.Unlock()
		out := make([]nvml.ProcessInfo, ci.processes)
		for i := range out {
			out[i] = nvml.ProcessInfo{Pid: uint32(1000 + i), GpuInstanceId: uint32(gi.id), ComputeInstanceId: uint32(ci.id)}
		}
		return out, nvml.SUCCESS
	}
}
