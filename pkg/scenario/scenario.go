// Package scenario reads and writes the YAML scenario files of the dynamig
// CLI: nodes with their GPUs and existing slices, and pods that arrive,
// run and finish. See README.md "Scenario files" for the format.
package scenario

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/planner"
)

// Scenario is one scenario file.
type Scenario struct {
	Nodes []Node `yaml:"nodes"`
	// ReconfigureSeconds is the time from a plan to usable slices: applying
	// the layout and re-advertising it to kubelet.
	ReconfigureSeconds float64 `yaml:"reconfigureSeconds,omitempty"`
	Pods               []Pod   `yaml:"pods"`
}

// Node is a node with MIG-capable GPUs.
type Node struct {
	Name   string            `yaml:"name"`
	GPUs   []string          `yaml:"gpus,flow"` // catalog model names, one per GPU
	Labels map[string]string `yaml:"labels,omitempty"`
	Slices []Slice           `yaml:"slices,omitempty"`

	models []*mig.Model
}

// Slice is an existing slice on a node.
type Slice struct {
	GPU     int    `yaml:"gpu"`
	Profile string `yaml:"profile"`
	Start   int    `yaml:"start"`
	Used    bool   `yaml:"used,omitempty"` // held by a workload outside the scenario, forever
}

// Pod is a pod that arrives, waits for MIG slices, runs and finishes.
type Pod struct {
	Name         string            `yaml:"name"`
	Arrival      float64           `yaml:"arrival"`  // seconds from the start
	Duration     float64           `yaml:"duration"` // seconds it runs once bound; 0 = forever
	Priority     int32             `yaml:"priority,omitempty"`
	Requests     map[string]int    `yaml:"requests,flow"` // MIG resource name → count
	NodeSelector map[string]string `yaml:"nodeSelector,omitempty,flow"`

	demand map[mig.ProfileName]int
}

// Load reads and validates a scenario file.
func Load(path string) (*Scenario, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading scenario: %w", err)
	}
	s, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// Parse decodes and validates a scenario. Unknown fields are errors; every
// error names the line and the field.
func Parse(data []byte) (*Scenario, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("parsing YAML: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var s Scenario
	if err := dec.Decode(&s); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty scenario: want nodes and pods")
		}
		return nil, fmt.Errorf("decoding scenario: %w", err)
	}
	if err := s.validate(&root); err != nil {
		return nil, err
	}
	return &s, nil
}

// Marshal writes a scenario as YAML.
func (s *Scenario) Marshal() ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(s); err != nil {
		return nil, fmt.Errorf("encoding scenario: %w", err)
	}
	return b.Bytes(), nil
}

// validate checks the semantics and resolves models and profiles. root is
// the parsed document, for line numbers.
func (s *Scenario) validate(root *yaml.Node) error {
	at := func(path ...any) string {
		if line := lineOf(root, path...); line > 0 {
			return fmt.Sprintf("line %d: ", line)
		}
		return ""
	}
	if len(s.Nodes) == 0 {
		return fmt.Errorf("%snodes: at least one node is needed", at())
	}
	if s.ReconfigureSeconds < 0 {
		return fmt.Errorf("%sreconfigureSeconds: must not be negative, got %g", at("reconfigureSeconds"), s.ReconfigureSeconds)
	}
	nodes := map[string]bool{}
	for i := range s.Nodes {
		n := &s.Nodes[i]
		if n.Name == "" {
			return fmt.Errorf("%snodes[%d].name: missing", at("nodes", i), i)
		}
		if nodes[n.Name] {
			return fmt.Errorf("%snodes[%d].name: node %q appears twice", at("nodes", i, "name"), i, n.Name)
		}
		nodes[n.Name] = true
		if len(n.GPUs) == 0 {
			return fmt.Errorf("%snode %q: gpus: at least one GPU is needed", at("nodes", i), n.Name)
		}
		n.models = make([]*mig.Model, len(n.GPUs))
		for g, name := range n.GPUs {
			m, err := mig.ModelByName(name)
			if err != nil {
				return fmt.Errorf("%snode %q: gpus[%d]: %w", at("nodes", i, "gpus", g), n.Name, g, err)
			}
			n.models[g] = m
		}
		layouts := make([][]mig.Slice, len(n.GPUs))
		for j, sl := range n.Slices {
			where := at("nodes", i, "slices", j)
			if sl.GPU < 0 || sl.GPU >= len(n.GPUs) {
				return fmt.Errorf("%snode %q: slices[%d].gpu: %d is not a GPU of the node (0 to %d)", where, n.Name, j, sl.GPU, len(n.GPUs)-1)
			}
			p, err := mig.ParseProfile(sl.Profile)
			if err != nil {
				return fmt.Errorf("%snode %q: slices[%d].profile: %w", where, n.Name, j, err)
			}
			layouts[sl.GPU] = append(layouts[sl.GPU], mig.Slice{Profile: p, Start: sl.Start})
			if err := n.models[sl.GPU].Validate(layouts[sl.GPU]); err != nil {
				return fmt.Errorf("%snode %q gpu %d: slices[%d]: %w", where, n.Name, sl.GPU, j, err)
			}
		}
	}
	pods := map[string]bool{}
	for i := range s.Pods {
		p := &s.Pods[i]
		where := at("pods", i)
		switch {
		case p.Name == "":
			return fmt.Errorf("%spods[%d].name: missing", where, i)
		case pods[p.Name]:
			return fmt.Errorf("%spods[%d].name: pod %q appears twice", at("pods", i, "name"), i, p.Name)
		case p.Arrival < 0:
			return fmt.Errorf("%spod %q: arrival: must not be negative, got %g", at("pods", i, "arrival"), p.Name, p.Arrival)
		case p.Duration < 0:
			return fmt.Errorf("%spod %q: duration: must not be negative, got %g", at("pods", i, "duration"), p.Name, p.Duration)
		case len(p.Requests) == 0:
			return fmt.Errorf("%spod %q: requests: at least one nvidia.com/mig-* resource is needed", where, p.Name)
		}
		pods[p.Name] = true
		p.demand = map[mig.ProfileName]int{}
		for _, r := range slices.Sorted(maps.Keys(p.Requests)) {
			n := p.Requests[r]
			prof, err := mig.ParseResourceName(r)
			if err != nil {
				return fmt.Errorf("%spod %q: requests: %w", at("pods", i, "requests", r), p.Name, err)
			}
			if n <= 0 {
				return fmt.Errorf("%spod %q: requests: %s must be positive, got %d", at("pods", i, "requests", r), p.Name, r, n)
			}
			p.demand[prof] += n
		}
	}
	return nil
}

