package local

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// SoakInProcesses runs a soak of runs scenarios from seed in k processes
// of exe (dynamig-local), each with a cluster of its own and a contiguous
// range of the seeds, so that a long soak, which mostly waits, uses the
// machine's cores: run i still uses seed+i and reruns alone with
// --soak 1 --soak-seed S. args are the flags every process gets (the
// device-plugin mode, the faults); dir, if set, gets a directory per
// process. The processes' lines are printed as they come, prefixed with
// the process number; it returns the violations they printed, or an error
// if a process stopped before its summary.
func SoakInProcesses(ctx context.Context, exe string, args []string, dir string, runs int, seed uint64, k int, out io.Writer) (int, error) {
	k = max(1, min(k, runs))
	start := time.Now()
	var (
		mu                               sync.Mutex
		wg                               sync.WaitGroup
		violations, failedRuns, finished int
		errs                             []error
	)
	first := seed
	for w := range k {
		n := runs / k
		if w < runs%k {
			n++
		}
		cmdArgs := append(append([]string{}, args...), "--soak", fmt.Sprint(n), "--soak-seed", fmt.Sprint(first), "--soak-parallel", "1")
		if dir != "" {
			cmdArgs = append(cmdArgs, "--dir", filepath.Join(dir, fmt.Sprintf("soak-%d", w+1)))
		}
		seeds := fmt.Sprintf("seeds %d–%d", first, first+uint64(n)-1)
		first += uint64(n)
		cmd := exec.CommandContext(ctx, exe, cmdArgs...)
		// Interrupted, each process stops its cluster (kubelets included)
		// as dynamig-local does on SIGTERM; killed, it would leave them.
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = time.Minute
		pipe, err := cmd.StdoutPipe()
		if err != nil {
			return 0, err
		}
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			return 0, fmt.Errorf("starting soak process %d (%s): %w", w+1, seeds, err)
		}
		mu.Lock()
		fmt.Fprintf(out, "[%d] %s\n", w+1, seeds)
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			var v, f, done int
			summary := false
			lines := bufio.NewScanner(pipe)
			for lines.Scan() {
				l := lines.Text()
				switch {
				case strings.HasPrefix(l, "  violation (seed "):
					v++
				case strings.HasPrefix(l, "run ") && strings.Contains(l, " seed "):
					done++
					if strings.HasSuffix(l, "VIOLATIONS") {
						f++
					}
				case strings.HasPrefix(l, "soak: "):
					summary = true
				}
				mu.Lock()
				fmt.Fprintf(out, "[%d] %s\n", w+1, l)
				mu.Unlock()
			}
			err := cmd.Wait()
			mu.Lock()
			defer mu.Unlock()
			violations, failedRuns, finished = violations+v, failedRuns+f, finished+done
			if err != nil && !summary {
				errs = append(errs, fmt.Errorf("soak process %d (%s): %w (its output is above)", w+1, seeds, err))
			}
		}()
	}
	wg.Wait()
	fmt.Fprintf(out, "%d of %d runs (seeds %d–%d) in %d processes, %d violations, %s\n", finished, runs, seed, seed+uint64(runs)-1, k, violations, time.Since(start).Round(time.Second))
	fmt.Fprintf(out, "soak: %d passed, %d failed\n", finished-failedRuns, failedRuns)
	if len(errs) > 0 {
		return violations, errs[0]
	}
	return violations, nil
}
