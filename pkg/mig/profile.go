// Package mig models NVIDIA MIG geometry: GPU models and their GPU-instance
// profiles, placements, layout validity and the Kubernetes resource names the
// NVIDIA device plugin advertises under the mixed strategy.
//
// It imports neither client-go nor NVML: it is pure data and arithmetic that
// the planner, the scheduler plugin and the node agent share.
package mig

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Variant is the media-engine or graphics suffix of a profile name.
type Variant uint8

// Variants, in the order NVIDIA names them. The zero value is a plain
// compute profile such as "1g.10gb".
const (
	VariantNone  Variant = iota // "1g.10gb"
	VariantME                   // "1g.10gb+me": at least one decoder/JPEG/OFA
	VariantMEAll                // "1g.24gb+me.all": all media engines
	VariantNoME                 // "1g.24gb-me": no media engines
	VariantGFX                  // "4g.96gb+gfx": graphics APIs
)

// profileSuffix is how each variant is written in a profile name;
// resourceSuffix how the device plugin writes it in a resource name
// ("+" becomes ".").
var (
	profileSuffix  = [...]string{"", "+me", "+me.all", "-me", "+gfx"}
	resourceSuffix = [...]string{"", ".me", ".me.all", "-me", ".gfx"}
)

// ProfileName is a parsed MIG GPU-instance profile name such as "3g.40gb"
// or "1g.24gb+me.all". It is comparable and usable as a map key.
type ProfileName struct {
	Compute  int // compute slices, the "3" of "3g"
	MemoryGB int // the "40" of "40gb"
	Variant  Variant
}

// ResourcePrefix is the prefix of every MIG resource under the device
// plugin's mixed strategy.
const ResourcePrefix = "nvidia.com/mig-"

// ErrInvalidProfile is wrapped by every profile and resource name parse error.
var ErrInvalidProfile = errors.New("invalid MIG profile")

// String prints the profile exactly as NVIDIA does: "1g.10gb+me".
func (p ProfileName) String() string {
	return strconv.Itoa(p.Compute) + "g." + strconv.Itoa(p.MemoryGB) + "gb" + profileSuffix[p.Variant]
}

// ResourceName is the device plugin's resource for the profile:
// "1g.10gb+me" → "nvidia.com/mig-1g.10gb.me".
func (p ProfileName) ResourceName() string {
	return ResourcePrefix + strconv.Itoa(p.Compute) + "g." + strconv.Itoa(p.MemoryGB) + "gb" + resourceSuffix[p.Variant]
}

// MarshalText implements encoding.TextMarshaler so that profiles print as
// their names in JSON and YAML.
func (p ProfileName) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler with ParseProfile.
func (p *ProfileName) UnmarshalText(b []byte) error {
	q, err := ParseProfile(string(b))
	if err != nil {
		return err
	}
	*p = q
	return nil
}

// ParseProfile parses a profile name as NVIDIA prints it: "1g.10gb",
// "1g.10gb+me", "1g.24gb-me", "1g.24gb+me.all", "4g.96gb+gfx".
func ParseProfile(s string) (ProfileName, error) {
	return parse(s, profileSuffix[:])
}

// ParseResourceName parses a mixed-strategy resource name:
// "nvidia.com/mig-1g.10gb.me" → 1g.10gb+me.
func ParseResourceName(r string) (ProfileName, error) {
	rest, ok := strings.CutPrefix(r, ResourcePrefix)
	if !ok {
		return ProfileName{}, fmt.Errorf("%w: resource %q does not start with %q", ErrInvalidProfile, r, ResourcePrefix)
	}
	p, err := parse(rest, resourceSuffix[:])
	if err != nil {
		return ProfileName{}, fmt.Errorf("resource %q: %w", r, err)
	}
	return p, nil
}

// IsMIGResource reports whether a resource name is in the MIG namespace,
// well-formed or not; ParseResourceName says whether it is well-formed.
func IsMIGResource(r string) bool { return strings.HasPrefix(r, ResourcePrefix) }

// parse reads "<C>g.<M>gb<suffix>" where suffix is one of suffixes.
func parse(s string, suffixes []string) (ProfileName, error) {
	bad := func(why string) (ProfileName, error) {
		return ProfileName{}, fmt.Errorf("%w %q: %s (want <compute>g.<memory>gb[suffix], e.g. 1g.10gb or 1g.10gb+me)", ErrInvalidProfile, s, why)
	}
	c, rest, ok := strings.Cut(s, "g.")
	if !ok {
		return bad("missing \"g.\" after the compute slice count")
	}
	compute, err := smallNumber(c)
	if err != nil || compute > 8 {
		return bad("compute slice count must be 1 to 8")
	}
	m, tail, ok := strings.Cut(rest, "gb")
	if !ok {
		return bad("missing \"gb\" after the memory size")
	}
	mem, err := smallNumber(m)
	if err != nil {
		return bad("memory size must be a positive whole number of GB")
	}
	for v := len(suffixes) - 1; v >= 0; v-- {
		if tail == suffixes[v] {
			return ProfileName{Compute: compute, MemoryGB: mem, Variant: Variant(v)}, nil
		}
	}
	return bad(fmt.Sprintf("unknown suffix %q (known: %s)", tail, strings.Join(suffixes[1:], " ")))
}

// smallNumber parses a positive decimal without sign or leading zeros,
// below 10000.
func smallNumber(s string) (int, error) {
	if s == "" || len(s) > 4 || s[0] == '0' {
		return 0, errors.New("not a positive number")
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0, errors.New("not a positive number")
		}
	}
	return strconv.Atoi(s)
}
