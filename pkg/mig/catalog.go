package mig

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
)

// Model is a MIG-capable GPU model: its identity and its GPU-instance
// profiles with their placements. Placements and sizes are in memory-slice
// units, as NVML reports them (nvmlGpuInstancePlacement_t).
type Model struct {
	Name          string   // catalog name, e.g. "A100-80GB"
	Aliases       []string // other names accepted by ModelByName
	NVMLNames     []string // nvmlDeviceGetName, e.g. "NVIDIA A100 80GB PCIe"
	PCIDeviceIDs  []uint32 // nvmlPciInfo.pciDeviceId: device<<16 | 0x10DE
	MemoryMiB     int      // total memory as nvidia-smi reports it
	ComputeSlices int
	MemorySlices  int
	// PlacementsInferred is true where no real placement listing was found
	// for the model and the family pattern is used instead (mig-facts.md §1.7–1.10).
	// The node agent's NVML discovery overrides the catalog at run time.
	PlacementsInferred bool
	Profiles           []Profile

	index    map[ProfileName]int
	excludes [maxProfiles]uint16 // bit j of excludes[i]: profiles i and j cannot share a GPU
}

// Profile is one GPU-instance profile of a model.
type Profile struct {
	Name          ProfileName
	ComputeSlices int
	MemorySlices  int   // placement size
	MaxCount      int   // nvmlGpuInstanceProfileInfo.instanceCount
	Starts        []int // possible placement starts, ascending
}

// maxProfiles bounds the number of profiles of one model (RTX PRO 6000 has
// 11); maxMemorySlices the memory-slice axis (8 on every MIG GPU so far).
const (
	maxProfiles     = 16
	maxMemorySlices = 8
)

// ProfileIndex returns the index of a profile in m.Profiles.
func (m *Model) ProfileIndex(p ProfileName) (int, bool) {
	i, ok := m.index[p]
	return i, ok
}

func (m *Model) profileList() string {
	names := make([]string, len(m.Profiles))
	for i, p := range m.Profiles {
		names[i] = p.Name.String()
	}
	return strings.Join(names, ", ")
}

// Mask is the set of memory slices a profile occupies at a start, bit i for
// memory slice i.
func (m *Model) Mask(profile, start int) uint16 {
	return uint16(1<<m.Profiles[profile].MemorySlices-1) << start
}

// FullMask has a bit for every memory slice of the model.
func (m *Model) FullMask() uint16 { return uint16(1<<m.MemorySlices - 1) }

// family7 builds the profile table shared by the A100, H100, H200, GH200
// and B200 parts (7 compute, 8 memory slices; mig-facts.md §2.1). Names are
// 1g (1 memory slice), 1g with 2 memory slices, 2g, 3g, 4g, 7g; the 1g+me
// profile is derived from the first.
func family7(oneG, oneGDouble, twoG, threeG, fourG, sevenG string) []Profile {
	one := MustParseProfile(oneG)
	me := one
	me.Variant = VariantME
	return []Profile{
		{Name: one, ComputeSlices: 1, MemorySlices: 1, MaxCount: 7, Starts: []int{0, 1, 2, 3, 4, 5, 6}},
		{Name: me, ComputeSlices: 1, MemorySlices: 1, MaxCount: 1, Starts: []int{0, 1, 2, 3, 4, 5, 6}},
		{Name: MustParseProfile(oneGDouble), ComputeSlices: 1, MemorySlices: 2, MaxCount: 4, Starts: []int{0, 2, 4, 6}},
		{Name: MustParseProfile(twoG), ComputeSlices: 2, MemorySlices: 2, MaxCount: 3, Starts: []int{0, 2, 4}},
		{Name: MustParseProfile(threeG), ComputeSlices: 3, MemorySlices: 4, MaxCount: 2, Starts: []int{0, 4}},
		{Name: MustParseProfile(fourG), ComputeSlices: 4, MemorySlices: 4, MaxCount: 1, Starts: []int{0}},
		{Name: MustParseProfile(sevenG), ComputeSlices: 7, MemorySlices: 8, MaxCount: 1, Starts: []int{0}},
	}
}

// MustParseProfile is ParseProfile for names known at compile time; it
// panics on a bad name.
func MustParseProfile(s string) ProfileName {
	p, err := ParseProfile(s)
	if err != nil {
		panic(err)
	}
	return p
}

