package mig

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Slice is one GPU instance in a layout: a profile at a placement start
// (memory-slice index), e.g. 3g.40gb@4 occupies memory slices 4–7.
type Slice struct {
	Profile ProfileName `json:"profile"`
	Start   int         `json:"start"`
}

func (s Slice) String() string { return fmt.Sprintf("%s@%d", s.Profile, s.Start) }

// MIGSlice returns the slice itself; types that embed Slice to add fields
// (planner.Slice adds Used, partition.Slice a UUID) get it too, so that
// LayoutOf takes them all.
func (s Slice) MIGSlice() Slice { return s }

// LayoutOf is the layout of slices of a type that embeds Slice: their
// profiles and starts, in order.
func LayoutOf[S interface{ MIGSlice() Slice }](slices []S) []Slice {
	out := make([]Slice, len(slices))
	for i, s := range slices {
		out[i] = s.MIGSlice()
	}
	return out
}

// ErrInvalidLayout is wrapped by every layout validity error.
var ErrInvalidLayout = errors.New("invalid MIG layout")

// Occupancy is the incremental state of one GPU's layout: occupied memory
// slices and instances per profile index. The zero value is an empty GPU.
// It is a value type; copy it to branch.
type Occupancy struct {
	Mask    uint16             // occupied memory slices
	Present uint16             // bit i: at least one instance of profile i
	Count   [maxProfiles]uint8 // instances per profile index
}

// Reasons a profile does not fit, from misfit.
const (
	fits = iota
	badStart
	overlap
	tooMany
	mediaConflict
)

// misfit checks, in order: the start is a placement of the profile, the
// memory slices are free, the profile's instance count, and the
// media-engine rules (a +me.all instance excludes all but -me profiles;
// distinct +me profiles exclude each other, as NVIDIA documents one set of
// media engines).
func (m *Model) misfit(o *Occupancy, profile, start int) int {
	p := &m.Profiles[profile]
	switch {
	case !containsInt(p.Starts, start):
		return badStart
	case o.Mask&m.Mask(profile, start) != 0:
		return overlap
	case int(o.Count[profile]) >= p.MaxCount:
		return tooMany
	case o.Present&m.excludes[profile] != 0:
		return mediaConflict
	}
	return fits
}

// CanAdd reports whether a profile (by index) can be added at start.
func (m *Model) CanAdd(o *Occupancy, profile, start int) bool {
	return m.misfit(o, profile, start) == fits
}

// Fits says why a profile (by index) cannot be added at start, or nil.
func (m *Model) Fits(o *Occupancy, profile, start int) error {
	p := &m.Profiles[profile]
	switch m.misfit(o, profile, start) {
	case badStart:
		return fmt.Errorf("%s cannot start at memory slice %d on %s (starts: %s)", p.Name, start, m.Name, joinInts(p.Starts))
	case overlap:
		return fmt.Errorf("%s@%d overlaps memory slices already occupied", p.Name, start)
	case tooMany:
		return fmt.Errorf("more than %d × %s on %s", p.MaxCount, p.Name, m.Name)
	case mediaConflict:
		for q := range m.Profiles {
			if o.Present&(1<<q)&m.excludes[profile] != 0 {
				return fmt.Errorf("%s cannot share a GPU with %s (media engines)", p.Name, m.Profiles[q].Name)
			}
		}
	}
	return nil
}

// excludes reports whether an instance of a forbids one of b on the same GPU.
func excludes(a, b ProfileName) bool {
	switch a.Variant {
	case VariantMEAll:
		return b.Variant != VariantNoME
	case VariantME:
		return b.Variant == VariantME
	}
	return false
}

// Add records an instance; the caller has checked CanAdd.
func (m *Model) Add(o *Occupancy, profile, start int) {
	o.Mask |= m.Mask(profile, start)
	o.Count[profile]++
	o.Present |= 1 << profile
}

// Remove undoes Add.
func (m *Model) Remove(o *Occupancy, profile, start int) {
	o.Mask &^= m.Mask(profile, start)
	o.Count[profile]--
	if o.Count[profile] == 0 {
		o.Present &^= 1 << profile
	}
}

// Validate checks a complete layout of one GPU: known profiles, starts from
// the placement table, no overlapping memory slices, instance counts and
// media-engine rules. The error names the first offending slice.
func (m *Model) Validate(layout []Slice) error {
	_, err := m.Occupancy(layout)
	return err
}

// Occupancy builds the occupancy of a layout, validating it.
func (m *Model) Occupancy(layout []Slice) (Occupancy, error) {
	var o Occupancy
	for _, s := range layout {
		i, ok := m.index[s.Profile]
		if !ok {
			return o, fmt.Errorf("%w: %s does not exist on %s (profiles: %s)", ErrInvalidLayout, s.Profile, m.Name, m.profileList())
		}
		if err := m.Fits(&o, i, s.Start); err != nil {
			return o, fmt.Errorf("%w: %s: %w", ErrInvalidLayout, s, err)
		}
		m.Add(&o, i, s.Start)
	}
	return o, nil
}

// Layouts enumerates every valid placement layout of the model that uses
// only profiles accepted by keep (nil keeps all), the empty layout
// included. Each layout is sorted by start, then profile name; the result
// is in a fixed order (depth-first over profiles in catalog order, then
// starts). For the A100/H100 family with all 7 profiles there are 2,318.
func (m *Model) Layouts(keep func(ProfileName) bool) [][]Slice {
	type cand struct{ profile, start int }
	var cands []cand
	for i, p := range m.Profiles {
		if keep != nil && !keep(p.Name) {
			continue
		}
		for _, s := range p.Starts {
			cands = append(cands, cand{i, s})
		}
	}
	var out [][]Slice
	var cur []Slice
	var o Occupancy
	var walk func(from int)
	walk = func(from int) {
		l := append([]Slice(nil), cur...)
		SortSlices(l)
		out = append(out, l)
		for i := from; i < len(cands); i++ {
			c := cands[i]
			if !m.CanAdd(&o, c.profile, c.start) {
				continue
			}
			m.Add(&o, c.profile, c.start)
			cur = append(cur, Slice{m.Profiles[c.profile].Name, c.start})
			walk(i + 1)
			cur = cur[:len(cur)-1]
			m.Remove(&o, c.profile, c.start)
		}
	}
	walk(0)
	return out
}

// CanExtend reports whether any profile accepted by keep fits into the layout.
func (m *Model) CanExtend(layout []Slice, keep func(ProfileName) bool) bool {
	o, err := m.Occupancy(layout)
	if err != nil {
		return false
	}
	for i, p := range m.Profiles {
		if keep != nil && !keep(p.Name) {
			continue
		}
		for _, s := range p.Starts {
			if m.CanAdd(&o, i, s) {
				return true
			}
		}
	}
	return false
}

// SortSlices orders slices by start, then profile name.
func SortSlices(l []Slice) {
	sort.Slice(l, func(i, j int) bool {
		if l[i].Start != l[j].Start {
			return l[i].Start < l[j].Start
		}
		return l[i].Profile.String() < l[j].Profile.String()
	})
}

func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, ", ")
}
