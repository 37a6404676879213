// Package cli implements the dynamig command: plan and replay scenario
// files with dynamig's planner and the strategies of other systems,
// generate scenarios, and print the quality comparison.
package cli

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/pkg/scenario"
	"github.com/dynamig/dynamig/pkg/sim"
)

const usage = `dynamig — what-if planning for dynamic MIG partitioning

Usage:
  dynamig plan FILE [--strategy S] [-o table|json]
  dynamig sim FILE [--strategy S|all] [-o table|json]
  dynamig gen --seed N --mix small|large|bimodal|diurnal --nodes K [flags] [-o FILE]
  dynamig bench [--snapshots N] [--seed N]

Strategies: dynamig (default), firstfit, nos, static, optimal.
Run "dynamig COMMAND -h" for a command's flags.
`

// errUsage marks errors for which the usage text helps.
var errUsage = errors.New("usage")

// Run runs the command line args (without the program name) and returns
// the exit code: 0 on success, 1 on failure, 2 on bad usage.
func Run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "plan":
		err = runPlan(args[1:], stdout, stderr)
	case "sim":
		err = runSim(args[1:], stdout, stderr)
	case "gen":
		err = runGen(args[1:], stdout, stderr)
	case "bench":
		err = runBench(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = fmt.Errorf("%w: unknown command %q", errUsage, args[0])
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "dynamig: %v\n\n%s", err, usage)
		return 2
	default:
		fmt.Fprintf(stderr, "dynamig: %v\n", err)
		return 1
	}
}

// parse parses flags that may come before or after positional arguments
// and returns the positional ones.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %w", errUsage, err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("dynamig "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// scenarioArgs are the arguments plan and sim share: one scenario FILE,
// --strategy and -o.
type scenarioArgs struct {
	strategy, output string
	sc               *scenario.Scenario
}

func parseScenarioArgs(name, strategyHelp string, args []string, stderr io.Writer) (*scenarioArgs, error) {
	fs := newFlags(name, stderr)
	a := &scenarioArgs{}
	fs.StringVar(&a.strategy, "strategy", "dynamig", strategyHelp)
	fs.StringVar(&a.output, "o", "table", "output format: table or json")
	pos, err := parse(fs, args)
	if err != nil {
		return nil, err
	}
	if a.output != "table" && a.output != "json" {
		return nil, fmt.Errorf("%w: -o must be table or json, got %q", errUsage, a.output)
	}
	if len(pos) != 1 {
		return nil, fmt.Errorf("%w: want exactly one scenario FILE, got %d arguments", errUsage, len(pos))
	}
	a.sc, err = scenario.Load(pos[0])
	return a, err
}

func runPlan(args []string, stdout, stderr io.Writer) error {
	a, err := parseScenarioArgs("plan", "planning strategy: "+strategyNames(), args, stderr)
	if err != nil {
		return err
	}
	st, err := planner.StrategyByName(a.strategy)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	snap := a.sc.Snapshot()
	p := st.Plan(snap)
	if err := planner.Check(snap, p); err != nil {
		return fmt.Errorf("internal error: %s plan breaks a hard rule: %w", st.Name(), err)
	}
	if a.output == "json" {
		return writeJSON(stdout, planJSON(p))
	}
	return writePlanTable(stdout, p)
}

// planOutput is the JSON contract of "dynamig plan -o json".
type planOutput struct {
	Strategy   string               `json:"strategy"`
	PodsServed int                  `json:"podsServed"`
	Created    int                  `json:"slicesCreated"`
	Destroyed  int                  `json:"slicesDestroyed"`
	Pods       []podOutput          `json:"pods"`
	Nodes      []planner.NodeLayout `json:"nodes"`
}

// podOutput is a pod's assignment: its first slice in node/gpu/profile/
// start, all of them in slices; or the reason it is not served.
type podOutput struct {
	Name    string             `json:"name"`
	Node    string             `json:"node,omitempty"`
	GPU     *int               `json:"gpu,omitempty"`
	Profile string             `json:"profile,omitempty"`
	Start   *int               `json:"start,omitempty"`
	Slices  []planner.SliceRef `json:"slices,omitempty"`
	Reason  string             `json:"reason,omitempty"`
}

func planJSON(p *planner.Plan) planOutput {
	out := planOutput{Strategy: p.Strategy, PodsServed: p.Served, Created: p.Created, Destroyed: p.Destroyed, Nodes: p.Nodes}
	for _, a := range p.Pods {
		po := podOutput{Name: a.Pod, Reason: a.Reason}
		if a.Served() {
			first := a.Slices[0]
			po.Node, po.GPU, po.Profile, po.Start, po.Slices = a.Node, &first.GPU, first.Profile.String(), &first.Start, a.Slices
		}
		out.Pods = append(out.Pods, po)
	}
	return out
}

