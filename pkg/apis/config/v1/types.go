// Package v1 is the versioned form of the DynamicMIG plugin's arguments,
// as users write them under pluginConfig in a KubeSchedulerConfiguration:
//
//	pluginConfig:
//	- name: DynamicMIG
//	  args:
//	    nodeSelector: dynamig.io/partitioning=mig
//	    planTimeout: 2m
//	    maxNodesPerPlan: 100
package v1

import (
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/dynamig/dynamig/pkg/apis/config"
)

// DynamicMIGArgs are the plugin's arguments. Every field is optional.
type DynamicMIGArgs struct {
	metav1.TypeMeta `json:",inline"`

	// NodeSelector is a label selector for the nodes dynamig may
	// repartition. Default: dynamig.io/partitioning=mig.
	NodeSelector *string `json:"nodeSelector,omitempty"`
	// PlanTimeout is how long a published plan may stay unapplied before
	// the scheduler plans around the node. Default: 5m: longer than the
	// agent's --device-plugin-timeout (2m) plus an apply, so that a slow
	// but healthy apply is not planned around.
	PlanTimeout *metav1.Duration `json:"planTimeout,omitempty"`
	// MaxNodesPerPlan bounds the nodes one plan considers, among those the
	// pod's node selector, required node affinity and tolerations allow:
	// past it, those with free slices of its profiles, then the most
	// compute no pod holds. Default: 100.
	MaxNodesPerPlan *int32 `json:"maxNodesPerPlan,omitempty"`
	// MaxPendingPodsPerPlan bounds the pending pods one plan considers.
	// Default: 200.
	MaxPendingPodsPerPlan *int32 `json:"maxPendingPodsPerPlan,omitempty"`
}

// Defaults.
const (
	DefaultNodeSelector          = "dynamig.io/partitioning=mig"
	DefaultMaxNodesPerPlan       = 100
	DefaultMaxPendingPodsPerPlan = 200
)

// DefaultPlanTimeout is the default planTimeout.
var DefaultPlanTimeout = metav1.Duration{Duration: 5 * time.Minute}

// SetDefaults fills the fields left out.
func SetDefaults(a *DynamicMIGArgs) {
	if a.NodeSelector == nil {
		a.NodeSelector = ptr.To(DefaultNodeSelector)
	}
	if a.PlanTimeout == nil {
		a.PlanTimeout = &DefaultPlanTimeout
	}
	if a.MaxNodesPerPlan == nil {
		a.MaxNodesPerPlan = ptr.To[int32](DefaultMaxNodesPerPlan)
	}
	if a.MaxPendingPodsPerPlan == nil {
		a.MaxPendingPodsPerPlan = ptr.To[int32](DefaultMaxPendingPodsPerPlan)
	}
}

// Decode reads the plugin's args as the scheduler hands them over (nil, or
// *runtime.Unknown holding JSON or YAML): strictly, so that a misspelt
// field is an error; then defaults, converts and validates them.
func Decode(obj runtime.Object) (*config.DynamicMIGArgs, error) {
	var v DynamicMIGArgs
	if obj != nil {
		u, ok := obj.(*runtime.Unknown)
		if !ok {
			return nil, fmt.Errorf("DynamicMIG args: want raw arguments, got %T", obj)
		}
		if len(u.Raw) > 0 {
			if err := yaml.UnmarshalStrict(u.Raw, &v); err != nil {
				return nil, fmt.Errorf("DynamicMIG args: %w", err)
			}
		}
	}
	SetDefaults(&v)
	out := &config.DynamicMIGArgs{
		NodeSelector:          *v.NodeSelector,
		PlanTimeout:           v.PlanTimeout.Duration,
		MaxNodesPerPlan:       *v.MaxNodesPerPlan,
		MaxPendingPodsPerPlan: *v.MaxPendingPodsPerPlan,
	}
	if errs := config.Validate(field.NewPath("pluginConfig[DynamicMIG]", "args"), out); len(errs) > 0 {
		return nil, fmt.Errorf("invalid DynamicMIG args: %w", errs.ToAggregate())
	}
	return out, nil
}
