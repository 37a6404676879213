// Package guard names dynamig's safety guards, so that a test build can
// switch one off and show that the soak (make soak) catches its absence.
// In every normal build Off is constant false and the guards always run;
// only a binary built with -tags dynamig_unsafe reads DYNAMIG_GUARDS_OFF
// (a comma-separated list of the names below).
package guard

// The guards, by the rule each enforces (README, "Safety rules").
const (
	// InFlight: the scheduler binds no MIG pod to a node whose published
	// plan is not applied yet.
	InFlight = "in-flight"
	// Admission: the agent destroys no free slice of a profile, and
	// restarts no device plugin, while a pod bound to its node that asks
	// for that profile (for a restart: any MIG profile) is not admitted.
	Admission = "admission"
	// Recheck: the agent asks kubelet again who holds a slice just before
	// destroying it.
	Recheck = "recheck"
	// Identity: the agent confirms a re-advertisement by the device IDs
	// kubelet can allocate, not by counts.
	Identity = "identity"
	// Refused: the agent never pursues a plan it refused.
	Refused = "refused-plan"
	// KubeletRestart: the scheduler binds no MIG pod to a node from when
	// its kubelet goes until a while after it is back.
	KubeletRestart = "kubelet-restart"
)

// All lists the guards.
var All = []string{InFlight, Admission, Recheck, Identity, Refused, KubeletRestart}
