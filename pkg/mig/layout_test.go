package mig

import (
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// layoutCounts returns, for the profiles keep accepts: placement layouts
// (empty one excluded), maximal placement layouts, distinct profile
// multisets and maximal multisets (contained in no other), as counted in
// mig-facts.md §2.3.
func layoutCounts(t *testing.T, m *Model, keep func(ProfileName) bool) [4]int {
	t.Helper()
	layouts := m.Layouts(keep)
	var c [4]int
	multisets := map[string]map[ProfileName]int{}
	for _, l := range layouts {
		if len(l) == 0 {
			continue
		}
		require.NoError(t, m.Validate(l), "enumerated layout %v", l)
		c[0]++
		if !m.CanExtend(l, keep) {
			c[1]++
		}
		ms := map[ProfileName]int{}
		var names []string
		for _, s := range l {
			ms[s.Profile]++
			names = append(names, s.Profile.String())
		}
		sort.Strings(names)
		multisets[strings.Join(names, ",")] = ms
	}
	c[2] = len(multisets)
	for ka, a := range multisets {
		maximal := true
		for kb, b := range multisets {
			if ka != kb && contains(b, a) {
				maximal = false
				break
			}
		}
		if maximal {
			c[3]++
		}
	}
	return c
}

func contains(big, small map[ProfileName]int) bool {
	for p, n := range small {
		if big[p] < n {
			return false
		}
	}
	return true
}

func TestLayoutCountsMatchReference(t *testing.T) {
	noME := func(p ProfileName) bool { return p.Variant != VariantME }
	classic5 := func(m *Model) func(ProfileName) bool {
		double := m.Profiles[2].Name // the 1g with two memory slices
		return func(p ProfileName) bool { return p.Variant == VariantNone && p != double }
	}
	for _, name := range []string{"A100-40GB", "A100-80GB", "H100-80GB", "H100-NVL-94GB", "H200-141GB", "B200"} {
		m, err := ModelByName(name)
		require.NoError(t, err)
		t.Run(name, func(t *testing.T) {
			assert.Equal(t, [4]int{2318, 239, 127, 44}, layoutCounts(t, m, nil), "all 7 profiles")
			assert.Equal(t, [4]int{722, 78, 77, 28}, layoutCounts(t, m, noME), "without +me")
			assert.Equal(t, [4]int{297, 19, 37, 12}, layoutCounts(t, m, classic5(m)), "classic 5")
		})
	}
	a30, err := ModelByName("A30")
	require.NoError(t, err)
	c := layoutCounts(t, a30, noME)
	assert.Equal(t, [3]int{25, 5, 9}, [3]int{c[0], c[1], c[2]}, "A30 without +me")
	assert.Equal(t, 4, c[3], "A30 without +me: maximal multisets")
	c = layoutCounts(t, a30, nil)
	assert.Equal(t, [3]int{75, 17, 19}, [3]int{c[0], c[1], c[2]}, "A30 all 5, +me mutually exclusive")
}

func TestValidate(t *testing.T) {
	a100, _ := ModelByName("A100-80GB")
	rtx, _ := ModelByName("RTX-PRO-6000")
	sl := func(p string, start int) Slice { return Slice{MustParseProfile(p), start} }
	tests := []struct {
		name    string
		model   *Model
		layout  []Slice
		wantErr string
	}{
		{"empty", a100, nil, ""},
		{"4g+3g", a100, []Slice{sl("4g.40gb", 0), sl("3g.40gb", 4)}, ""},
		{"seven 1g", a100, []Slice{sl("1g.10gb", 0), sl("1g.10gb", 1), sl("1g.10gb", 2), sl("1g.10gb", 3), sl("1g.10gb", 4), sl("1g.10gb", 5), sl("1g.10gb", 6)}, ""},
		{"1g at slice 7", a100, []Slice{sl("1g.10gb", 7)}, "cannot start at memory slice 7"},
		{"3g at 2", a100, []Slice{sl("3g.40gb", 2)}, "starts: 0, 4"},
		{"overlap", a100, []Slice{sl("3g.40gb", 0), sl("2g.20gb", 2)}, "2g.20gb@2: 2g.20gb@2 overlaps"},
		{"two +me", a100, []Slice{sl("1g.10gb+me", 0), sl("1g.10gb+me", 1)}, "more than 1 × 1g.10gb+me"},
		{"unknown profile", a100, []Slice{sl("1g.5gb", 0)}, "1g.5gb does not exist on A100-80GB"},
		{"me.all with -me", rtx, []Slice{sl("1g.24gb+me.all", 0), sl("1g.24gb-me", 1), sl("2g.48gb-me", 2)}, ""},
		{"me.all with plain", rtx, []Slice{sl("1g.24gb+me.all", 0), sl("1g.24gb", 1)}, "1g.24gb cannot share a GPU with 1g.24gb+me.all"},
		{"plain then me.all", rtx, []Slice{sl("2g.48gb", 0), sl("1g.24gb+me.all", 2)}, "cannot share a GPU with 2g.48gb"},
		{"gfx", rtx, []Slice{sl("4g.96gb+gfx", 0)}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.model.Validate(tt.layout)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrInvalidLayout)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
}

func TestNewModelFromDiscoveredProfiles(t *testing.T) {
	a100, err := ModelByName("A100-80GB")
	require.NoError(t, err)
	// An older driver: no 1g.20gb. The discovered model has the same geometry otherwise.
	var profiles []Profile
	for _, p := range a100.Profiles {
		if p.Name != MustParseProfile("1g.20gb") {
			profiles = append(profiles, p)
		}
	}
	m, err := NewModel("NVIDIA A100 80GB PCIe", profiles)
	require.NoError(t, err)
	assert.Equal(t, 8, m.MemorySlices)
	assert.Equal(t, 7, m.ComputeSlices)
	_, ok := m.ProfileIndex(MustParseProfile("1g.20gb"))
	assert.False(t, ok)
	assert.Equal(t, len(a100.Layouts(nil))-layoutsUsing(a100, "1g.20gb"), len(m.Layouts(nil)))
	require.ErrorIs(t, m.Validate([]Slice{{MustParseProfile("1g.10gb+me"), 0}, {MustParseProfile("1g.10gb+me"), 1}}), ErrInvalidLayout)

	_, err = NewModel("x", nil)
	require.ErrorContains(t, err, "want 1 to 16 profiles")
	_, err = NewModel("x", []Profile{profiles[0], profiles[0]})
	require.ErrorContains(t, err, "appears twice")
	bad := profiles[0]
	bad.Starts = []int{16}
	_, err = NewModel("x", []Profile{bad})
	require.ErrorContains(t, err, "outside the GPU")
}

// layoutsUsing counts the valid layouts of m that contain profile p.
func layoutsUsing(m *Model, p string) int {
	n := 0
	for _, l := range m.Layouts(nil) {
		for _, s := range l {
			if s.Profile == MustParseProfile(p) {
				n++
				break
			}
		}
	}
	return n
}
