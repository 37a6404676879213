package dynamicmig

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/klog/v2/ktesting"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/generated/clientset/versioned/fake"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/pkg/partition"
)

// apiServer answers NodePartition updates as the API server does:
// a Conflict unless the update carries the stored resourceVersion, which
// each write bumps. Each update waits for a value on release.
type apiServer struct {
	mu      sync.Mutex
	objects map[string]*v1alpha1.NodePartition
	updates []string // "<name>@<resourceVersion sent>", as received
	release chan struct{}
}

func (s *apiServer) update(a k8stesting.Action) (bool, runtime.Object, error) {
	np := a.(k8stesting.UpdateAction).GetObject().(*v1alpha1.NodePartition)
	s.mu.Lock()
	s.updates = append(s.updates, np.Name+"@"+np.ResourceVersion)
	s.mu.Unlock()
	<-s.release
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.objects[np.Name]
	if cur.ResourceVersion != np.ResourceVersion {
		return true, nil, apierrors.NewConflict(v1alpha1.Resource("nodepartitions"), np.Name, nil)
	}
	s.objects[np.Name] = s.bump(np)
	return true, s.objects[np.Name].DeepCopy(), nil
}

// bump stores a copy of np one resourceVersion on.
func (s *apiServer) bump(np *v1alpha1.NodePartition) *v1alpha1.NodePartition {
	rv, _ := strconv.Atoi(np.ResourceVersion)
	out := np.DeepCopy()
	out.ResourceVersion = strconv.Itoa(rv + 1)
	return out
}

func (s *apiServer) sent() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.updates...)
}

// ended is one writeSpec's done call.
type ended struct {
	err        error
	shown, now *partition.Node
}

// testStore is the informer-backed store on apiServer, with the node's
// NodePartition read at resourceVersion 1.
func testStore(t *testing.T) (*partitions, *apiServer) {
	t.Helper()
	np := emptyA100("n1")
	np.ResourceVersion = "1"
	srv := &apiServer{objects: map[string]*v1alpha1.NodePartition{"n1": np.DeepCopy()}, release: make(chan struct{})}
	client := fake.NewSimpleClientset()
	client.PrependReactor("update", "nodepartitions", srv.update)
	_, ctx := ktesting.NewTestContext(t)
	p := &partitions{client: client.DynamigV1alpha1().NodePartitions(), ctx: ctx, nodes: map[string]*partition.Node{}, writes: map[string]*specWrite{}}
	p.store(np)
	return p, srv
}

// plan writes a spec planned on what the store shows for n1 now.
func plan(t *testing.T, p *partitions, planID string, slice mig.Slice) chan ended {
	t.Helper()
	np := p.get("n1").Object.DeepCopy()
	partition.SetLayouts(np, planID, time.Now(), map[int][]mig.Slice{0: {slice}})
	out := make(chan ended, 1)
	logger, _ := ktesting.NewTestContext(t)
	p.writeSpec(logger, np, func(err error, shown, now *partition.Node) { out <- ended{err, shown, now} })
	return out
}

func slice(t *testing.T, profile string, start int) mig.Slice {
	t.Helper()
	prof, err := mig.ParseProfile(profile)
	require.NoError(t, err)
	return mig.Slice{Profile: prof, Start: start}
}

func TestWriteSpecShowsThePlanUntilWritten(t *testing.T) {
	p, srv := testStore(t)
	first := plan(t, p, "p-1", slice(t, "7g.80gb", 0))
	assert.Equal(t, "p-1", p.get("n1").PlanID, "Filter sees the plan before it is written")

	srv.release <- struct{}{}
	e := <-first
	require.NoError(t, e.err)
	assert.Equal(t, "p-1", e.shown.PlanID)
	require.NotNil(t, e.now, "no later write: get returns what was written")
	assert.Equal(t, "2", e.now.Object.ResourceVersion)
	assert.Same(t, e.now, p.get("n1"))
}

func TestWriteSpecChainsWritesToOneNode(t *testing.T) {
	p, srv := testStore(t)
	first := plan(t, p, "p-1", slice(t, "3g.40gb", 4))
	second := plan(t, p, "p-2", slice(t, "4g.40gb", 0)) // planned on p-1's spec, before it is written
	assert.Equal(t, "p-2", p.get("n1").PlanID)

	srv.release <- struct{}{}
	e := <-first
	require.NoError(t, e.err)
	assert.Nil(t, e.now, "a later write is under way: get still shows it")
	assert.Equal(t, "p-2", p.get("n1").PlanID)

	srv.release <- struct{}{}
	e = <-second
	require.NoError(t, e.err, "written on the version the first write produced, not the one it was planned on")
	assert.Equal(t, []string{"n1@1", "n1@2"}, srv.sent())
	assert.Equal(t, "3", p.get("n1").Object.ResourceVersion)
	assert.Equal(t, "p-2", p.get("n1").PlanID)

	// Planned on p-2's spec while its write was under way, handed over
	// after it ended: written on p-2's version too.
	third := plan(t, p, "p-3", slice(t, "7g.80gb", 0))
	srv.release <- struct{}{}
	require.NoError(t, (<-third).err)
	assert.Equal(t, "n1@3", srv.sent()[2])
}

func TestWriteSpecFailureShowsTheObjectAsRead(t *testing.T) {
	p, srv := testStore(t)
	first := plan(t, p, "p-1", slice(t, "3g.40gb", 4))
	second := plan(t, p, "p-2", slice(t, "4g.40gb", 0))
	srv.mu.Lock()
	srv.objects["n1"] = srv.bump(srv.objects["n1"]) // the agent writes status meanwhile
	srv.mu.Unlock()

	srv.release <- struct{}{}
	e := <-first
	require.True(t, apierrors.IsConflict(e.err), "got %v", e.err)
	e = <-second
	require.True(t, apierrors.IsConflict(e.err), "a plan on a spec never written fails as that write did: got %v", e.err)
	assert.Len(t, srv.sent(), 1, "the second plan is not sent")
	require.NotNil(t, e.now)
	assert.Equal(t, "", e.now.PlanID, "get shows the object as last read, without either plan")
	assert.Same(t, e.now, p.get("n1"))
}

func TestWriteSpecEndsWithTheScheduler(t *testing.T) {
	p, srv := testStore(t)
	ctx, cancel := context.WithCancel(p.ctx)
	p.ctx = ctx
	first := plan(t, p, "p-1", slice(t, "7g.80gb", 0))
	second := plan(t, p, "p-2", slice(t, "1g.10gb", 6))
	cancel()
	e := <-second
	require.ErrorIs(t, e.err, context.Canceled)
	srv.release <- struct{}{}
	<-first
}
