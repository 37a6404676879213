package sim

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dynamig/dynamig/pkg/planner"
	"github.com/dynamig/dynamig/pkg/scenario"
)

func load(t *testing.T, yaml string) *scenario.Scenario {
	t.Helper()
	s, err := scenario.Parse([]byte(yaml))
	require.NoError(t, err)
	return s
}

func TestSeedScenario(t *testing.T) {
	sc, err := scenario.Load("../../examples/seed.yaml")
	require.NoError(t, err)
	r, err := Run(sc, "dynamig")
	require.NoError(t, err)
	assert.InDelta(t, 5.0*3600/(7*3610), r.SliceUtilization, 1e-9, "five of seven compute slices busy from 10 s to 3610 s")
	r.SliceUtilization = 0
	assert.Equal(t, Result{
		Strategy: "dynamig", PodsTotal: 5, PodsServed: 5, MeanWaitSeconds: 10, P95WaitSeconds: 10,
		Reconfigurations: 1, SlicesCreated: 5,
	}, *r, "five 1g slices in one reconfiguration, usable after 10 s")

	st, err := Run(sc, "static")
	require.NoError(t, err)
	assert.Equal(t, 5, st.PodsServed)
	assert.Zero(t, st.MeanWaitSeconds, "the admin's layout was there before the pods")
	assert.Zero(t, st.Reconfigurations)
}

func TestWaitUtilizationAndTeardown(t *testing.T) {
	sc := load(t, `
nodes:
- name: a
  gpus: [A100-80GB]
reconfigureSeconds: 10
pods:
- {name: first, arrival: 0, duration: 100, requests: {nvidia.com/mig-7g.80gb: 1}}
- {name: second, arrival: 50, duration: 100, requests: {nvidia.com/mig-7g.80gb: 1}}
`)
	r, err := Run(sc, "dynamig")
	require.NoError(t, err)
	// first: ready at 10, runs to 110; second waits for the GPU, reuses the
	// free 7g slice at 110 without a reconfiguration and runs to 210.
	assert.Equal(t, 2, r.PodsServed)
	assert.InDelta(t, (10.0+60.0)/2, r.MeanWaitSeconds, 1e-9)
	assert.InDelta(t, 60, r.P95WaitSeconds, 1e-9)
	assert.InDelta(t, 7.0*200/(7*210), r.SliceUtilization, 1e-9)
	assert.Equal(t, 1, r.SlicesCreated)
	assert.Equal(t, 0, r.SlicesDestroyed)

	ff, err := Run(sc, "firstfit")
	require.NoError(t, err)
	// First fit tears the slice down when first ends and creates it again.
	assert.Equal(t, 2, ff.SlicesCreated)
	assert.Equal(t, 2, ff.SlicesDestroyed)
	assert.InDelta(t, (10.0+70.0)/2, ff.MeanWaitSeconds, 1e-9)
}

func TestNeverServed(t *testing.T) {
	sc := load(t, `
nodes:
- name: a
  gpus: [A30]
pods:
- {name: too-big, arrival: 0, duration: 10, requests: {nvidia.com/mig-7g.80gb: 1}}
- {name: fits, arrival: 0, duration: 10, requests: {nvidia.com/mig-4g.24gb: 1}}
`)
	for _, st := range planner.Strategies() {
		r, err := Run(sc, st.Name())
		require.NoError(t, err, st.Name())
		assert.Equal(t, 1, r.PodsNeverServed, st.Name())
		assert.Equal(t, 1, r.PodsServed, st.Name())
		assert.InDelta(t, 5, r.MeanWaitSeconds, 1e-9, "%s: the pod never served waited the whole 10 s run", st.Name())
	}
}

func TestEveryStrategyKeepsTheRulesOnTheMixedExample(t *testing.T) {
	sc, err := scenario.Load("../../examples/mixed.yaml")
	require.NoError(t, err)
	results := map[string]*Result{}
	for _, st := range planner.Strategies() {
		r, err := Run(sc, st.Name()) // every plan is checked against the hard rules
		require.NoError(t, err, st.Name())
		assert.Equal(t, 7, r.PodsTotal)
		assert.Equal(t, r.PodsTotal, r.PodsServed+r.PodsNeverServed)
		results[st.Name()] = r
	}
	for name, r := range results {
		assert.GreaterOrEqual(t, results["dynamig"].PodsServed, r.PodsServed, name)
	}
}

func TestUnknownStrategy(t *testing.T) {
	sc, err := scenario.Load("../../examples/seed.yaml")
	require.NoError(t, err)
	_, err = Run(sc, "magic")
	require.ErrorContains(t, err, `unknown strategy "magic"`)
}