// lineOf finds the line of a node in the document by mapping keys (string)
// and sequence indexes (int); 0 if the path is not there. A path ending in
// a mapping key gives the line of its value.
func lineOf(root *yaml.Node, path ...any) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	for _, step := range path {
		switch k := step.(type) {
		case string:
			if n.Kind != yaml.MappingNode {
				return n.Line
			}
			found := false
			for j := 0; j+1 < len(n.Content); j += 2 {
				if n.Content[j].Value == k {
					n, found = n.Content[j+1], true
					break
				}
			}
			if !found {
				return n.Line
			}
		case int:
			if n.Kind != yaml.SequenceNode || k >= len(n.Content) {
				return n.Line
			}
			n = n.Content[k]
		}
	}
	return n.Line
}

// Models returns the model of each GPU of node i.
func (s *Scenario) Models(i int) []*mig.Model { return s.Nodes[i].models }

// Demand returns pod i's requests as profiles.
func (s *Scenario) Demand(i int) map[mig.ProfileName]int { return s.Pods[i].demand }

// Eligible returns the nodes whose labels match pod i's node selector, or
// nil (every node) when it has none.
func (s *Scenario) Eligible(i int) []string {
	sel := s.Pods[i].NodeSelector
	if len(sel) == 0 {
		return nil
	}
	out := []string{}
	for _, n := range s.Nodes {
		match := true
		for k, v := range sel {
			if n.Labels[k] != v {
				match = false
			}
		}
		if match {
			out = append(out, n.Name)
		}
	}
	return out
}

// Epoch is the wall-clock time of second 0 of every scenario, so that pod
// creation times are deterministic.
var Epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// At returns the time of a scenario second.
func At(seconds float64) time.Time {
	return Epoch.Add(time.Duration(seconds * float64(time.Second)))
}

// Snapshot is the planner's view at time 0: the nodes with their slices,
// and the pods that have arrived by then.
func (s *Scenario) Snapshot() *planner.Snapshot {
	snap := &planner.Snapshot{}
	for _, n := range s.Nodes {
		pn := planner.Node{Name: n.Name}
		for g, m := range n.models {
			pn.GPUs = append(pn.GPUs, planner.GPU{Index: g, Model: m})
		}
		for _, sl := range n.Slices {
			pn.GPUs[sl.GPU].Slices = append(pn.GPUs[sl.GPU].Slices, planner.Slice{
				Slice: mig.Slice{Profile: mig.MustParseProfile(sl.Profile), Start: sl.Start}, Used: sl.Used,
			})
		}
		snap.Nodes = append(snap.Nodes, pn)
	}
	for i, p := range s.Pods {
		if p.Arrival > 0 {
			continue
		}
		snap.Pods = append(snap.Pods, planner.Pod{
			Name: p.Name, Requests: p.demand, Priority: p.Priority, Created: At(p.Arrival), Nodes: s.Eligible(i),
		})
	}
	return snap
}
