package agent

import (
	"context"
	"fmt"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
)

// status reports the GPUs as observed: identity, MIG mode, the profiles
// NVML offers (which the scheduler plans with) and the slices with who
// uses them. A GPU with MIG off gets a Warning event on the Node.
func (a *Agent) status(node *v1.Node, observed []Observed) v1alpha1.NodePartitionStatus {
	var st v1alpha1.NodePartitionStatus
	for _, o := range observed {
		g := v1alpha1.GPUStatus{Index: int32(o.GPU.Index), UUID: o.GPU.UUID, Model: modelName(o.GPU), MIGMode: migMode(o.GPU.MIG)}
		if o.GPU.MIG.Current {
			if ps, err := a.lib.Profiles(o.GPU.Index); err == nil {
				for _, p := range ps {
					ps := v1alpha1.ProfileStatus{Name: p.Name.String(), MemorySlices: int32(p.MemorySlices), MaxCount: int32(p.MaxCount)}
					for _, s := range p.Starts {
						ps.Starts = append(ps.Starts, int32(s))
					}
					g.Profiles = append(g.Profiles, ps)
				}
			}
			for _, s := range o.Slices {
				g.Slices = append(g.Slices, v1alpha1.SliceStatus{
					Slice: v1alpha1.Slice{Profile: s.Profile.String(), Start: int32(s.Start)}, UUID: s.UUID, Used: s.Holder != "",
				})
			}
		} else {
			a.eventOnce("mig/"+o.GPU.UUID, &v1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}, v1.EventTypeWarning, ReasonMIGDisabled, migDisabled(o.GPU))
		}
		st.GPUs = append(st.GPUs, g)
	}
	return st
}

// modelName is the catalog name of a GPU's model, or NVML's name for a
// GPU the catalog does not know.
func modelName(g gpu.GPU) string {
	if m, ok := mig.ModelByPCIDeviceID(g.PCIDeviceID); ok {
		return m.Name
	}
	if m, ok := mig.ModelByNVMLName(g.Name); ok {
		return m.Name
	}
	return g.Name
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
// sync did. observedPlanID moves to the spec's plan once the agent is done
// with it: applied, or refused for a reason only a new plan can fix (a
// used slice in the way, an invalid layout). A failure it retries (NVML,
// the device plugin) leaves it, so the scheduler keeps waiting for the plan.
func (a *Agent) conditions(np *v1alpha1.NodePartition, st *v1alpha1.NodePartitionStatus, out outcome) {
	plan := np.Spec.PlanID
	name := plan
	if name == "" {
		name = "(none)"
	}
	st.ObservedGeneration = np.Generation
	st.ObservedPlanID = np.Status.ObservedPlanID
	st.Conditions = append([]metav1.Condition(nil), np.Status.Conditions...)
	applied := metav1.Condition{Type: v1alpha1.ConditionApplied, ObservedGeneration: np.Generation}
	failed := metav1.Condition{Type: v1alpha1.ConditionFailed, ObservedGeneration: np.Generation, Status: metav1.ConditionTrue}
	switch {
	case out.err != nil:
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, ReasonApplying, fmt.Sprintf("plan %s: retrying after: %v", name, out.err)
		failed.Reason, failed.Message = out.reason, out.err.Error()
	case len(out.conflicts) > 0:
		msgs := make([]string, len(out.conflicts))
		for i, c := range out.conflicts {
			msgs[i] = c.Message
		}
		msg := fmt.Sprintf("plan %s not fully applied: %s", name, strings.Join(msgs, "; "))
		applied.Status, applied.Reason, applied.Message = metav1.ConditionFalse, out.conflicts[0].Reason, msg
		failed.Reason, failed.Message = out.conflicts[0].Reason, msg
		st.ObservedPlanID = plan
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
	if failed.Status == metav1.ConditionTrue {
		a.eventOnce(v1alpha1.ConditionFailed, ref, v1.EventTypeWarning, failed.Reason, failed.Message)
	} else {
		delete(a.lastMsg, v1alpha1.ConditionFailed)
	}
	if out.err == nil && len(out.steps) > 0 {
		steps := make([]string, len(out.steps))
		for i, s := range out.steps {
			steps[i] = s.String()
		}
		a.recorder.Eventf(ref, v1.EventTypeNormal, ReasonApplied, "plan %s: %s; the device plugin advertises the slices", name, strings.Join(steps, ", "))
	}
}

// eventOnce records an event unless the last one under key said the same.
func (a *Agent) eventOnce(key string, ref *v1.ObjectReference, kind, reason, msg string) {
	if a.lastMsg[key] == reason+msg {
		return
	}
	a.lastMsg[key] = reason + msg
	a.recorder.Event(ref, kind, reason, msg)
}

func partitionRef(np *v1alpha1.NodePartition) *v1.ObjectReference {
	return &v1.ObjectReference{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: "NodePartition", Name: np.Name, UID: np.UID}
}

// fail writes a Failed condition (keeping the last reported GPUs) and
// returns err for a retry.
func (a *Agent) fail(ctx context.Context, np *v1alpha1.NodePartition, conflicts []Conflict, reason string, err error) error {
	st := *np.Status.DeepCopy()
	a.conditions(np, &st, outcome{conflicts: conflicts, err: err, reason: reason})
	if werr := a.writeStatus(ctx, np, st); werr != nil {
		klog.FromContext(ctx).Error(werr, "writing the NodePartition status")
	}
	return err
}

// writeStatus updates the status subresource if it changed. The status
// is what the agent observed, true whatever the spec became meanwhile, so
// a write conflict is retried at once on the fresh object.
func (a *Agent) writeStatus(ctx context.Context, np *v1alpha1.NodePartition, st v1alpha1.NodePartitionStatus) error {
	if equality.Semantic.DeepEqual(np.Status, st) {
		return nil
	}
	current := np
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		updated := current.DeepCopy()
		updated.Status = st
		u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(updated)
		if err != nil {
			return err
		}
		obj := &unstructured.Unstructured{Object: u}
		obj.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
		obj.SetKind("NodePartition")
		_, err = a.partitions.UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: "dynamig-agent"})
		if apierrors.IsConflict(err) {
			fresh, gerr := a.partitions.Get(ctx, np.Name, metav1.GetOptions{})
			if gerr != nil {
				return gerr
			}
			if current, gerr = decode(fresh); gerr != nil {
				return gerr
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("writing NodePartition %s status: %w", np.Name, err)
	}
	return nil
}
