package agent

// Condition and event reasons the agent records, on the NodePartition
// (`kubectl describe nodepartition <node>`) and, for MIG mode, on the Node.
const (
	// ReasonApplied: the spec's layout exists and the device plugin advertises it.
	ReasonApplied = "Applied"
	// ReasonNoPlan: no plan has been published for the node yet.
	ReasonNoPlan = "NoPlan"
	// ReasonApplying: the agent is working on the plan.
	ReasonApplying = "Applying"
	// ReasonRestarting, on condition DevicePluginRestarting: the agent
	// restarts the device plugin; ReasonNotRestarting: it does not.
	ReasonRestarting    = "Restarting"
	ReasonNotRestarting = "NotRestarting"
	// ReasonKubeletRestarting, on DevicePluginRestarting and Applied: the
	// node's kubelet went, or came back less than 5 s ago;
	// the agent changes nothing and the scheduler binds no MIG pod to the
	// node until it has settled.
	ReasonKubeletRestarting = "KubeletRestarting"
	// ReasonWaitingForAdmission: a pod bound to the node is not admitted by
	// kubelet yet; the agent destroys no slice it could be given, and does
	// not restart the device plugin (which would fail its admission), until
	// it is.
	ReasonWaitingForAdmission = "WaitingForAdmission"
	// ReasonSliceInUse: the plan would destroy a slice a pod holds; the GPU
	// is left as it is and the scheduler plans again from the status.
	ReasonSliceInUse = "SliceInUse"
	// ReasonKubeletUnreachable: kubelet's PodResources API did not answer
	// (or names MIG devices by index), so no slice can be proven free: every
	// slice is reported used, none is destroyed, and a re-advertisement
	// cannot be confirmed.
	ReasonKubeletUnreachable = "KubeletUnreachable"
	// ReasonMIGDisabled: a GPU of the plan has MIG mode off or pending a reset.
	ReasonMIGDisabled = "MIGModeDisabled"
	// ReasonNoSuchGPU: the plan names a GPU index the node does not have.
	ReasonNoSuchGPU = "NoSuchGPU"
	// ReasonInvalidSpec: the plan's layout is not valid for the GPU.
	ReasonInvalidSpec = "InvalidSpec"
	// ReasonNVMLError: an NVML call failed; the agent retries with backoff.
	ReasonNVMLError = "NVMLError"
	// ReasonDevicePluginTimeout: the device plugin did not re-advertise the
	// slices in time; the agent retries.
	ReasonDevicePluginTimeout = "DevicePluginTimeout"
	// ReasonCDISpecFailed: agent mode could not write or remove the CDI
	// spec of a device (its directory); the devices are not advertised
	// anew until it can.
	ReasonCDISpecFailed = "CDISpecFailed"
	// ReasonDevicePluginConflict: NVIDIA's device plugin runs on a node in
	// agent mode; the agent advertises nothing until it is gone.
	ReasonDevicePluginConflict = "DevicePluginConflict"
)
