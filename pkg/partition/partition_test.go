package partition

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
	"github.com/dynamig/dynamig/pkg/mig"
	"github.com/dynamig/dynamig/test/builders"
)

func slice(profile string, start int) mig.Slice {
	return mig.Slice{Profile: mig.MustParseProfile(profile), Start: start}
}

func TestDecode(t *testing.T) {
	applied := Decode(builders.NodePartition(nil, "p-1", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0)), builders.GPU(1, "NVIDIA H100 80GB HBM3")))
	require.NoError(t, applied.Err)
	assert.False(t, applied.InFlight)
	require.Len(t, applied.GPUs, 2)
	assert.Equal(t, []Slice{{Slice: slice("3g.40gb", 0), Used: true}}, applied.GPUs[0].Start(applied.InFlight))
	assert.Equal(t, "H100-80GB", applied.GPUs[1].Model.Name, "NVML names resolve too")
	assert.Equal(t, 1, applied.Used)

	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	inflight := Decode(builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0))))
	require.NoError(t, inflight.Err)
	assert.True(t, inflight.InFlight)
	assert.Equal(t, []Slice{{Slice: slice("3g.40gb", 0), Used: true}, {Slice: slice("3g.40gb", 4)}},
		inflight.GPUs[0].Start(inflight.InFlight), "a plan in flight is the layout to plan from")

	off := Decode(builders.NodePartition(nil, "", "", v1alpha1.GPUStatus{Index: 0, Model: "A100-80GB", MIGMode: v1alpha1.MIGDisabled}, builders.GPU(1, "GeForce RTX 4090")))
	require.ErrorContains(t, off.Err, "no GPU with MIG enabled and a known model")
	assert.Nil(t, off.GPUs[1].Model)

	bad := Decode(builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB", builders.Used("3g.40gb", 0), builders.Used("4g.40gb", 0))))
	require.ErrorContains(t, bad.Err, "gpu 0: invalid MIG layout")

	malformed := Decode(builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB", builders.Used("3g.40", 0))))
	require.ErrorContains(t, malformed.Err, `gpu 0: invalid MIG profile "3g.40"`)
}

// A GPU whose status lists the profiles NVML offers is modelled with those:
// here an older driver without 1g.20gb, on a GPU the catalog does not know.
func TestDecodePrefersDiscoveredProfiles(t *testing.T) {
	a100, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	offered := builders.Without(a100.Profiles, "1g.20gb")
	g := EncodeGPU(0, "GPU-1", "NVIDIA A100 80GB PCIe (custom)", v1alpha1.MIGEnabled, offered, []Slice{{Slice: slice("3g.40gb", 4), Used: true}})
	n := Decode(builders.NodePartition(nil, "", "", g))
	require.NoError(t, n.Err)
	m := n.GPUs[0].Model
	assert.Equal(t, "NVIDIA A100 80GB PCIe (custom)", m.Name)
	_, ok := m.ProfileIndex(mig.MustParseProfile("1g.20gb"))
	assert.False(t, ok, "not offered by this driver")
	assert.Same(t, m, Decode(builders.NodePartition(nil, "", "", g)).GPUs[0].Model, "one model per GPU kind")

	decoded, err := Profiles(g.Profiles)
	require.NoError(t, err)
	assert.Equal(t, offered, decoded, "EncodeGPU and Profiles are inverses")

	twice := g.DeepCopy()
	twice.Profiles = append(twice.Profiles, twice.Profiles[0])
	require.ErrorContains(t, Decode(builders.NodePartition(nil, "", "", *twice)).Err, "appears twice",
		"the API server no longer checks the names: the list is atomic")

	g.Profiles[0].Starts = []int32{9}
	require.ErrorContains(t, Decode(builders.NodePartition(nil, "", "", g)).Err, "discovered profiles")
}

// The agent lists the profiles once per model (status.models); a GPU whose
// profiles differ from its model's first GPU's keeps its own. Each GPU
// decodes to the profiles it reported.
func TestShareProfiles(t *testing.T) {
	a100, err := mig.ModelByName("A100-80GB")
	require.NoError(t, err)
	h100, err := mig.ModelByName("H100-80GB")
	require.NoError(t, err)
	older := builders.Without(a100.Profiles, "1g.20gb") // a GPU on which NVML offers less
	gpus := []v1alpha1.GPUStatus{
		EncodeGPU(0, "GPU-0", a100.Name, v1alpha1.MIGEnabled, a100.Profiles, nil),
		EncodeGPU(1, "GPU-1", a100.Name, v1alpha1.MIGEnabled, a100.Profiles, nil),
		EncodeGPU(2, "GPU-2", h100.Name, v1alpha1.MIGEnabled, h100.Profiles, nil),
		EncodeGPU(3, "GPU-3", a100.Name, v1alpha1.MIGEnabled, older, nil),
		EncodeGPU(4, "GPU-4", a100.Name, v1alpha1.MIGDisabled, nil, nil),
	}
	perGPU := builders.NodePartition(nil, "", "", slices.Clone(gpus)...) // as agents before models wrote it

	models := ShareProfiles(gpus)
	require.Len(t, models, 2)
	assert.Equal(t, []string{a100.Name, h100.Name}, []string{models[0].Name, models[1].Name})
	assert.Equal(t, gpus[3].Profiles, EncodeGPU(3, "", "", "", older, nil).Profiles, "unlike its model's: kept")
	for _, i := range []int{0, 1, 2, 4} {
		assert.Empty(t, gpus[i].Profiles, "gpu %d: its model's", i)
	}

	shared := builders.NodePartition(nil, "", "", gpus...)
	shared.Status.Models = models
	for _, np := range []*v1alpha1.NodePartition{shared, perGPU} {
		n := Decode(np)
		require.NoError(t, n.Err)
		for i, want := range []*mig.Model{a100, a100, h100} {
			assert.Equal(t, want.Profiles, n.GPUs[i].Model.Profiles, "gpu %d", i)
		}
		_, ok := n.GPUs[3].Model.ProfileIndex(mig.MustParseProfile("1g.20gb"))
		assert.False(t, ok, "gpu 3 keeps its own profiles")
	}
}

func TestSetLayoutsAndDesiredLayouts(t *testing.T) {
	obj := builders.NodePartition(nil, "", "")
	at := time.Date(2026, 11, 29, 15, 0, 0, 0, time.UTC)
	SetLayouts(obj, "p-9", at, map[int][]mig.Slice{1: {slice("7g.80gb", 0)}, 0: {}}, nil)
	assert.Equal(t, "p-9", obj.Spec.PlanID)
	assert.Equal(t, []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{}}, {Index: 1, Slices: []v1alpha1.Slice{{Profile: "7g.80gb"}}}}, obj.Spec.GPUs,
		"by index; an emptied GPU lists no slices (not null)")
	assert.Equal(t, at, Decode(obj).PlanTime)

	obj.Spec.GPUs = append(obj.Spec.GPUs, v1alpha1.GPULayout{Index: 2, Slices: []v1alpha1.Slice{{Profile: "7g"}}})
	layouts, errs := DesiredLayouts(obj)
	assert.Equal(t, map[int][]mig.Slice{0: {}, 1: {slice("7g.80gb", 0)}}, layouts)
	require.Len(t, errs, 1)
	assert.ErrorContains(t, errs[2], `invalid MIG profile "7g"`)
}

