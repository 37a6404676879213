package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/guard"
)

// apply runs the steps in order. In agent mode it first withdraws every
// slice the steps destroy from kubelet (withdraw), then calls progress, if
// set, once they are withdrawn and after each slice it creates: the
// scheduler may bind pods to what kubelet can allocate from then on.
// Before each destroy it asks kubelet again whether the slice is free;
// NVML's IN_USE is the last guard. A slice found in use blocks the rest of
// its GPU's steps (a conflict); any other failure stops the run, to be
// retried. The outcome holds the steps that ran, those conflicts, and the
// failure with its reason.
func (a *Agent) apply(ctx context.Context, steps []Step, observed []Observed, progress func(context.Context)) outcome {
	logger := klog.FromContext(ctx)
	blocked := map[int]bool{}
	var out outcome
	if a.cfg.Plugin != nil {
		a.withdrawn = map[string]bool{}
		defer func() { a.withdrawn = nil }()
		if err := a.withdraw(ctx, steps, observed); err != nil {
			for _, st := range steps {
				if st.Kind == Destroy && !blocked[st.GPU] {
					out.conflicts = append(out.conflicts, Conflict{GPU: st.GPU, Reason: ReasonKubeletUnreachable, Message: fmt.Sprintf("gpu %d: not changed: %v", st.GPU, err)})
					blocked[st.GPU] = true
				}
			}
			progress = nil // kubelet may still hand out a slice the plan destroys
		}
	}
	if progress == nil {
		progress = func(context.Context) {}
	}
	progress(ctx)
	for _, st := range steps {
		if blocked[st.GPU] {
			continue
		}
		log := logger.WithValues("gpu", st.GPU, "profile", st.Slice.Profile.String(), "start", st.Slice.Start)
		var err error
		switch st.Kind {
		case Destroy:
			if who, err := a.recheck(ctx, st, observed); err != nil || who != "" {
				msg := fmt.Sprintf("gpu %d: not changed: %s is used by pod %s", st.GPU, st.Slice, who)
				reason := ReasonSliceInUse
				if err != nil {
					msg, reason = fmt.Sprintf("gpu %d: not changed: %s may be in use: %s", st.GPU, st.Slice, err), ReasonKubeletUnreachable
				}
				out.conflicts = append(out.conflicts, Conflict{GPU: st.GPU, Reason: reason, Message: msg})
				blocked[st.GPU] = true
				continue
			}
			err = a.lib.Destroy(st.GPU, st.Slice.Profile, st.Slice.Start)
		case Create:
			_, err = a.lib.Create(st.GPU, st.Slice.Profile, st.Slice.Start)
		}
		if err != nil {
			nvmlErrors.WithLabelValues(string(st.Kind), gpu.Code(err)).Inc()
		}
		switch {
		case err == nil:
			log.V(2).Info("step done", "step", st.String())
			out.steps = append(out.steps, st)
			if st.Kind == Create {
				progress(ctx)
			}
		case errors.Is(err, gpu.ErrInUse):
			out.conflicts = append(out.conflicts, Conflict{GPU: st.GPU, Reason: ReasonSliceInUse,
				Message: fmt.Sprintf("gpu %d: not changed further: NVML says %s is in use (%s)", st.GPU, st.Slice, err)})
			blocked[st.GPU] = true
		default:
			out.err, out.reason = fmt.Errorf("%s: %w", st, err), ReasonNVMLError
			return out
		}
	}
	return out
}

// recheck asks kubelet, just before a destroy, who holds the slice.
func (a *Agent) recheck(ctx context.Context, st Step, observed []Observed) (string, error) {
	if guard.Off(guard.Recheck) {
		return "", nil
	}
	d, err := a.kubeletDevices(ctx)
	if err != nil {
		return "", err
	}
	if s, ok := observedSlice(st, observed); ok {
		return d.Used[s.UUID], nil
	}
	return "", nil
}

func recordSlices(observed []Observed) {
	sliceCount.Reset()
	for _, o := range observed {
		for _, s := range o.Slices {
			state := "free"
			switch {
			case strings.HasSuffix(s.Holder, unknownHolder):
				state = "unknown"
			case s.Holder != "":
				state = "used"
			}
			sliceCount.WithLabelValues(s.Profile.String(), state).Inc()
		}
	}
}
