// Package v1alpha1 is the dynamig.io/v1alpha1 API: NodePartition, one per
// MIG node, named after the node. The scheduler writes its spec (the
// desired layout per GPU and the plan that chose it); the node agent writes
// its status (what NVML reports and whether the plan is applied).
//
// +kubebuilder:object:generate=true
// +groupName=dynamig.io
package v1alpha1
