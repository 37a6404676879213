package v1

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/dynamig/dynamig/pkg/apis/config"
)

func raw(s string) runtime.Object {
	return &runtime.Unknown{Raw: []byte(s), ContentType: runtime.ContentTypeJSON}
}

func TestDecodeDefaults(t *testing.T) {
	want := &config.DynamicMIGArgs{NodeSelector: "dynamig.io/partitioning=mig", PlanTimeout: 5 * time.Minute, MaxNodesPerPlan: 100, MaxPendingPodsPerPlan: 200}
	for _, obj := range []runtime.Object{nil, raw(""), raw("{}"), raw(`{"kind":"DynamicMIGArgs","apiVersion":"kubescheduler.config.k8s.io/v1"}`)} {
		got, err := Decode(obj)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
}

func TestDecodeValues(t *testing.T) {
	got, err := Decode(raw(`{"nodeSelector":"pool in (a,b)","planTimeout":"30s","maxNodesPerPlan":7,"maxPendingPodsPerPlan":9}`))
	require.NoError(t, err)
	assert.Equal(t, &config.DynamicMIGArgs{NodeSelector: "pool in (a,b)", PlanTimeout: 30 * time.Second, MaxNodesPerPlan: 7, MaxPendingPodsPerPlan: 9}, got)
}

func TestDecodeErrorsNameTheField(t *testing.T) {
	tests := []struct {
		obj  runtime.Object
		want string
	}{
		{raw(`{"nodeSelectr":"a=b"}`), `unknown field "nodeSelectr"`},
		{raw(`{"nodeSelector":"a=b=c"}`), "args.nodeSelector: Invalid value"},
		{raw(`{"nodeSelector":""}`), "args.nodeSelector: Required value"},
		{raw(`{"planTimeout":"-1s"}`), "args.planTimeout: Invalid value"},
		{raw(`{"maxNodesPerPlan":0}`), "args.maxNodesPerPlan: Invalid value: 0: must be at least 1"},
		{raw(`{"maxPendingPodsPerPlan":-3}`), "args.maxPendingPodsPerPlan"},
		{raw(`{"maxNodesPerPlan":"many"}`), "DynamicMIG args"},
		{&metav1.Status{}, "want raw arguments"},
	}
	for _, tt := range tests {
		_, err := Decode(tt.obj)
		require.Error(t, err)
		assert.Contains(t, err.Error(), tt.want)
	}
}
