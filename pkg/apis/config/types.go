// Package config holds the internal form of the DynamicMIG plugin's
// arguments, and their validation. The versioned form users write in a
// KubeSchedulerConfiguration is in package v1.
package config

import (
	"time"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// DynamicMIGArgs are the DynamicMIG plugin's arguments, defaulted.
type DynamicMIGArgs struct {
	// NodeSelector selects the nodes whose MIG layout dynamig may change.
	NodeSelector string
	// PlanTimeout is how long a published plan may stay unapplied before
	// the scheduler plans around that node and marks it stale.
	PlanTimeout time.Duration
	// MaxNodesPerPlan bounds the nodes one plan considers.
	MaxNodesPerPlan int32
	// MaxPendingPodsPerPlan bounds the pending pods one plan considers,
	// highest priority and oldest first; the pod being scheduled is always
	// one of them.
	MaxPendingPodsPerPlan int32
}

// Validate checks the arguments; errors name the field under path.
func Validate(path *field.Path, a *DynamicMIGArgs) field.ErrorList {
	var errs field.ErrorList
	if _, err := labels.Parse(a.NodeSelector); err != nil {
		errs = append(errs, field.Invalid(path.Child("nodeSelector"), a.NodeSelector, err.Error()))
	} else if a.NodeSelector == "" {
		errs = append(errs, field.Required(path.Child("nodeSelector"), "an empty selector would let dynamig repartition every node"))
	}
	if a.PlanTimeout <= 0 {
		errs = append(errs, field.Invalid(path.Child("planTimeout"), a.PlanTimeout.String(), "must be positive"))
	}
	if a.MaxNodesPerPlan < 1 {
		errs = append(errs, field.Invalid(path.Child("maxNodesPerPlan"), a.MaxNodesPerPlan, "must be at least 1"))
	}
	if a.MaxPendingPodsPerPlan < 1 {
		errs = append(errs, field.Invalid(path.Child("maxPendingPodsPerPlan"), a.MaxPendingPodsPerPlan, "must be at least 1"))
	}
	return errs
}
