// Package builders holds helpers shared by the unit and integration tests.
package builders

import (
	"fmt"
	"sort"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
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

// Resources is a resource list from name, quantity pairs:
// Resources("nvidia.com/mig-1g.10gb", "2", "cpu", "1").
func Resources(kv ...string) v1.ResourceList {
	out := v1.ResourceList{}
	for i := 0; i < len(kv); i += 2 {
		out[v1.ResourceName(kv[i])] = resource.MustParse(kv[i+1])
	}
	return out
}

// Container is a container named "c" whose requests and limits are
// resources, as the API server defaults them for extended resources.
func Container(resources v1.ResourceList) v1.Container {
	return v1.Container{Name: "c", Resources: v1.ResourceRequirements{Limits: resources, Requests: resources}}
}

// NodePartition is the NodePartition of node "n" with a spec (plan planID,
// layouts spec) and a status (observed plan observed, GPUs gpus).
func NodePartition(spec []v1alpha1.GPULayout, planID, observed string, gpus ...v1alpha1.GPUStatus) *v1alpha1.NodePartition {
	return &v1alpha1.NodePartition{
		ObjectMeta: metav1.ObjectMeta{Name: "n"},
		Spec:       v1alpha1.NodePartitionSpec{PlanID: planID, GPUs: spec},
		Status:     v1alpha1.NodePartitionStatus{ObservedPlanID: observed, GPUs: gpus},
	}
}

// GPU is a GPU's status with MIG enabled and these slices.
func GPU(index int32, model string, slices ...v1alpha1.SliceStatus) v1alpha1.GPUStatus {
	return v1alpha1.GPUStatus{Index: index, Model: model, MIGMode: v1alpha1.MIGEnabled, Slices: slices}
}

// Used is a slice a container holds.
func Used(profile string, start int32) v1alpha1.SliceStatus {
	return v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: profile, Start: start}, Used: true}
}

// Free is a slice nobody holds.
func Free(profile string, start int32) v1alpha1.SliceStatus {
	return v1alpha1.SliceStatus{Slice: v1alpha1.Slice{Profile: profile, Start: start}}
}

// Advertised is a slice nobody holds that kubelet can allocate.
func Advertised(profile string, start int32) v1alpha1.SliceStatus {
	s := Free(profile, start)
	s.Advertised = true
	return s
}

// Without is a model's profiles less one, as an older driver offers them:
// Without(a100.Profiles, "1g.20gb").
func Without(profiles []mig.Profile, name string) []mig.Profile {
	var out []mig.Profile
	for _, p := range profiles {
		if p.Name.String() != name {
			out = append(out, p)
		}
	}
	return out
}
