package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
)

// event is an Event for emit to record.
type event struct {
	// once, if set, de-duplicates: the event is not recorded when the last
	// one recorded under this key had the same reason and message.
	once string
	// forget, with once, records nothing but forgets the key's last event,
	// so that the next one under it is recorded whatever it says.
	forget                bool
	ref                   *v1.ObjectReference
	kind, reason, message string
}

// report is the status to write after a sync and the events to record,
// without side effects. The GPUs are as observed (nil: nothing could be
// observed, keep those last reported); the conditions and observedPlanID
// follow from the outcome (see conditions). now stamps a condition whose
// status changes. Events, in order: a Warning on the Node per GPU with
// MIG off (once per message), the Failed condition's Warning on the
// NodePartition (once per message), and Applied listing the steps done.
func report(np *v1alpha1.NodePartition, node *v1.Node, obs *observation, out outcome, now metav1.Time) (v1alpha1.NodePartitionStatus, []event) {
	var st v1alpha1.NodePartitionStatus
	var events []event
	if obs == nil {
		last := np.Status.DeepCopy()
		st.GPUs, st.Models = last.GPUs, last.Models
	} else {
		events = setGPUs(&st, node, obs.gpus, obs.allocatable)
	}
	events = append(events, conditions(np, &st, out, now)...)
	// No restart of the agent's is under way once a sync reports; the
	// node's kubelet may be restarting.
	restarting := metav1.Condition{Type: v1alpha1.ConditionRestarting, Status: metav1.ConditionFalse,
		Reason: ReasonNotRestarting, ObservedGeneration: np.Generation, LastTransitionTime: now}
	if out.closed != "" {
		restarting.Status, restarting.Reason, restarting.Message = metav1.ConditionTrue, ReasonKubeletRestarting, out.closed
	}
	meta.SetStatusCondition(&st.Conditions, restarting)
	return st, events
}

// progress reports, while a plan is applied in agent mode, the slices
// that exist and which of them kubelet can allocate, and that the plan's
// destroys are withdrawn (applyingPlanID): the scheduler binds pods to
// the slices advertised so far instead of waiting for the whole plan.
// The conditions stay; a failure only delays the report to the sync's end.
func (a *Agent) progress(ctx context.Context, np *v1alpha1.NodePartition, node *v1.Node) {
	logger := klog.FromContext(ctx)
	obs, err := a.observe(ctx)
	if err == nil {
		err = a.advertiseOwn(ctx, &obs)
	}
	if err == nil {
		st := a.latest(np).Status.DeepCopy()
		_ = setGPUs(st, node, obs.gpus, obs.allocatable)
		st.ApplyingPlanID = np.Spec.PlanID
		err = a.writeStatus(ctx, np, *st)
	}
	if err != nil {
		logger.V(2).Info("no progress report mid-plan", "err", err)
	}
}

// markRestarting writes DevicePluginRestarting=True before the agent
// restarts the device plugin, or stops with its own (agent mode); the
// sync's report (the next agent's, after a stop) sets it False again.
func (a *Agent) markRestarting(ctx context.Context, np *v1alpha1.NodePartition) error {
	msg := fmt.Sprintf("restarting the device plugin (%s, %s) so that it advertises the node's slices; no MIG pod is bound to the node meanwhile", a.cfg.DevicePluginNamespace, a.cfg.DevicePluginSelector)
	if a.cfg.Plugin != nil {
		msg = "the agent, this node's device plugin, is stopping: kubelet has no GPU device plugin until it is back; no MIG pod is bound to the node meanwhile"
	}
	st := a.latest(np).Status.DeepCopy()
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: v1alpha1.ConditionRestarting, Status: metav1.ConditionTrue,
		Reason: ReasonRestarting, ObservedGeneration: np.Generation, LastTransitionTime: metav1.Now(), Message: msg})
	return a.writeStatus(ctx, np, *st)
}

