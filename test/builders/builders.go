// Package builders holds helpers shared by the unit and integration tests.
package builders

import (
	"fmt"
	"sort"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
)

// SpecLayout prints a NodePartition's desired layout of one GPU, sorted:
// ["1g.10gb@6", "4g.40gb@0"].
func SpecLayout(np *v1alpha1.NodePartition, gpu int32) []string {
	var out []string
	for _, g := range np.Spec.GPUs {
		if g.Index == gpu {
			for _, s := range g.Slices {
				out = append(out, fmt.Sprintf("%s@%d", s.Profile, s.Start))
			}
		}
	}
	sort.Strings(out)
	return out
}
