// Package cdi writes the Container Device Interface specs of the agent's
// devices (agent mode): one transient spec per device — kind
// dynamig.io/gpu (deviceplugin.CDIKind), named by its MIG UUID — written
// before the device is advertised and removed once it is gone, so that a
// CDI-enabled runtime (containerd 1.7+, CRI-O 1.24+, the GPU Operator's
// default since v25.10) resolves the name the device plugin's Allocate
// returns. Specs are validated and written atomically by the CDI library
// the runtimes use (tags.cncf.io/container-device-interface).
//
// Where the NVIDIA driver is present a spec holds the edits the NVIDIA
// container toolkit's CDI library generates for the device (Toolkit): its
// device nodes, the driver's libraries and the toolkit's hooks, and
// NVIDIA_VISIBLE_DEVICES=void, so that no NVIDIA runtime hook injects it
// again. Without them (Edits nil) it holds NVIDIA_VISIBLE_DEVICES=<MIG
// UUID>, and the container gets its device only from a runtime that reads
// that variable.
package cdi

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/dynamig/dynamig/node-agent/deviceplugin"
)

// DefaultDir is where the agent writes its specs: the runtimes' dynamic
// spec directory.
const DefaultDir = "/var/run/cdi"

// Specs writes the specs into one directory.
type Specs struct {
	dir    string
	cache  *cdi.Cache
	prefix string // of the agent's spec files
	edits  Edits
}

// Edits are the container edits that give a container a device, but
// NVIDIA_VISIBLE_DEVICES (Toolkit).
type Edits interface {
	Edits(id string) (specs.ContainerEdits, error)
}

// New prepares dir (creating it); edits, if not nil, add to every spec.
func New(dir string, edits Edits) (*Specs, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("CDI spec directory: %w", err)
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dir), cdi.WithAutoRefresh(false))
	if err != nil {
		return nil, err
	}
	vendor, class := parser.ParseQualifier(deviceplugin.CDIKind)
	return &Specs{dir: dir, cache: cache, prefix: cdi.GenerateTransientSpecName(vendor, class, ""), edits: edits}, nil
}

// Sync makes the directory hold exactly the specs of the devices ids: it
// writes those missing and removes those of devices gone.
func (s *Specs) Sync(ids []string) error {
	want := map[string]bool{}
	for _, id := range ids {
		want[s.prefix+id+".yaml"] = true
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("reading CDI spec directory %s: %w", s.dir, err)
	}
	have := map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, s.prefix) {
			continue // another vendor's
		}
		if !want[name] {
			if err := s.cache.RemoveSpec(name); err != nil {
				return fmt.Errorf("removing CDI spec %s: %w", name, err)
			}
			continue
		}
		have[name] = true
	}
	for _, id := range ids {
		name := s.prefix + id + ".yaml"
		if have[name] {
			continue
		}
		spec, err := s.spec(id)
		if err != nil {
			return err
		}
		if err := s.cache.WriteSpec(spec, name); err != nil {
			return fmt.Errorf("writing the CDI spec of %s into %s: %w", id, s.dir, err)
		}
	}
	return nil
}

// spec is the CDI spec of one device.
func (s *Specs) spec(id string) (*specs.Spec, error) {
	edits := specs.ContainerEdits{Env: []string{"NVIDIA_VISIBLE_DEVICES=" + id}}
	if s.edits != nil {
		// The toolkit's edits set NVIDIA_VISIBLE_DEVICES=void, so that an
		// NVIDIA runtime hook does not inject the device a second time.
		var err error
		if edits, err = s.edits.Edits(id); err != nil {
			return nil, err
		}
	}
	spec := &specs.Spec{Kind: deviceplugin.CDIKind, Devices: []specs.Device{{Name: id, ContainerEdits: edits}}}
	if v, err := cdi.MinimumRequiredVersion(spec); err == nil {
		spec.Version = v
	} else {
		spec.Version = specs.CurrentVersion
	}
	return spec, nil
}

// Path is where the spec of a device is.
func (s *Specs) Path(id string) string { return filepath.Join(s.dir, s.prefix+id+".yaml") }
