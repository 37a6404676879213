package mig

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestProfileNamesRoundTrip(t *testing.T) {
	tests := []struct{ profile, resource string }{
		{"1g.10gb", "nvidia.com/mig-1g.10gb"},
		{"1g.10gb+me", "nvidia.com/mig-1g.10gb.me"},
		{"1g.24gb-me", "nvidia.com/mig-1g.24gb-me"},
		{"1g.24gb+me.all", "nvidia.com/mig-1g.24gb.me.all"},
		{"4g.96gb+gfx", "nvidia.com/mig-4g.96gb.gfx"},
		{"7g.141gb", "nvidia.com/mig-7g.141gb"},
	}
	for _, tt := range tests {
		p, err := ParseProfile(tt.profile)
		require.NoError(t, err, tt.profile)
		assert.Equal(t, tt.profile, p.String())
		assert.Equal(t, tt.resource, p.ResourceName())
		r, err := ParseResourceName(tt.resource)
		require.NoError(t, err, tt.resource)
		assert.Equal(t, p, r)
		assert.True(t, IsMIGResource(tt.resource))
	}
}

func TestProfileNamesRejected(t *testing.T) {
	tests := []struct{ in, why string }{
		{"", "missing \"g.\""},
		{"1g", "missing \"g.\""},
		{"9g.99gb", "compute slice count must be 1 to 8"},
		{"0g.10gb", "compute slice count"},
		{"01g.10gb", "compute slice count"},
		{"1g.10", "missing \"gb\""},
		{"1g.gb", "memory size"},
		{"1g.10GB", "missing \"gb\""},
		{"1g.10gb+xx", "unknown suffix \"+xx\""},
		{"1g.10gb.me", "unknown suffix \".me\""}, // resource spelling is not a profile name
		{"-1g.10gb", "compute slice count"},
		{" 1g.10gb", "compute slice count"},
	}
	for _, tt := range tests {
		_, err := ParseProfile(tt.in)
		require.ErrorIs(t, err, ErrInvalidProfile, tt.in)
		assert.Contains(t, err.Error(), tt.why, tt.in)
	}
	for _, r := range []string{"nvidia.com/mig-1g", "nvidia.com/mig-1g.10gb+me", "nvidia.com/gpu", "mig-1g.10gb"} {
		_, err := ParseResourceName(r)
		require.ErrorIs(t, err, ErrInvalidProfile, r)
		assert.Contains(t, err.Error(), r)
	}
}

func TestModelLookup(t *testing.T) {
	tests := []struct {
		name  string
		found func() (*Model, bool)
		want  string
	}{
		{"nvml", func() (*Model, bool) { return ModelByNVMLName("NVIDIA A100 80GB PCIe") }, "A100-80GB"},
		{"old nvml", func() (*Model, bool) { return ModelByNVMLName("A100-SXM4-40GB") }, "A100-40GB"},
		{"gfd", func() (*Model, bool) { return ModelByProduct("NVIDIA-A100-80GB-PCIe") }, "A100-80GB"},
		{"gfd sxm", func() (*Model, bool) { return ModelByProduct("NVIDIA-A100-SXM4-80GB") }, "A100-80GB"},
		{"gfd h100", func() (*Model, bool) { return ModelByProduct("NVIDIA-H100-80GB-HBM3") }, "H100-80GB"},
		{"gfd shared", func() (*Model, bool) { return ModelByProduct("NVIDIA-H200-SHARED") }, "H200-141GB"},
		{"gfd single", func() (*Model, bool) { return ModelByProduct("A100-SXM4-40GB-MIG-1g.5gb") }, "A100-40GB"},
		{"pci", func() (*Model, bool) { return ModelByPCIDeviceID(0x233010DE) }, "H100-80GB"},
		{"pci short", func() (*Model, bool) { return ModelByPCIDeviceID(0x2BB5) }, "RTX-PRO-6000"},
	}
	for _, tt := range tests {
		m, ok := tt.found()
		require.True(t, ok, tt.name)
		assert.Equal(t, tt.want, m.Name, tt.name)
	}
	_, ok := ModelByNVMLName("NVIDIA GeForce RTX 4090")
	assert.False(t, ok)
	_, ok = ModelByPCIDeviceID(0x1234)
	assert.False(t, ok)
	_, err := ModelByName("A200")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "A100-80GB")
	m, err := ModelByName("A30-24GB")
	require.NoError(t, err)
	assert.Equal(t, "A30", m.Name)
}

// TestCatalogConsistent checks every model's table against the rules that
// hold for all of them: placements inside the GPU, unique names, at least
// one profile using the whole GPU.
func TestCatalogConsistent(t *testing.T) {
	require.Len(t, Models(), 10)
	for _, m := range Models() {
		whole := false
		for _, p := range m.Profiles {
			assert.Equal(t, p.Name.Compute, p.ComputeSlices, "%s %s", m.Name, p.Name)
			for _, s := range p.Starts {
				assert.LessOrEqual(t, s+p.MemorySlices, m.MemorySlices, "%s %s@%d", m.Name, p.Name, s)
			}
			if p.MemorySlices == m.MemorySlices {
				whole = true
			}
			i, ok := m.ProfileIndex(p.Name)
			require.True(t, ok)
			assert.Equal(t, p.Name, m.Profiles[i].Name)
		}
		assert.True(t, whole, m.Name)
		assert.Len(t, m.index, len(m.Profiles), "%s: duplicate profile names", m.Name)
	}
}

func FuzzParseProfile(f *testing.F) {
	for _, s := range []string{"1g.10gb", "1g.10gb+me", "1g.24gb+me.all", "4g.96gb+gfx", "1g.24gb-me", "9g.99gb", "1g"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseProfile(s)
		if err != nil {
			return
		}
		// A name that parses prints back exactly and survives the resource round trip.
		if p.String() != s {
			t.Fatalf("ParseProfile(%q).String() = %q", s, p.String())
		}
		r, err := ParseResourceName(p.ResourceName())
		if err != nil || r != p {
			t.Fatalf("resource round trip of %q: %v, %v", s, r, err)
		}
	})
}

func FuzzParseResourceName(f *testing.F) {
	for _, s := range []string{"nvidia.com/mig-1g.10gb", "nvidia.com/mig-1g.10gb.me", "nvidia.com/mig-1g.24gb.me.all", "nvidia.com/mig-1g.24gb-me", "nvidia.com/mig-1g"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseResourceName(s)
		if err != nil {
			return
		}
		if p.ResourceName() != s {
			t.Fatalf("ParseResourceName(%q).ResourceName() = %q", s, p.ResourceName())
		}
	})
}
