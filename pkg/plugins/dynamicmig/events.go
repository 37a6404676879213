package dynamicmig

// Event reasons DynamicMIG records, on the pod (with the node as related
// object where there is one) or on the node. `kubectl describe pod` then tells the story:
// MIGRepartitionPlanned, then the scheduler's Scheduled once the slices are
// advertised; or MIGInvalidRequest and the pod stays Pending.
const (
	// ReasonPlanned: a new layout was published for the pod's node.
	ReasonPlanned = "MIGRepartitionPlanned"
	// ReasonWaiting: the pod is nominated to slices that exist or are
	// planned already; it waits for them without a new plan.
	ReasonWaiting = "MIGWaitingForSlices"
	// ReasonInvalidRequest: the pod asks for a MIG resource that names no profile.
	ReasonInvalidRequest = "MIGInvalidRequest"
	// ReasonPlanNotApplied, on a Node: its agent has not applied the
	// published plan within planTimeout; new plans leave the node alone.
	ReasonPlanNotApplied = "MIGPlanNotApplied"
)