func writePlanTable(w io.Writer, p *planner.Plan) error {
	fmt.Fprintf(w, "strategy %s: %d of %d pods served; %d slices created, %d destroyed\n\n",
		p.Strategy, p.Served, len(p.Pods), p.Created, p.Destroyed)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tGPU\tMODEL\tLAYOUT (profile@start, * used)")
	for _, n := range p.Nodes {
		for _, g := range n.GPUs {
			var parts []string
			for _, s := range g.Slices {
				mark := ""
				if s.Used {
					mark = "*"
				}
				parts = append(parts, fmt.Sprintf("%s@%d%s", s.Profile, s.Start, mark))
			}
			layout := strings.Join(parts, " ")
			if layout == "" {
				layout = "(empty)"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", n.Name, g.Index, g.Model, layout)
		}
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "POD\tNODE\tSLICES (gpu:profile@start) or REASON")
	for _, a := range p.Pods {
		if !a.Served() {
			fmt.Fprintf(tw, "%s\t-\t%s\n", a.Pod, a.Reason)
			continue
		}
		var parts []string
		for _, s := range a.Slices {
			parts = append(parts, fmt.Sprintf("%d:%s@%d", s.GPU, s.Profile, s.Start))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", a.Pod, a.Node, strings.Join(parts, " "))
	}
	return tw.Flush()
}

func runSim(args []string, stdout, stderr io.Writer) error {
	a, err := parseScenarioArgs("sim", "strategy, or all: "+strategyNames(), args, stderr)
	if err != nil {
		return err
	}
	names := []string{a.strategy}
	if a.strategy == "all" {
		names = simStrategies(a.sc)
	} else if _, err := planner.StrategyByName(a.strategy); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	var results []*sim.Result
	for _, name := range names {
		r, err := sim.Run(a.sc, name)
		if err != nil {
			return err
		}
		results = append(results, r)
	}
	if a.output == "json" {
		return writeJSON(stdout, results)
	}
	return writeSimTable(stdout, results)
}

// simStrategies is what "all" means for a scenario: every strategy, the
// exact optimum only where the scenario is small enough for it.
func simStrategies(sc *scenario.Scenario) []string {
	gpus := 0
	for i := range sc.Nodes {
		gpus += len(sc.Models(i))
	}
	var names []string
	for _, st := range planner.Strategies() {
		if _, ok := st.(planner.Optimal); ok && (gpus > planner.OptimalMaxGPUs || len(sc.Pods) > planner.OptimalMaxPods) {
			continue
		}
		names = append(names, st.Name())
	}
	return names
}

func writeSimTable(w io.Writer, results []*sim.Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "STRATEGY\tPODS\tSERVED\tNEVER\tMEAN WAIT s\tP95 WAIT s\tUTILIZATION\tRECONFIGS\tCREATED\tDESTROYED\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f%%\t%d\t%d\t%d\t\n", r.Strategy, r.PodsTotal, r.PodsServed, r.PodsNeverServed,
			r.MeanWaitSeconds, r.P95WaitSeconds, 100*r.SliceUtilization, r.Reconfigurations, r.SlicesCreated, r.SlicesDestroyed)
	}
	return tw.Flush()
}

func runGen(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("gen", stderr)
	var o scenario.GenOptions
	fs.Uint64Var(&o.Seed, "seed", 1, "random seed")
	fs.StringVar(&o.Mix, "mix", "small", "workload mix: "+strings.Join(scenario.MixNames(), ", "))
	fs.IntVar(&o.Nodes, "nodes", 4, "nodes")
	fs.IntVar(&o.GPUsPerNode, "gpus-per-node", 8, "GPUs per node")
	models := fs.String("models", "A100-80GB", "comma-separated GPU models, given to nodes in turn")
	fs.IntVar(&o.Pods, "pods", 0, "pods (default 25 per node)")
	fs.Float64Var(&o.Hours, "hours", 4, "arrival window in hours")
	fs.Float64Var(&o.Load, "load", 0.9, "offered load relative to the cluster's compute slices")
	fs.Float64Var(&o.ReconfigureSeconds, "reconfigure-seconds", 10, "plan to usable slices, seconds")
	file := fs.String("o", "", "write to FILE instead of standard output")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: gen takes no arguments, got %q", errUsage, pos)
	}
	o.Models = strings.Split(*models, ",")
	if o.Pods == 0 {
		o.Pods = 25 * o.Nodes
	}
	s, err := scenario.Generate(o)
	if err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	data, err := s.Marshal()
	if err != nil {
		return err
	}
	header := fmt.Sprintf("# dynamig gen --seed %d --mix %s --nodes %d --gpus-per-node %d --models %s --pods %d --hours %g --load %g --reconfigure-seconds %g\n",
		o.Seed, o.Mix, o.Nodes, o.GPUsPerNode, *models, o.Pods, o.Hours, o.Load, o.ReconfigureSeconds)
	data = append([]byte(header), data...)
	if *file == "" {
		_, err = stdout.Write(data)
		return err
	}
	return os.WriteFile(*file, data, 0o644)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func strategyNames() string {
	var names []string
	for _, s := range planner.Strategies() {
		names = append(names, s.Name())
	}
	return strings.Join(names, ", ")
}
