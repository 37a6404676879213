package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodePartition is the MIG layout of one node: desired in spec, actual in
// status. It is cluster-scoped, named after its Node and owned by it.
//
// +genclient
// +genclient:nonNamespaced
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=np
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Node",type=string,JSONPath=`.metadata.name`
// +kubebuilder:printcolumn:name="GPUs",type=string,JSONPath=`.status.gpus[*].model`
// +kubebuilder:printcolumn:name="Plan",type=string,JSONPath=`.spec.planID`
// +kubebuilder:printcolumn:name="Applied",type=string,JSONPath=`.status.conditions[?(@.type=="Applied")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodePartition struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NodePartitionSpec   `json:"spec,omitempty"`
	Status NodePartitionStatus `json:"status,omitempty"`
}

// NodePartitionSpec is the desired layout, written only by the scheduler.
type NodePartitionSpec struct {
	// PlanID names the plan that wrote this spec, e.g. "p-7f3a9c". The agent
	// reports it back in status.observedPlanID once the layout is applied.
	// +optional
	// +kubebuilder:validation:MaxLength=63
	PlanID string `json:"planID,omitempty"`

	// GPUs holds the complete desired layout of each GPU it lists. A GPU not
	// listed keeps its slices.
	// +optional
	// +listType=map
	// +listMapKey=index
	// +kubebuilder:validation:MaxItems=16
	GPUs []GPULayout `json:"gpus,omitempty"`
}

// GPULayout is the complete desired layout of one GPU.
type GPULayout struct {
	// Index is the GPU's NVML index on the node.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=15
	Index int32 `json:"index"`

	// Slices are the GPU instances the GPU should have, each with one
	// full-size compute instance.
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=8
	Slices []Slice `json:"slices"`
}

// Slice is a GPU instance: a profile at a placement start.
type Slice struct {
	// Profile is the MIG profile as NVIDIA names it: "1g.10gb", "3g.40gb",
	// "1g.10gb+me", "1g.24gb-me", "1g.24gb+me.all", "4g.96gb+gfx".
	// +kubebuilder:validation:Pattern=`^[1-8]g\.[1-9][0-9]{0,3}gb(\+me|\+me\.all|-me|\+gfx)?$`
	Profile string `json:"profile"`

	// Start is the first memory slice the instance occupies (NVML placement start).
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=7
	Start int32 `json:"start"`
}