// catalog carries the facts of ../shared/reference/mig-profiles.json into
// Go. Sources and caveats per model are in mig-facts.md §1.
var catalog = []*Model{
	{
		Name: "A30", Aliases: []string{"A30-24GB"},
		NVMLNames: []string{"NVIDIA A30"}, PCIDeviceIDs: []uint32{0x20B710DE},
		MemoryMiB: 24576, ComputeSlices: 4, MemorySlices: 4,
		Profiles: []Profile{
			{Name: MustParseProfile("1g.6gb"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 4, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("1g.6gb+me"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 1, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("2g.12gb"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 2, Starts: []int{0, 2}},
			{Name: MustParseProfile("2g.12gb+me"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 1, Starts: []int{0, 2}},
			{Name: MustParseProfile("4g.24gb"), ComputeSlices: 4, MemorySlices: 4, MaxCount: 1, Starts: []int{0}},
		},
	},
	{
		Name:         "A100-40GB",
		NVMLNames:    []string{"NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"},
		PCIDeviceIDs: []uint32{0x20B010DE, 0x20F110DE, 0x20B110DE},
		MemoryMiB:    40960, ComputeSlices: 7, MemorySlices: 8,
		Profiles: family7("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
	},
	{
		Name:         "A100-80GB",
		NVMLNames:    []string{"NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"},
		PCIDeviceIDs: []uint32{0x20B210DE, 0x20B510DE},
		MemoryMiB:    81920, ComputeSlices: 7, MemorySlices: 8,
		Profiles: family7("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
	},
	{
		Name:         "H100-80GB",
		NVMLNames:    []string{"NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"},
		PCIDeviceIDs: []uint32{0x233010DE, 0x233110DE},
		MemoryMiB:    81559, ComputeSlices: 7, MemorySlices: 8,
		Profiles: family7("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
	},
	{
		Name: "H100-NVL-94GB", Aliases: []string{"H100-NVL"},
		NVMLNames: []string{"NVIDIA H100 NVL"}, PCIDeviceIDs: []uint32{0x232110DE},
		MemoryMiB: 95830, ComputeSlices: 7, MemorySlices: 8,
		Profiles: family7("1g.12gb", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"),
	},
	{
		// Profiles, counts and placements as an H200 (0x2335, driver
		// 580.159.04) lists them: nvidia-smi mig -lgip / -lgipp, 2026-11-30.
		Name: "H200-141GB", Aliases: []string{"H200"},
		NVMLNames: []string{"NVIDIA H200", "NVIDIA H200 NVL"}, PCIDeviceIDs: []uint32{0x233510DE, 0x233B10DE},
		MemoryMiB: 143771, ComputeSlices: 7, MemorySlices: 8,
		Profiles: family7("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
	},
	{
		Name:         "GH200-96GB",
		NVMLNames:    []string{"NVIDIA GH200 480GB", "NVIDIA GH200 120GB"},
		PCIDeviceIDs: []uint32{0x234210DE},
		MemoryMiB:    97871, ComputeSlices: 7, MemorySlices: 8, PlacementsInferred: true,
		Profiles: family7("1g.12gb", "1g.24gb", "2g.24gb", "3g.48gb", "4g.48gb", "7g.96gb"),
	},
	{
		Name:         "GH200-144GB",
		NVMLNames:    []string{"NVIDIA GH200 144G HBM3e"},
		PCIDeviceIDs: []uint32{0x234810DE},
		MemoryMiB:    146831, ComputeSlices: 7, MemorySlices: 8, PlacementsInferred: true,
		Profiles: family7("1g.18gb", "1g.36gb", "2g.36gb", "3g.72gb", "4g.72gb", "7g.144gb"),
	},
	{
		Name:      "B200",
		NVMLNames: []string{"NVIDIA B200"}, PCIDeviceIDs: []uint32{0x290110DE},
		MemoryMiB: 183359, ComputeSlices: 7, MemorySlices: 8, PlacementsInferred: true,
		Profiles: family7("1g.23gb", "1g.45gb", "2g.45gb", "3g.90gb", "4g.90gb", "7g.180gb"),
	},
	{
		Name: "RTX-PRO-6000", Aliases: []string{"RTX-PRO-6000-Blackwell"},
		NVMLNames: []string{
			"NVIDIA RTX PRO 6000 Blackwell Server Edition",
			"NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
			"NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
		},
		PCIDeviceIDs: []uint32{0x2BB510DE, 0x2BB110DE, 0x2BB410DE},
		MemoryMiB:    97887, ComputeSlices: 4, MemorySlices: 4, PlacementsInferred: true,
		Profiles: []Profile{
			{Name: MustParseProfile("1g.24gb"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 4, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("1g.24gb+me"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 1, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("1g.24gb+gfx"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 4, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("1g.24gb+me.all"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 1, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("1g.24gb-me"), ComputeSlices: 1, MemorySlices: 1, MaxCount: 4, Starts: []int{0, 1, 2, 3}},
			{Name: MustParseProfile("2g.48gb"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 2, Starts: []int{0, 2}},
			{Name: MustParseProfile("2g.48gb+gfx"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 2, Starts: []int{0, 2}},
			{Name: MustParseProfile("2g.48gb+me.all"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 1, Starts: []int{0, 2}},
			{Name: MustParseProfile("2g.48gb-me"), ComputeSlices: 2, MemorySlices: 2, MaxCount: 2, Starts: []int{0, 2}},
			{Name: MustParseProfile("4g.96gb"), ComputeSlices: 4, MemorySlices: 4, MaxCount: 1, Starts: []int{0}},
			{Name: MustParseProfile("4g.96gb+gfx"), ComputeSlices: 4, MemorySlices: 4, MaxCount: 1, Starts: []int{0}},
		},
	},
}

func init() {
	for _, m := range catalog {
		m.build()
	}
}

// build derives the lookup tables from Profiles.
func (m *Model) build() {
	m.index = make(map[ProfileName]int, len(m.Profiles))
	for i, p := range m.Profiles {
		m.index[p.Name] = i
		for j, q := range m.Profiles {
			if i != j && (excludes(p.Name, q.Name) || excludes(q.Name, p.Name)) {
				m.excludes[i] |= 1 << j
			}
		}
	}
}

// NewModel builds a model from profiles discovered at run time (the node
// agent's NVML walk), for a GPU the catalog does not know or whose driver
// offers other profiles. The memory-slice axis is as long as the furthest
// placement reaches (at most 8); compute slices are the largest profile's.
func NewModel(name string, profiles []Profile) (*Model, error) {
	if len(profiles) == 0 || len(profiles) > maxProfiles {
		return nil, fmt.Errorf("model %s: want 1 to %d profiles, got %d", name, maxProfiles, len(profiles))
	}
	m := &Model{Name: name, Profiles: append([]Profile(nil), profiles...)}
	seen := map[ProfileName]bool{}
	for _, p := range m.Profiles {
		switch {
		case seen[p.Name]:
			return nil, fmt.Errorf("model %s: profile %s appears twice", name, p.Name)
		case p.ComputeSlices != p.Name.Compute || p.MemorySlices < 1 || p.MaxCount < 1 || len(p.Starts) == 0:
			return nil, fmt.Errorf("model %s: profile %s: want %d compute slices, and positive memory slices, max count and starts", name, p.Name, p.Name.Compute)
		}
		seen[p.Name] = true
		for _, st := range p.Starts {
			if st < 0 || st+p.MemorySlices > maxMemorySlices {
				return nil, fmt.Errorf("model %s: profile %s: placement %d+%d is outside the GPU", name, p.Name, st, p.MemorySlices)
			}
			m.MemorySlices = max(m.MemorySlices, st+p.MemorySlices)
		}
		m.ComputeSlices = max(m.ComputeSlices, p.ComputeSlices)
	}
	m.build()
	return m, nil
}

// Models returns the catalog, sorted by name. Callers must not modify it.
func Models() []*Model {
	out := append([]*Model(nil), catalog...)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ResourceNames returns the extended-resource name of every profile of
// the catalog's models, sorted: what dynamig-scheduler's configuration
// makes NodeResourcesFit leave to DynamicMIG.
func ResourceNames() []string {
	seen := map[string]bool{}
	for _, m := range catalog {
		for _, p := range m.Profiles {
			seen[p.Name.ResourceName()] = true
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

// ModelByName finds a model by catalog name or alias ("A100-80GB", "A30").
func ModelByName(name string) (*Model, error) {
	for _, m := range catalog {
		if m.Name == name {
			return m, nil
		}
		for _, a := range m.Aliases {
			if a == name {
				return m, nil
			}
		}
	}
	var names []string
	for _, m := range Models() {
		names = append(names, m.Name)
	}
	return nil, fmt.Errorf("unknown GPU model %q (known: %s)", name, strings.Join(names, ", "))
}

// ModelByNVMLName finds a model by nvmlDeviceGetName ("NVIDIA A100 80GB PCIe").
// Names from R450/R460 drivers, which lack the "NVIDIA " prefix, match too.
func ModelByNVMLName(name string) (*Model, bool) {
	return modelByNVMLName(strings.TrimPrefix(name, "NVIDIA "), func(n string) string { return n })
}

// ModelByProduct finds a model by the GPU Feature Discovery label
// nvidia.com/gpu.product, which is the NVML name with spaces turned into
// dashes ("NVIDIA-A100-80GB-PCIe"). A "-SHARED" suffix (time-slicing, MPS)
// and a "-MIG-<profile>" suffix (single strategy) are ignored.
func ModelByProduct(label string) (*Model, bool) {
	label = strings.TrimSuffix(label, "-SHARED")
	if i := strings.Index(label, "-MIG-"); i >= 0 {
		label = label[:i]
	}
	return modelByNVMLName(strings.TrimPrefix(label, "NVIDIA-"), func(n string) string { return strings.ReplaceAll(n, " ", "-") })
}

// modelByNVMLName finds the model one of whose NVML names, without the
// "NVIDIA " prefix and written by spell, equals want.
func modelByNVMLName(want string, spell func(string) string) (*Model, bool) {
	for _, m := range catalog {
		for _, n := range m.NVMLNames {
			if spell(strings.TrimPrefix(n, "NVIDIA ")) == want {
				return m, true
			}
		}
	}
	return nil, false
}

// ModelByPCIDeviceID finds a model by nvmlPciInfo.pciDeviceId
// (0x20B510DE: device 0x20B5, vendor 0x10DE) or by the bare 16-bit device
// ID (0x20B5).
func ModelByPCIDeviceID(id uint32) (*Model, bool) {
	if id <= 0xFFFF {
		id = id<<16 | 0x10DE
	}
	for _, m := range catalog {
		for _, d := range m.PCIDeviceIDs {
			if d == id {
				return m, true
			}
		}
	}
	return nil, false
}
