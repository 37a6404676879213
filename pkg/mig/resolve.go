package mig

import (
	"fmt"
	"sync"
)

// discovered caches the models built from discovered profiles, by name
// and profiles, so that every GPU of one kind shares one *Model (and the
// planner's per-model tables).
var discovered sync.Map // string → *Model

// ResolveModel is the one answer to "what model is this GPU", for the node
// agent (from NVML) and the scheduler (from NodePartition status) alike:
//   - with discovered profiles (NVML's walk, as the agent reports them), a
//     model built from them and named name: they reflect the real driver;
//   - else the catalog's model by PCI device ID (0 for none), catalog name
//     or alias ("A100-80GB"), or NVML name ("NVIDIA A100-SXM4-80GB");
//   - else nil, and no error: a GPU nobody can plan for.
//
// An error means the discovered profiles do not make a model.
func ResolveModel(name string, pciDeviceID uint32, profiles []Profile) (*Model, error) {
	if len(profiles) > 0 {
		key := fmt.Sprintf("%s%v", name, profiles)
		if m, ok := discovered.Load(key); ok {
			return m.(*Model), nil
		}
		m, err := NewModel(name, profiles)
		if err != nil {
			return nil, fmt.Errorf("discovered profiles: %w", err)
		}
		actual, _ := discovered.LoadOrStore(key, m)
		return actual.(*Model), nil
	}
	if pciDeviceID != 0 {
		if m, ok := ModelByPCIDeviceID(pciDeviceID); ok {
			return m, nil
		}
	}
	if m, err := ModelByName(name); err == nil {
		return m, nil
	}
	m, _ := ModelByNVMLName(name)
	return m, nil
}

// ModelName is the name the node agent reports for a GPU: the catalog's
// ("A100-80GB") where the catalog knows it by PCI device ID or NVML name,
// else the NVML name. ResolveModel(ModelName(…), 0, nil) finds the same
// catalog model again.
func ModelName(nvmlName string, pciDeviceID uint32) string {
	if m, _ := ResolveModel(nvmlName, pciDeviceID, nil); m != nil {
		return m.Name
	}
	return nvmlName
}