// setGPUs reports the GPUs as observed in st: identity, model name, MIG
// mode, the profiles NVML offers (which the scheduler plans with; once
// per model, partition.ShareProfiles) and the slices with whether a pod
// uses them and whether kubelet can allocate them (allocatable: device
// IDs per resource). It returns, for a GPU with MIG off, a Warning event
// on the Node saying how to enable it.
func setGPUs(st *v1alpha1.NodePartitionStatus, node *v1.Node, observed []Observed, allocatable map[string][]string) []event {
	var gpus []v1alpha1.GPUStatus
	var events []event
	for _, o := range observed {
		ss := make([]partition.Slice, len(o.Slices))
		for i, s := range o.Slices {
			ss[i] = partition.Slice{Slice: s.Slice.Slice, UUID: s.UUID, Used: s.Holder != "",
				Advertised: s.UUID != "" && slices.Contains(allocatable[s.Profile.ResourceName()], s.UUID)}
		}
		model := mig.ModelName(o.GPU.Name, o.GPU.PCIDeviceID)
		gpus = append(gpus, partition.EncodeGPU(o.GPU.Index, o.GPU.UUID, model, migMode(o.GPU.MIG), o.Profiles, ss))
		if !o.GPU.MIG.Current {
			events = append(events, event{once: "mig/" + o.GPU.UUID, ref: nodeRef(node),
				kind: v1.EventTypeWarning, reason: ReasonMIGDisabled, message: migDisabled(o.GPU)})
		}
	}
	st.GPUs, st.Models = gpus, partition.ShareProfiles(gpus)
	return events
}

func migMode(m gpu.MIGMode) v1alpha1.MIGMode {
	switch {
	case m.Current && m.Pending:
		return v1alpha1.MIGEnabled
	case m.Current:
		return v1alpha1.MIGDisablePending
	case m.Pending:
		return v1alpha1.MIGEnablePending
	}
	return v1alpha1.MIGDisabled
}

// conditions sets Applied and Failed and observedPlanID from what the
// sync did, and returns the events that go with them. observedPlanID
// moves to the spec's plan once the agent is done with it: applied, or
// refused for a reason only a new plan can fix (a used slice in the way,
// an invalid layout). A failure it retries (NVML, the device plugin)
// leaves it, so the scheduler keeps waiting for the plan. A plan refused
// before keeps its conditions; one the agent waits to apply is reported
// as waiting.
func conditions(np *v1alpha1.NodePartition, st *v1alpha1.NodePartitionStatus, out outcome, now metav1.Time) []event {
	plan := np.Spec.PlanID
	name := plan
	if name == "" {
		name = "(none)"
	}
	st.ObservedGeneration = np.Generation
	st.ObservedPlanID = np.Status.ObservedPlanID
	st.Conditions = append([]metav1.Condition(nil), np.Status.Conditions...)
	if out.refused {
		return nil
	}
	applied := metav1.Condition{Type: v1alpha1.ConditionApplied, ObservedGeneration: np.Generation, LastTransitionTime: now}
	failed := metav1.Condition{Type: v1alpha1.ConditionFailed, ObservedGeneration: np.Generation, LastTransitionTime: now, Status: metav1.ConditionTrue}
	switch {
	case out.closed != "":
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, ReasonKubeletRestarting, fmt.Sprintf("plan %s: %s", name, out.closed)
		failed.Status, failed.Reason, failed.Message = metav1.ConditionFalse, ReasonKubeletRestarting, ""
	case out.wait != "":
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, ReasonWaitingForAdmission, fmt.Sprintf("plan %s: %s", name, out.wait)
		failed.Status, failed.Reason, failed.Message = metav1.ConditionFalse, ReasonWaitingForAdmission, ""
	case len(out.conflicts) > 0:
		// Refused in part: the plan is done with, whatever else failed (a
		// refused plan is never pursued; the scheduler plans again).
		msgs := make([]string, len(out.conflicts), len(out.conflicts)+1)
		for i, c := range out.conflicts {
			msgs[i] = c.Message
		}
		if out.err != nil {
			msgs = append(msgs, out.err.Error())
		}
		msg := fmt.Sprintf("plan %s not fully applied: %s", name, strings.Join(msgs, "; "))
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, out.conflicts[0].Reason, msg
		failed.Reason, failed.Message = out.conflicts[0].Reason, msg
		st.ObservedPlanID = plan
	case out.err != nil:
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, ReasonApplying, fmt.Sprintf("plan %s: retrying after: %s", name, out.err)
		failed.Reason, failed.Message = out.reason, out.err.Error()
	case plan == "":
		applied.Status, applied.Reason, applied.Message = metav1.ConditionTrue, ReasonNoPlan, "no plan yet; the status reports what exists"
		failed.Status, failed.Reason, failed.Message = metav1.ConditionFalse, ReasonNoPlan, ""
	default:
		applied.Status, applied.Reason, applied.Message = metav1.ConditionTrue, ReasonApplied, fmt.Sprintf("plan %s: layout applied and advertised", plan)
		failed.Status, failed.Reason, failed.Message = metav1.ConditionFalse, ReasonApplied, ""
		st.ObservedPlanID = plan
	}
	meta.SetStatusCondition(&st.Conditions, applied)
	meta.SetStatusCondition(&st.Conditions, failed)
	ref := partitionRef(np)
	var events []event
	if failed.Status == metav1.ConditionTrue {
		events = append(events, event{once: v1alpha1.ConditionFailed, ref: ref, kind: v1.EventTypeWarning, reason: failed.Reason, message: failed.Message})
	} else {
		events = append(events, event{once: v1alpha1.ConditionFailed, forget: true})
	}
	if out.err == nil && len(out.steps) > 0 {
		steps := make([]string, len(out.steps))
		for i, s := range out.steps {
			steps[i] = s.String()
		}
		events = append(events, event{ref: ref, kind: v1.EventTypeNormal, reason: ReasonApplied,
			message: fmt.Sprintf("plan %s: %s; the device plugin advertises the slices", name, strings.Join(steps, ", "))})
	}
	return events
}

