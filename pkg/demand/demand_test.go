package demand

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"

	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/builders"
)

func TestOf(t *testing.T) {
	p := func(s string) mig.ProfileName { return mig.MustParseProfile(s) }
	tests := []struct {
		name string
		pod  v1.PodSpec
		want Demand
		err  string
	}{
		{"none", v1.PodSpec{Containers: []v1.Container{builders.Container(builders.Resources("cpu", "1"))}}, nil, ""},
		{"two profiles", v1.PodSpec{Containers: []v1.Container{
			builders.Container(builders.Resources("nvidia.com/mig-1g.10gb", "2")), builders.Container(builders.Resources("nvidia.com/mig-3g.40gb", "1", "cpu", "1")),
		}}, Demand{p("1g.10gb"): 2, p("3g.40gb"): 1}, ""},
		{"init container larger", v1.PodSpec{
			InitContainers: []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-1g.10gb", "3"))},
			Containers:     []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-1g.10gb", "1"))},
		}, Demand{p("1g.10gb"): 3}, ""},
		{"media engines", v1.PodSpec{Containers: []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-1g.10gb.me", "1"))}}, Demand{p("1g.10gb+me"): 1}, ""},
		{"unknown profile", v1.PodSpec{Containers: []v1.Container{builders.Container(builders.Resources("nvidia.com/mig-1g", "1"))}}, nil, `resource "nvidia.com/mig-1g"`},
	}
	for _, tt := range tests {
		d, err := Of(&v1.Pod{Spec: tt.pod})
		if tt.err != "" {
			require.ErrorContains(t, err, tt.err, tt.name)
			assert.True(t, AsksForMIG(&v1.Pod{Spec: tt.pod}), tt.name)
			continue
		}
		require.NoError(t, err, tt.name)
		assert.Equal(t, tt.want, d, tt.name)
		assert.Equal(t, tt.want != nil, AsksForMIG(&v1.Pod{Spec: tt.pod}), tt.name)
	}
}

func TestAsksFor(t *testing.T) {
	limitsOnly := v1.Container{Resources: v1.ResourceRequirements{Limits: builders.Resources("nvidia.com/mig-3g.40gb", "1")}}
	pod := &v1.Pod{Spec: v1.PodSpec{
		InitContainers: []v1.Container{limitsOnly},
		Containers:     []v1.Container{builders.Container(builders.Resources("cpu", "1"))},
	}}
	assert.True(t, AsksFor(pod, "nvidia.com/mig-3g.40gb"), "an init container's limit names it")
	assert.False(t, AsksFor(pod, "nvidia.com/mig-1g.10gb"))
	assert.True(t, AsksFor(pod, "cpu"))
}

func TestString(t *testing.T) {
	d := Demand{mig.MustParseProfile("3g.40gb"): 1, mig.MustParseProfile("1g.10gb"): 2}
	assert.Equal(t, "1g.10gb×2 + 3g.40gb", d.String())
}
