package mig

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// One resolver for the agent (NVML name, PCI ID, discovered profiles) and
// the scheduler (the status's model name, discovered profiles).
func TestResolveModel(t *testing.T) {
	a100, err := ModelByName("A100-80GB")
	require.NoError(t, err)
	tests := []struct {
		name string
		pci  uint32
		want string
	}{
		{"A100-80GB", 0, "A100-80GB"},                      // the scheduler, from status
		{"NVIDIA A100-SXM4-80GB", 0, "A100-80GB"},          // NVML name
		{"some name", a100.PCIDeviceIDs[0], "A100-80GB"},   // PCI ID first
		{"GeForce RTX 4090", 0, ""},                        // nobody plans for it
		{"NVIDIA H100 80GB HBM3", 0x12345678, "H100-80GB"}, // unknown PCI ID: by name
	}
	for _, tt := range tests {
		m, err := ResolveModel(tt.name, tt.pci, nil)
		require.NoError(t, err, tt.name)
		if tt.want == "" {
			assert.Nil(t, m, tt.name)
			assert.Equal(t, tt.name, ModelName(tt.name, tt.pci), "reported by its NVML name")
			continue
		}
		require.NotNil(t, m, tt.name)
		assert.Equal(t, tt.want, m.Name, tt.name)
		assert.Equal(t, tt.want, ModelName(tt.name, tt.pci), tt.name)
		again, _ := ResolveModel(ModelName(tt.name, tt.pci), 0, nil)
		assert.Same(t, m, again, "the reported name resolves to the same model on the scheduler's side")
	}

	discovered := a100.Profiles[1:]
	m, err := ResolveModel("A100-80GB", 0, discovered)
	require.NoError(t, err)
	assert.NotSame(t, a100, m, "discovered profiles win over the catalog")
	assert.Len(t, m.Profiles, len(discovered))
	again, err := ResolveModel("A100-80GB", 0, append([]Profile(nil), discovered...))
	require.NoError(t, err)
	assert.Same(t, m, again, "one model per name and profiles")

	bad := append([]Profile(nil), discovered...)
	bad[0].Starts = []int{9}
	_, err = ResolveModel("A100-80GB", 0, bad)
	assert.ErrorContains(t, err, "discovered profiles")
}