// NodePartitionStatus is what the node has, written only by the agent.
type NodePartitionStatus struct {
	// ObservedPlanID is the spec.planID the agent last applied.
	// +optional
	ObservedPlanID string `json:"observedPlanID,omitempty"`

	// ApplyingPlanID is the spec.planID the agent is applying in agent
	// mode, once kubelet can no longer allocate any slice it destroys:
	// from then on the scheduler may bind pods to the slices marked
	// advertised before the whole plan is applied.
	// +optional
	ApplyingPlanID string `json:"applyingPlanID,omitempty"`

	// ObservedGeneration is the metadata.generation the agent last acted on.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// DevicePlugin says who advertises the node's GPU resources to the
	// kubelet: "nvidia" (NVIDIA's device plugin, restarted by the agent
	// after each change) or "agent" (the agent itself). In both, the
	// scheduler counts the slices marked advertised, without waiting for
	// the kubelet's next node-status update.
	// +optional
	DevicePlugin DevicePluginMode `json:"devicePlugin,omitempty"`

	// GPUs are the node's MIG-capable GPUs as NVML reports them.
	// +optional
	// +listType=map
	// +listMapKey=index
	// +kubebuilder:validation:MaxItems=16
	GPUs []GPUStatus `json:"gpus,omitempty"`

	// Models are the GPU-instance profiles NVML offers, with their
	// placements, once per GPU model (the model's first GPU with MIG on);
	// the scheduler plans with them rather than its built-in catalog.
	// Once per model, not per GPU: the API server's work for each status
	// write grows with the object's size.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	Models []ModelStatus `json:"models,omitempty"`

	// Conditions: Applied (the spec's layout exists and is advertised),
	// Failed (why the last apply did not succeed, in words a user can act
	// on), and DevicePluginRestarting (True while the agent restarts the
	// device plugin, or while the node's kubelet restarts: the
	// scheduler binds no MIG pod to the node then).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// DevicePluginMode is who advertises a node's GPU resources.
// +kubebuilder:validation:Enum=nvidia;agent
type DevicePluginMode string

// Device-plugin modes.
const (
	DevicePluginNVIDIA DevicePluginMode = "nvidia"
	DevicePluginAgent  DevicePluginMode = "agent"
)

// MIGMode is a GPU's MIG mode.
// +kubebuilder:validation:Enum=Enabled;Disabled;EnablePending;DisablePending
type MIGMode string

// MIG modes. The pending ones wait for a GPU reset or a reboot.
const (
	MIGEnabled        MIGMode = "Enabled"
	MIGDisabled       MIGMode = "Disabled"
	MIGEnablePending  MIGMode = "EnablePending"
	MIGDisablePending MIGMode = "DisablePending"
)

// GPUStatus is one GPU as NVML reports it.
type GPUStatus struct {
	// Index is the GPU's NVML index on the node.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=15
	Index int32 `json:"index"`

	// UUID is the GPU's UUID, "GPU-…".
	// +optional
	UUID string `json:"uuid,omitempty"`

	// Model is the catalog model ("A100-80GB") or, for a GPU the catalog
	// does not know, the NVML name.
	Model string `json:"model"`

	// MIGMode is the current MIG mode, or the pending change.
	MIGMode MIGMode `json:"migMode"`

	// Profiles are the GPU-instance profiles NVML offers on this GPU,
	// listed only where they differ from those models lists for its
	// model (agents before models was added listed them on every GPU).
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	Profiles []ProfileStatus `json:"profiles,omitempty"`

	// Slices are the GPU instances that exist.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=8
	Slices []SliceStatus `json:"slices,omitempty"`
}

// ModelStatus is the profiles NVML offers on a GPU model.
type ModelStatus struct {
	// Name is the model, as the GPUs' model field names it.
	Name string `json:"name"`

	// Profiles are the GPU-instance profiles NVML offers, with their
	// placements. A model that lists a profile twice is not planned on.
	// Atomic: the agent alone writes them, whole, and a list keyed by
	// name would have the API server track every field of every profile
	// in metadata.managedFields, on every status write.
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=32
	Profiles []ProfileStatus `json:"profiles"`
}

// ProfileStatus is a profile NVML offers on a GPU.
type ProfileStatus struct {
	// +kubebuilder:validation:Pattern=`^[1-8]g\.[1-9][0-9]{0,3}gb(\+me|\+me\.all|-me|\+gfx)?$`
	Name string `json:"name"`
	// MemorySlices is the placement size.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=8
	MemorySlices int32 `json:"memorySlices"`
	// MaxCount is nvmlGpuInstanceProfileInfo.instanceCount.
	// +kubebuilder:validation:Minimum=0
	MaxCount int32 `json:"maxCount"`
	// Starts are the possible placement starts.
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=8
	Starts []int32 `json:"starts"`
}

// SliceStatus is a GPU instance that exists.
type SliceStatus struct {
	Slice `json:",inline"`
	// UUID is the MIG device UUID the device plugin advertises, "MIG-…".
	// +optional
	UUID string `json:"uuid,omitempty"`
	// Used is true while a container holds the device.
	Used bool `json:"used"`
	// Advertised is true when the kubelet can allocate the device: its
	// PodResources API lists it as allocatable under the profile's
	// resource name.
	// +optional
	Advertised bool `json:"advertised,omitempty"`
}

// NodePartitionList is a list of NodePartitions.
//
// +kubebuilder:object:root=true
type NodePartitionList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodePartition `json:"items"`
}

// Condition types and reasons of NodePartition status.
const (
	ConditionApplied    = "Applied"
	ConditionFailed     = "Failed"
	ConditionRestarting = "DevicePluginRestarting"
)
