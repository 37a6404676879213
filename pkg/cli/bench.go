package cli

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/pkg/scenario"
	"github.com/dynamig/dynamig/pkg/sim"
)

// traceOptions are the generated traces of the quality comparison: 4 nodes
// of 4 GPUs (A100-80GB and H100-80GB), 150 pods over 4 hours at load 1.
var traceOptions = scenario.GenOptions{
	Nodes: 4, GPUsPerNode: 4, Models: []string{"A100-80GB", "H100-80GB"},
	Pods: 150, Hours: 4, Load: 1, ReconfigureSeconds: 10,
}

func runBench(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench", stderr)
	snapshots := fs.Int("snapshots", 200, "random small snapshots compared with the optimum")
	seed := fs.Uint64("seed", 1, "first seed")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 || *snapshots <= 0 {
		return fmt.Errorf("%w: bench takes no arguments and a positive --snapshots", errUsage)
	}
	if err := benchSnapshots(stdout, *seed, *snapshots); err != nil {
		return err
	}
	for _, mix := range scenario.MixNames() {
		o := traceOptions
		o.Seed, o.Mix = *seed, mix
		sc, err := scenario.Generate(o)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\ntrace %s: dynamig gen --seed %d --mix %s --nodes %d --gpus-per-node %d --models A100-80GB,H100-80GB --pods %d --hours %g --load %g\n",
			mix, o.Seed, mix, o.Nodes, o.GPUsPerNode, o.Pods, o.Hours, o.Load)
		var results []*sim.Result
		for _, name := range simStrategies(sc) {
			r, err := sim.Run(sc, name)
			if err != nil {
				return err
			}
			results = append(results, r)
		}
		if err := writeSimTable(stdout, results); err != nil {
			return err
		}
	}
	return nil
}

// benchSnapshots plans n random small snapshots (one priority) with every
// strategy and compares pods served and churn with the exact optimum.
func benchSnapshots(w io.Writer, seed uint64, n int) error {
	type total struct{ served, churn, short int }
	totals := map[string]*total{}
	strategies := planner.Strategies()
	for _, st := range strategies {
		totals[st.Name()] = &total{}
	}
	for i := 0; i < n; i++ {
		s := planner.RandomSmall(seed+uint64(i), 1)
		opt := 0
		plans := map[string]*planner.Plan{}
		for _, st := range strategies {
			p := st.Plan(s)
			if err := planner.Check(s, p); err != nil {
				return fmt.Errorf("internal error: %s breaks a hard rule on snapshot %d: %w", st.Name(), seed+uint64(i), err)
			}
			plans[st.Name()] = p
			if st.Name() == "optimal" {
				opt = p.Served
			}
		}
		for name, p := range plans {
			t := totals[name]
			t.served += p.Served
			t.churn += p.Created + p.Destroyed
			if p.Served < opt {
				t.short++
			}
		}
	}
	opt := totals["optimal"].served
	fmt.Fprintf(w, "%d random small snapshots (seeds %d..%d; 1-3 nodes of 1-2 GPUs, 3-10 pods): pods served vs the exact optimum\n", n, seed, seed+uint64(n)-1)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "STRATEGY\tPODS SERVED\tOF OPTIMAL\tSNAPSHOTS BELOW OPTIMAL\tSLICES CREATED+DESTROYED\t")
	for _, st := range strategies {
		t := totals[st.Name()]
		fmt.Fprintf(tw, "%s\t%d\t%.1f%%\t%d\t%d\t\n", st.Name(), t.served, 100*float64(t.served)/float64(max(opt, 1)), t.short, t.churn)
	}
	return tw.Flush()
}
