// Package planner decides MIG layouts: given a snapshot of nodes, their
// GPUs and slices, and the pending pods, it returns the complete desired
// layout of every GPU and, for every pending pod, where it would run or why
// it cannot. It is pure: snapshot in, plan out, no client-go, no NVML.
//
// The dynamig strategy plans all pending pods jointly. Its objective, in
// order: serve the most pods (a pod of higher priority outweighs any number
// of pods of lower priority); destroy and create the fewest slices; strand
// the least capacity (keep large contiguous free regions and whole GPUs
// free); and be deterministic. Hard rules for every strategy: a used slice
// is never removed or moved; a node keeps at least as many slices of a
// profile as its bound pods request; every layout is valid for its model.
package planner

import (
	"fmt"
	"sort"
	"time"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Snapshot is the planner's input.
type Snapshot struct {
	Nodes []Node
	Pods  []Pod // pending pods
}

// Node is a node with MIG-capable GPUs.
type Node struct {
	Name string
	GPUs []GPU
	// Bound counts, per profile, the slices requested by pods already bound
	// to the node, whether or not kubelet has allocated their devices yet.
	// The plan keeps at least that many slices of each profile: free slices
	// of a profile whose bound demand exceeds its used slices are kept as
	// they are.
	Bound map[mig.ProfileName]int
	// Busy is true while a plan published for the node is still being
	// applied: slices planned there now wait for its current steps (a
	// second or so per slice on real GPUs). Among placements that are
	// otherwise equal, the planner prefers a node that is not busy.
	Busy bool
}

// GPU is one GPU and its current slices.
type GPU struct {
	Index  int
	Model  *mig.Model
	Slices []Slice
}

// Slice is an existing or planned GPU instance.
type Slice struct {
	mig.Slice
	// Used is true for a slice a container holds: it is never destroyed or moved.
	Used bool `json:"used"`
}

// Pod is a pending pod's MIG demand.
type Pod struct {
	Name     string
	Requests map[mig.ProfileName]int // e.g. {1g.10gb: 2}; all on one node
	Priority int32
	Created  time.Time
	// Nodes are the nodes the pod may run on (node selectors, taints and the
	// scheduler's other filters already applied); nil means every node.
	Nodes []string
}

// Plan is the planner's output.
type Plan struct {
	Strategy string       `json:"strategy"`
	Nodes    []NodeLayout `json:"nodes"`
	Pods     []Assignment `json:"pods"`
	// Served is the number of pods served; Created and Destroyed count the
	// slices the plan creates and destroys.
	Served    int `json:"podsServed"`
	Created   int `json:"slicesCreated"`
	Destroyed int `json:"slicesDestroyed"`
}

// NodeLayout is the complete desired layout of a node's GPUs.
type NodeLayout struct {
	Name string      `json:"name"`
	GPUs []GPULayout `json:"gpus"`
}

// GPULayout is the complete desired layout of one GPU, used slices included.
type GPULayout struct {
	Index  int     `json:"index"`
	Model  string  `json:"model"`
	Slices []Slice `json:"slices"`
}

// Assignment says where a pending pod would run, or why it cannot.
type Assignment struct {
	Pod    string     `json:"name"`
	Node   string     `json:"node,omitempty"`
	Slices []SliceRef `json:"slices,omitempty"`
	Reason string     `json:"reason,omitempty"`
}

// SliceRef names one slice of a node: GPU index, profile and start.
type SliceRef struct {
	GPU int `json:"gpu"`
	mig.Slice
}

// String prints the slice with its GPU: "1:4g.40gb@0".
func (r SliceRef) String() string { return fmt.Sprintf("%d:%s", r.GPU, r.Slice) }

// Served reports whether the pod got a node.
func (a Assignment) Served() bool { return a.Node != "" }

// Validate checks a snapshot: unique node and pod names, valid current
// layouts, positive requests, and eligible nodes that exist.
func (s *Snapshot) Validate() error {
	nodes := make(map[string]bool, len(s.Nodes))
	for _, n := range s.Nodes {
		if nodes[n.Name] {
			return fmt.Errorf("node %q appears twice", n.Name)
		}
		nodes[n.Name] = true
		for _, g := range n.GPUs {
			if g.Model == nil {
				return fmt.Errorf("node %q gpu %d: no model", n.Name, g.Index)
			}
			if err := g.Model.Validate(mig.LayoutOf(g.Slices)); err != nil {
				return fmt.Errorf("node %q gpu %d: %w", n.Name, g.Index, err)
			}
		}
	}
	pods := make(map[string]bool, len(s.Pods))
	for _, p := range s.Pods {
		if pods[p.Name] {
			return fmt.Errorf("pod %q appears twice", p.Name)
		}
		pods[p.Name] = true
		if len(p.Requests) == 0 {
			return fmt.Errorf("pod %q requests no MIG slice", p.Name)
		}
		for prof, n := range p.Requests {
			if n <= 0 {
				return fmt.Errorf("pod %q: request for %s must be positive, got %d", p.Name, prof, n)
			}
		}
		for _, n := range p.Nodes {
			if !nodes[n] {
				return fmt.Errorf("pod %q: eligible node %q is not in the snapshot", p.Name, n)
			}
		}
	}
	return nil
}

// sortedProfiles returns the profiles of a request map in a fixed order:
// most compute slices first, then by name.
func sortedProfiles(req map[mig.ProfileName]int) []mig.ProfileName {
	out := make([]mig.ProfileName, 0, len(req))
	for p := range req {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Compute != out[j].Compute {
			return out[i].Compute > out[j].Compute
		}
		return out[i].String() < out[j].String()
	})
	return out
}