func TestKeeps(t *testing.T) {
	// In flight: p-2 creates 3g.40gb@4 next to the 3g.40gb@0 that exists.
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	n := Decode(builders.NodePartition(spec, "p-2", "p-1", builders.GPU(0, "A100-80GB", builders.Advertised("3g.40gb", 0)), builders.GPU(1, "A100-80GB", builders.Advertised("7g.80gb", 0))))
	require.NoError(t, n.Err)
	for _, tc := range []struct {
		name    string
		layouts map[int][]mig.Slice
		want    bool
	}{
		{"adds a slice", map[int][]mig.Slice{0: {slice("3g.40gb", 0), slice("3g.40gb", 4)}, 1: {slice("7g.80gb", 0)}}, true},
		{"a GPU it does not list keeps its slices", map[int][]mig.Slice{0: {slice("3g.40gb", 0), slice("3g.40gb", 4)}}, true},
		{"drops a slice the spec creates", map[int][]mig.Slice{0: {slice("3g.40gb", 0), slice("2g.20gb", 4)}}, false},
		{"drops a slice that exists", map[int][]mig.Slice{0: {slice("3g.40gb", 0), slice("3g.40gb", 4)}, 1: {}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, Keeps(n, tc.layouts))
		})
	}
}

func TestDecodeOpensWhatKeepsTheAppliedPlan(t *testing.T) {
	spec := []v1alpha1.GPULayout{{Index: 0, Slices: []v1alpha1.Slice{{Profile: "3g.40gb", Start: 0}, {Profile: "3g.40gb", Start: 4}}}}
	applied := metav1.Condition{Type: v1alpha1.ConditionApplied, Status: metav1.ConditionTrue}
	refused := metav1.Condition{Type: v1alpha1.ConditionApplied, Status: metav1.ConditionFalse}
	for _, tc := range []struct {
		name      string
		plugin    v1alpha1.DevicePluginMode
		keeps     string
		applying  string
		observed  string
		condition metav1.Condition
		want      bool
	}{
		{"the agent applies the plan itself", v1alpha1.DevicePluginAgent, "", "p-3", "p-1", refused, true},
		{"the agent applies a plan it keeps", v1alpha1.DevicePluginAgent, "p-1,p-2", "p-2", "p-1", applied, true},
		{"the agent applied a plan it keeps", v1alpha1.DevicePluginAgent, "p-1,p-2", "", "p-2", applied, true},
		{"the agent refused a plan it keeps", v1alpha1.DevicePluginAgent, "p-1,p-2", "", "p-2", refused, false},
		{"the agent applies another plan", v1alpha1.DevicePluginAgent, "p-2", "p-1", "p-0", applied, false},
		{"the agent has not withdrawn the destroys of a plan it keeps", v1alpha1.DevicePluginAgent, "p-2", "", "p-1", applied, false},
		{"keeping nothing", v1alpha1.DevicePluginAgent, "", "p-2", "p-1", applied, false},
		{"restart mode", v1alpha1.DevicePluginNVIDIA, "p-2", "p-2", "p-1", applied, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			np := builders.NodePartition(spec, "p-3", tc.observed, builders.GPU(0, "A100-80GB", builders.Advertised("3g.40gb", 0)))
			np.Status.DevicePlugin, np.Status.ApplyingPlanID = tc.plugin, tc.applying
			np.Status.Conditions = []metav1.Condition{tc.condition}
			if tc.keeps != "" {
				np.Annotations = map[string]string{KeepsAnnotation: tc.keeps}
			}
			n := Decode(np)
			require.NoError(t, n.Err)
			assert.True(t, n.InFlight)
			assert.Equal(t, tc.want, n.Applying)
		})
	}
}

func TestKeptBy(t *testing.T) {
	assert.Nil(t, KeptBy(Decode(builders.NodePartition(nil, "", "", builders.GPU(0, "A100-80GB")))), "no plan yet")
	np := builders.NodePartition(nil, "p-5", "p-1", builders.GPU(0, "A100-80GB"))
	np.Annotations = map[string]string{KeepsAnnotation: "p-1,p-2,p-3,p-4"}
	assert.Equal(t, []string{"p-2", "p-3", "p-4", "p-5"}, KeptBy(Decode(np)), "the latest four")
}
