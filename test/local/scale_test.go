package local

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The CI-sized scale run (make scale runs the full one): on 300 nodes × 8
// GPUs, a burst of 150 MIG pods is served, the pod that only the last
// node may take included, in few plans, without a failed admission or a
// refused plan. The last node sorts past the first maxNodesPerPlan (100)
// nodes: with candidates taken in name order (before issue 13) its pod
// was never served (TestPostFilterFindsTheNodesThePodCanUse shows that
// selection failing).
func TestScaleServesEveryPod(t *testing.T) {
	if _, err := os.Stat(filepath.Join(moduleRoot(), "bin", "kube-apiserver")); err != nil {
		t.Skip("no control plane in bin/: run make control-plane (make test does)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	r, err := Scale(ctx, ScaleOptions{Nodes: 300, GPUsPerNode: 8, Pods: 150, Seed: 1, Stall: 90 * time.Second, Progress: testWriter{t}})
	require.NoError(t, err)
	assert.Empty(t, r.Unserved)
	assert.Empty(t, r.ModelViolations)
	assert.Equal(t, r.Pods, r.Bound)
	assert.True(t, r.LastNodeServed, "the pod eligible only on the last node")
	assert.LessOrEqual(t, r.PlansPerPod, 0.5, "plans per burst pod")
	t.Logf("%+v", *r)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
