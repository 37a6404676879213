// Package gpu is the node agent's boundary to NVML: the only package that
// imports go-nvml. It offers what the agent needs and no more: list GPUs,
// discover their GPU-instance profiles and placements, list, create and
// destroy MIG slices (a GPU instance with one full-size compute instance).
//
// Profile IDs are never hard-coded: profiles are discovered by walking
// NVML's profile enum, and named as the NVIDIA device plugin names them, so
// that a slice's name here is its resource name on the Node.
package gpu

import (
	"errors"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Lib is the agent's view of NVML. GPUs are addressed by NVML index; a
// slice by its profile and placement start, which identify it on a GPU.
type Lib interface {
	// GPUs lists the MIG-capable GPUs.
	GPUs() ([]GPU, error)
	// Profiles lists the GPU-instance profiles a GPU offers, with their
	// placements. Only meaningful while MIG mode is enabled.
	Profiles(gpu int) ([]Profile, error)
	// Slices lists the GPU instances that exist on a GPU.
	Slices(gpu int) ([]Slice, error)
	// Create makes a GPU instance of the profile at start plus one
	// full-size compute instance. It is idempotent: an instance already at
	// that placement with that profile is completed and returned.
	Create(gpu int, profile mig.ProfileName, start int) (Slice, error)
	// Destroy removes the compute instances, then the GPU instance, of the
	// slice at start. A slice that does not exist is not an error.
	Destroy(gpu int, profile mig.ProfileName, start int) error
}

// MIGMode is a GPU's MIG mode: current and, if a reset is pending, next.
type MIGMode struct {
	Current, Pending bool
}

// GPU is one MIG-capable GPU.
type GPU struct {
	Index       int
	UUID        string // "GPU-…"
	Name        string // nvmlDeviceGetName, e.g. "NVIDIA A100-SXM4-80GB"
	PCIDeviceID uint32 // device<<16 | vendor, e.g. 0x20B210DE
	MemoryMiB   int
	MIG         MIGMode
}

// Profile is a GPU-instance profile NVML offers on a GPU: the domain
// profile (name, compute and memory slices, max count, placement starts)
// plus the memory NVML gives it, e.g. 1g.10gb on an A100-80GB: 1 compute
// and 1 memory slice, 7 at most, starts 0–6, 9728 MiB.
type Profile struct {
	mig.Profile
	MemoryMiB int
}

// Slice is a GPU instance that exists: its profile at its placement start
// (the embedded mig.Slice, e.g. 3g.40gb@4), and how NVML and the device
// plugin know it.
type Slice struct {
	mig.Slice
	GI   int    // GPU instance ID
	CI   int    // the full-size compute instance's ID, -1 if it has none
	UUID string // the MIG device UUID, "MIG-…"; empty without a compute instance
	// MIGIndex is the MIG device's enumeration index on its GPU, what the
	// device plugin's deviceIDStrategy=index advertises as "<gpu>:<MIGIndex>";
	// -1 without a compute instance.
	MIGIndex int
	// OtherComputeInstances counts compute instances that are not one
	// full-size instance (someone split the slice by hand): the device
	// plugin does not advertise such a slice.
	OtherComputeInstances int
}

// Advertised reports whether the NVIDIA device plugin advertises the slice
// as one device of its profile's resource (nvidia.com/mig-3g.40gb): it has
// exactly one compute instance, and that one is full-size. This is the one
// definition of "advertised", for the agent and its stand-ins alike.
func (s Slice) Advertised() bool { return s.CI >= 0 && s.OtherComputeInstances == 0 }

// Errors callers branch on; every NVML failure wraps one of these or, for
// other codes, an error whose text is NVML's.
var (
	ErrLibraryNotFound       = errors.New("NVML library (libnvidia-ml.so.1) not found: is the NVIDIA driver installed and the container run with the NVIDIA runtime?")
	ErrInsufficientResources = errors.New("NVML: insufficient resources")
	ErrInUse                 = errors.New("NVML: in use")
	ErrNoPermission          = errors.New("NVML: no permission")
	ErrNotSupported          = errors.New("NVML: not supported")
	ErrNotFound              = errors.New("NVML: not found")
)

// nvmlError is a failed NVML call's return code.
type nvmlError struct{ ret nvml.Return }

func (e nvmlError) Error() string { return e.ret.Error() }

func (e nvmlError) Is(target error) bool {
	switch e.ret {
	case nvml.ERROR_INSUFFICIENT_RESOURCES:
		return target == ErrInsufficientResources
	case nvml.ERROR_IN_USE:
		return target == ErrInUse
	case nvml.ERROR_NO_PERMISSION:
		return target == ErrNoPermission
	case nvml.ERROR_NOT_SUPPORTED:
		return target == ErrNotSupported
	case nvml.ERROR_NOT_FOUND:
		return target == ErrNotFound
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return target == ErrLibraryNotFound
	}
	return false
}

// errorOf wraps a return code that is not SUCCESS; nil for SUCCESS.
func errorOf(ret nvml.Return) error {
	if ret == nvml.SUCCESS {
		return nil
	}
	return nvmlError{ret}
}

// Code is the NVML return code an error wraps, for metrics labels:
// "IN_USE", "INSUFFICIENT_RESOURCES", … or the number of a rarer code;
// "" if it wraps none.
func Code(err error) string {
	var e nvmlError
	if !errors.As(err, &e) {
		return ""
	}
	if name, ok := codeNames[e.ret]; ok {
		return name
	}
	return fmt.Sprintf("%d", int32(e.ret))
}

var codeNames = map[nvml.Return]string{
	nvml.ERROR_UNINITIALIZED:          "UNINITIALIZED",
	nvml.ERROR_INVALID_ARGUMENT:       "INVALID_ARGUMENT",
	nvml.ERROR_NOT_SUPPORTED:          "NOT_SUPPORTED",
	nvml.ERROR_NO_PERMISSION:          "NO_PERMISSION",
	nvml.ERROR_NOT_FOUND:              "NOT_FOUND",
	nvml.ERROR_INSUFFICIENT_RESOURCES: "INSUFFICIENT_RESOURCES",
	nvml.ERROR_IN_USE:                 "IN_USE",
	nvml.ERROR_GPU_IS_LOST:            "GPU_IS_LOST",
	nvml.ERROR_LIBRARY_NOT_FOUND:      "LIBRARY_NOT_FOUND",
	nvml.ERROR_TIMEOUT:                "TIMEOUT",
	nvml.ERROR_UNKNOWN:                "UNKNOWN",
}

// call annotates a failed NVML call with what was being attempted.
func call(ret nvml.Return, format string, args ...any) error {
	if err := errorOf(ret); err != nil {
		return fmt.Errorf(format+": %w", append(args, err)...)
	}
	return nil
}
