// Package demand reads a pod's MIG request: the one function the
// scheduler plugin, the stand-in kubelet and the tests use to say how many
// slices of which profile a pod holds on its node.
package demand

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	v1 "k8s.io/api/core/v1"
	resourcehelper "k8s.io/component-helpers/resource"

	"github.com/dynamig/dynamig/pkg/mig"
)

// Demand is a pod's MIG request: slices per profile, all on one node,
// e.g. {1g.10gb: 2, 3g.40gb: 1}.
type Demand map[mig.ProfileName]int

// Of reads a pod's MIG request the way kubelet and NodeResourcesFit
// count it: the larger of the init containers and the app containers plus
// sidecars. It reads requests: the API server defaults an extended
// resource's request from its limit, so a stored pod always has them. A
// resource in the MIG namespace that does not name a profile is an error
// naming the resource.
func Of(pod *v1.Pod) (Demand, error) {
	if !AsksForMIG(pod) {
		return nil, nil // the common case: no allocation, no request arithmetic
	}
	var d Demand
	var errs []error
	reqs := resourcehelper.PodRequests(pod, resourcehelper.PodResourcesOptions{})
	for name, q := range reqs {
		if !mig.IsMIGResource(string(name)) || q.IsZero() {
			continue
		}
		p, err := mig.ParseResourceName(string(name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if d == nil {
			d = Demand{}
		}
		d[p] += int(q.Value())
	}
	if len(errs) > 0 {
		sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
		return nil, errors.Join(errs...)
	}
	return d, nil
}

// AsksForMIG reports whether any container names a MIG resource,
// well-formed or not; Of says how many slices of which profile.
func AsksForMIG(pod *v1.Pod) bool {
	return names(pod, func(name v1.ResourceName) bool { return mig.IsMIGResource(string(name)) })
}

// AsksFor reports whether any container names the resource r.
func AsksFor(pod *v1.Pod, r v1.ResourceName) bool {
	return names(pod, func(name v1.ResourceName) bool { return name == r })
}

// names reports whether any container's requests or limits name a
// resource that match accepts.
func names(pod *v1.Pod, match func(v1.ResourceName) bool) bool {
	for _, cs := range [][]v1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			for _, l := range []v1.ResourceList{c.Resources.Requests, c.Resources.Limits} {
				for name := range l {
					if match(name) {
						return true
					}
				}
			}
		}
	}
	return false
}

// String prints a demand: "1g.10gb×2 + 3g.40gb".
func (d Demand) String() string {
	var parts []string
	for p, n := range d {
		if n == 1 {
			parts = append(parts, p.String())
		} else {
			parts = append(parts, fmt.Sprintf("%s×%d", p, n))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, " + ")
}
