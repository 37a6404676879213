package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/dynamig/dynamig/node-agent/gpu"
	"github.com/dynamig/dynamig/pkg/guard"
)

// apply runs each GPU's steps in order, the GPUs side by side: NVML is
// thread-safe and a GPU's instances are its own, so a plan's slices take
// the time of its busiest GPU, not of all its slices. In agent mode it
// first withdraws every slice the steps destroy from kubelet (withdraw),
// then calls progress, if set, once they are withdrawn and as slices are
// created, at most every progressEvery: the scheduler may bind pods to
// what kubelet can allocate from then on. Before each destroy it asks
// kubelet again whether the slice is free; NVML's IN_USE is the last
// guard. A slice found in use blocks the rest of its GPU's steps (a
// conflict); any other failure stops every GPU after its current step,
// to be retried. When newer says a newer spec was published, every GPU
// stops after its current step (the outcome is superseded), so that the
// newer plan does not wait for this one's busiest GPU. The outcome holds
// the steps that ran, in the steps' order, those conflicts, and the
// failure with its reason.
func (a *Agent) apply(ctx context.Context, steps []Step, observed []Observed, progress func(context.Context), newer func() bool) outcome {
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
	created := func() {}
	if progress != nil {
		progress(ctx)
		var stop func()
		created, stop = throttled(ctx, progress)
		defer stop()
	}
	byGPU := map[int][]int{} // the indexes of each GPU's steps
	var gpus []int
	for i, st := range steps {
		if blocked[st.GPU] {
			continue
		}
		if _, ok := byGPU[st.GPU]; !ok {
			gpus = append(gpus, st.GPU)
		}
		byGPU[st.GPU] = append(byGPU[st.GPU], i)
	}
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		done      = make([]bool, len(steps))
		conflicts = map[int]Conflict{}
	)
	for _, g := range gpus {
		wg.Go(func() {
			for n, i := range byGPU[g] {
				mu.Lock()
				stop := out.err != nil || out.superseded
				mu.Unlock()
				if stop {
					return
				}
				if n > 0 && newer() {
					mu.Lock()
					out.superseded = true
					mu.Unlock()
					return
				}
				conflict, err := a.step(ctx, steps[i], observed)
				mu.Lock()
				switch {
				case conflict != nil:
					conflicts[g] = *conflict
				case err != nil && out.err == nil:
					out.err, out.reason = err, ReasonNVMLError
				case err == nil:
					done[i] = true
				}
				mu.Unlock()
				if conflict != nil || err != nil {
					return
				}
				if steps[i].Kind == Create {
					created()
				}
			}
		})
	}
	wg.Wait()
	for i, st := range steps {
		if done[i] {
			out.steps = append(out.steps, st)
		}
	}
	for _, g := range gpus {
		if c, ok := conflicts[g]; ok {
			out.conflicts = append(out.conflicts, c)
		}
	}
	return out
}

// step runs one step: a conflict if the slice to destroy is in use, an
// error if NVML failed otherwise.
func (a *Agent) step(ctx context.Context, st Step, observed []Observed) (*Conflict, error) {
	var err error
	switch st.Kind {
	case Destroy:
		if who, err := a.recheck(ctx, st, observed); err != nil || who != "" {
			c := Conflict{GPU: st.GPU, Reason: ReasonSliceInUse, Message: fmt.Sprintf("gpu %d: not changed: %s is used by pod %s", st.GPU, st.Slice, who)}
			if err != nil {
				c.Reason, c.Message = ReasonKubeletUnreachable, fmt.Sprintf("gpu %d: not changed: %s may be in use: %s", st.GPU, st.Slice, err)
			}
			return &c, nil
		}
		err = a.lib.Destroy(st.GPU, st.Slice.Profile, st.Slice.Start)
	case Create:
		_, err = a.lib.Create(st.GPU, st.Slice.Profile, st.Slice.Start)
	}
	if err == nil {
		klog.FromContext(ctx).V(2).Info("step done", "gpu", st.GPU, "step", st.String())
		return nil, nil
	}
	nvmlErrors.WithLabelValues(string(st.Kind), gpu.Code(err)).Inc()
	if errors.Is(err, gpu.ErrInUse) {
		return &Conflict{GPU: st.GPU, Reason: ReasonSliceInUse, Message: fmt.Sprintf("gpu %d: not changed further: NVML says %s is in use (%s)", st.GPU, st.Slice, err)}, nil
	}
	return nil, fmt.Errorf("%s: %w", st, err)
}

// throttled runs report in the background when kicked, at most every
// progressEvery: slices created in between are reported together, the
// last of them when the wait is over. stop ends it and waits for a report
// under way, so that no report follows the sync's own.
func throttled(ctx context.Context, report func(context.Context)) (kick, stop func()) {
	kicks, quit, finished := make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for {
			select {
			case <-kicks:
			case <-quit:
				return
			}
			report(ctx)
			select {
			case <-time.After(progressEvery):
			case <-quit:
				return
			}
		}
	}()
	kick = func() {
		select {
		case kicks <- struct{}{}:
		default:
		}
	}
	return kick, func() { close(quit); <-finished }
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