// emit records the events, in order: the one place the agent records
// events. An event under a once key is skipped if the last one recorded
// under that key said the same.
func (a *Agent) emit(events []event) {
	for _, e := range events {
		if e.once != "" {
			if e.forget {
				delete(a.lastMsg, e.once)
				continue
			}
			if a.lastMsg[e.once] == e.reason+e.message {
				continue
			}
			a.lastMsg[e.once] = e.reason + e.message
		}
		a.recorder.Event(e.ref, e.kind, e.reason, e.message)
	}
}

func partitionRef(np *v1alpha1.NodePartition) *v1.ObjectReference {
	return &v1.ObjectReference{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "NodePartition", Name: np.Name, UID: np.UID}
}

func nodeRef(node *v1.Node) *v1.ObjectReference {
	return &v1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}
}

// fail reports a failure to retry, keeping the last reported GPUs: it
// emits the Failed condition's event, writes the status, and returns err.
func (a *Agent) fail(ctx context.Context, np *v1alpha1.NodePartition, node *v1.Node, conflicts []Conflict, reason string, err error) error {
	st, events := report(a.base(np), node, nil, outcome{conflicts: conflicts, err: err, reason: reason}, metav1.Now())
	a.emit(events)
	if werr := a.writeStatus(ctx, np, st); werr != nil {
		klog.FromContext(ctx).Error(werr, "writing the NodePartition status")
	}
	return err
}

// latest is the newer of np (the informer's copy) and the object the
// agent last wrote: a sync that wrote mid-plan (progress) compares and
// builds on what it wrote, not on the copy it started from.
func (a *Agent) latest(np *v1alpha1.NodePartition) *v1alpha1.NodePartition {
	if w := a.written; w != nil && w.UID == np.UID && partition.Newer(w.ObjectMeta, np.ObjectMeta) {
		return w
	}
	return np
}

// base is what a sync's report builds on: the sync's NodePartition — its
// spec and generation, the plan it applied — with the status the agent
// last wrote. A write may return a spec published since (a newer plan):
// reporting against it would say that plan observed, and the scheduler
// would bind pods onto slices it is about to destroy.
func (a *Agent) base(np *v1alpha1.NodePartition) *v1alpha1.NodePartition {
	l := a.latest(np)
	if l == np {
		return np
	}
	b := np.DeepCopy()
	b.Status = *l.Status.DeepCopy()
	return b
}

// writeStatus updates the status subresource, with who advertises the
// node's GPU resources, if it differs from the latest known one. The status
// is what the agent observed, true whatever the spec became meanwhile, so
// a write conflict is retried at once on the fresh object.
func (a *Agent) writeStatus(ctx context.Context, np *v1alpha1.NodePartition, st v1alpha1.NodePartitionStatus) error {
	st.DevicePlugin = v1alpha1.DevicePluginNVIDIA
	if a.cfg.Plugin != nil {
		st.DevicePlugin = v1alpha1.DevicePluginAgent
	}
	current := a.latest(np)
	if equality.Semantic.DeepEqual(current.Status, st) {
		return nil
	}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		updated := current.DeepCopy()
		updated.Status = st
		written, err := a.partitions.UpdateStatus(ctx, updated, metav1.UpdateOptions{FieldManager: "dynamig-agent"})
		if err == nil {
			a.written = written
		}
		if apierrors.IsConflict(err) {
			fresh, gerr := a.partitions.Get(ctx, np.Name, metav1.GetOptions{})
			if gerr != nil {
				return gerr
			}
			current = fresh
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("writing NodePartition %s status: %w", np.Name, err)
	}
	return nil
}
