package compat

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/version"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	fakediscovery "k8s.io/client-go/discovery/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/kubernetes/pkg/features"
)

// server is a fake API server of a version serving the DRA v1 API,
// dynamig's CRD, and the extra resources of resource.k8s.io/v1.
func server(gitVersion string, crd bool, extra ...string) *fakediscovery.FakeDiscovery {
	d := &fakediscovery.FakeDiscovery{Fake: &k8stesting.Fake{}, FakedServerVersion: &version.Info{GitVersion: gitVersion}}
	dra := &metav1.APIResourceList{GroupVersion: "resource.k8s.io/v1"}
	for _, r := range append([]string{"resourceclaims", "resourceslices", "deviceclasses"}, extra...) {
		dra.APIResources = append(dra.APIResources, metav1.APIResource{Name: r})
	}
	d.Resources = []*metav1.APIResourceList{dra}
	if crd {
		d.Resources = append(d.Resources, &metav1.APIResourceList{GroupVersion: "dynamig.io/v1alpha1", APIResources: []metav1.APIResource{{Name: "nodepartitions"}}})
	}
	return d
}

// On 1.34–1.36 the 1.37 default DRADeviceTaintRules goes off (its v1 API
// is 1.37's); on 1.37 nothing changes.
func TestGatesFollowTheServer(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	for _, v := range []string{"v1.34.4", "v1.35.4", "v1.36.3"} {
		fg := utilfeature.DefaultMutableFeatureGate.DeepCopy()
		require.True(t, fg.Enabled(features.DRADeviceTaintRules), "1.37 default")
		r, err := Check(server(v, true), fg)
		require.NoError(t, err)
		assert.Equal(t, "the API server ("+v+") does not serve resource.k8s.io/v1 devicetaintrules", r.Off[features.DRADeviceTaintRules])
		assert.Len(t, r.Off, 1)
		require.NoError(t, Apply(logger, fg, r, nil))
		assert.False(t, fg.Enabled(features.DRADeviceTaintRules), v)
	}
	fg := utilfeature.DefaultMutableFeatureGate.DeepCopy()
	r, err := Check(server("v1.37.2", true, "devicetaintrules"), fg)
	require.NoError(t, err)
	assert.Empty(t, r.Off)
	assert.Empty(t, r.Warnings)
}

// A gate the user set on the command line stays as set.
func TestUserGateStays(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	fg := utilfeature.DefaultMutableFeatureGate.DeepCopy()
	r, err := Check(server("v1.35.4", true), fg)
	require.NoError(t, err)
	require.NoError(t, Apply(logger, fg, r, map[string]bool{string(features.DRADeviceTaintRules): true}))
	assert.True(t, fg.Enabled(features.DRADeviceTaintRules))
}

// Bad input: a server too old, one that lacks a needed API, one newer
// than tested.
func TestUnsupportedServers(t *testing.T) {
	fg := utilfeature.DefaultMutableFeatureGate.DeepCopy()
	_, err := Check(server("v1.31.2", true), fg)
	assert.EqualError(t, err, "unsupported Kubernetes version: dynamig-scheduler needs Kubernetes ≥ 1.34, the API server is v1.31.2")
	assert.True(t, errors.Is(err, ErrUnsupported))

	_, err = Check(server("v1.36.3", false), fg)
	assert.EqualError(t, err, "the API server (v1.36.3) does not serve dynamig.io/v1alpha1 nodepartitions (install dynamig's CRDs: the Helm chart, or kubectl apply -f manifests/crds), which dynamig-scheduler needs")
	assert.False(t, errors.Is(err, ErrUnsupported), "may pass: retried")

	r, err := Check(server("v1.38.0", true, "devicetaintrules"), fg)
	require.NoError(t, err)
	assert.Equal(t, []string{"the API server is v1.38.0, newer than Kubernetes 1.37, the newest dynamig-scheduler is built from and tested with"}, r.Warnings)

	_, err = Check(server("v1.35.0-gke.1", true), fg)
	require.NoError(t, err, "a provider's suffix")
	r, err = Check(server("v0.0.0-master+$Format:%H$", true, "devicetaintrules"), fg)
	require.NoError(t, err, "a build without version stamps: its APIs decide")
	assert.Equal(t, []string{"the API server reports no release version (v0.0.0-master+$Format:%H$); only its APIs are checked"}, r.Warnings)
	_, err = Check(server("banana", true), fg)
	assert.ErrorContains(t, err, `the API server reports version "banana"`)
}
