// Package compat fits dynamig-scheduler, built from the Kubernetes 1.37
// libraries, to the API server it talks to. At start it asks the server
// for its version and for the APIs the scheduler would watch: a server
// older than 1.34 is refused with a clear error, as is one that lacks an
// API the scheduler cannot do without; a feature whose API the server does
// not serve is switched off (the scheduler would otherwise wait for its
// informer forever, and schedule nothing).
package compat

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery"
	"k8s.io/component-base/featuregate"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/features"
)

// Oldest is the oldest Kubernetes release dynamig-scheduler supports, and
// Newest the release whose libraries it is built from: the range the
// compatibility run tests (make test-compat).
var (
	Oldest = version.MajorMinor(1, 34)
	Newest = version.MajorMinor(1, 37)
)

// gatedAPIs are the APIs the scheduler watches only while a feature gate
// is on: if the server lacks one, the gate goes off. The 1.37 defaults
// switch on DRADeviceTaintRules, whose resource.k8s.io/v1 DeviceTaintRule
// only 1.37 serves; the others are off by default, unless a user switches
// them on.
var gatedAPIs = []struct {
	gate featuregate.Feature
	api  schema.GroupVersionResource
}{
	{features.DRADeviceTaintRules, schema.GroupVersionResource{Group: "resource.k8s.io", Version: "v1", Resource: "devicetaintrules"}},
	{features.GenericWorkload, schema.GroupVersionResource{Group: "scheduling.k8s.io", Version: "v1beta1", Resource: "podgroups"}},
	{features.CompositePodGroup, schema.GroupVersionResource{Group: "scheduling.k8s.io", Version: "v1alpha3", Resource: "compositepodgroups"}},
}

// requiredAPIs are APIs the scheduler watches whatever its gates say
// (DynamicResourceAllocation is locked on since 1.35) beyond the core ones
// every supported server serves, and dynamig's own.
var requiredAPIs = []struct {
	api  schema.GroupVersionResource
	hint string
}{
	{schema.GroupVersionResource{Group: "resource.k8s.io", Version: "v1", Resource: "resourceclaims"}, "enabled by default since Kubernetes 1.34; check the API server's --runtime-config"},
	{schema.GroupVersionResource{Group: "resource.k8s.io", Version: "v1", Resource: "resourceslices"}, "enabled by default since Kubernetes 1.34; check the API server's --runtime-config"},
	{schema.GroupVersionResource{Group: "resource.k8s.io", Version: "v1", Resource: "deviceclasses"}, "enabled by default since Kubernetes 1.34; check the API server's --runtime-config"},
	{schema.GroupVersionResource{Group: "dynamig.io", Version: "v1alpha1", Resource: "nodepartitions"}, "install dynamig's CRDs: the Helm chart, or kubectl apply -f manifests/crds"},
}

// ErrUnsupported marks an API server too old for dynamig-scheduler.
var ErrUnsupported = errors.New("unsupported Kubernetes version")

// Report is what Check found.
type Report struct {
	// Server is the API server's version, as it reports it.
	Server string
	// Off maps each gate to switch off to why.
	Off map[featuregate.Feature]string
	// Warnings are worth a log line: a server newer than tested.
	Warnings []string
}

// Check asks the server for its version and APIs. fg is the scheduler's
// feature gate as flags set it: only gates that are on are looked at. An
// error says what is wrong for a user to fix: a server too old, or an API
// missing that no gate can do without.
func Check(d discovery.DiscoveryInterface, fg featuregate.FeatureGate) (Report, error) {
	info, err := d.ServerVersion()
	if err != nil {
		return Report{}, fmt.Errorf("asking the API server for its version: %w", err)
	}
	r := Report{Server: info.GitVersion, Off: map[featuregate.Feature]string{}}
	v, err := version.ParseGeneric(info.GitVersion)
	if err != nil {
		return r, fmt.Errorf("the API server reports version %q, which dynamig-scheduler cannot read: %w", info.GitVersion, err)
	}
	switch {
	case v.Major() == 0:
		// A build without version stamps ("v0.0.0-master+$Format:%H$"): a
		// development build, or a test's in-process server.
		r.Warnings = append(r.Warnings, fmt.Sprintf("the API server reports no release version (%s); only its APIs are checked", info.GitVersion))
	case v.LessThan(Oldest):
		return r, fmt.Errorf("%w: dynamig-scheduler needs Kubernetes ≥ %s, the API server is %s", ErrUnsupported, Oldest, info.GitVersion)
	case version.MajorMinor(v.Major(), v.Minor()).GreaterThan(Newest):
		r.Warnings = append(r.Warnings, fmt.Sprintf("the API server is %s, newer than Kubernetes %s, the newest dynamig-scheduler is built from and tested with", info.GitVersion, Newest))
	}
	served := map[schema.GroupVersion]map[string]bool{}
	serves := func(gvr schema.GroupVersionResource) (bool, error) {
		gv := gvr.GroupVersion()
		if _, ok := served[gv]; !ok {
			list, err := d.ServerResourcesForGroupVersion(gv.String())
			switch {
			case apierrors.IsNotFound(err):
				served[gv] = map[string]bool{}
			case err != nil:
				return false, fmt.Errorf("asking the API server which %s resources it serves: %w", gv, err)
			default:
				served[gv] = map[string]bool{}
				for _, res := range list.APIResources {
					served[gv][res.Name] = true
				}
			}
		}
		return served[gv][gvr.Resource], nil
	}
	var missing []string
	for _, req := range requiredAPIs {
		ok, err := serves(req.api)
		if err != nil {
			return r, err
		}
		if !ok {
			missing = append(missing, fmt.Sprintf("%s %s (%s)", req.api.GroupVersion(), req.api.Resource, req.hint))
		}
	}
	if len(missing) > 0 {
		return r, fmt.Errorf("the API server (%s) does not serve %s, which dynamig-scheduler needs", info.GitVersion, strings.Join(missing, "; "))
	}
	for _, g := range gatedAPIs {
		if !fg.Enabled(g.gate) {
			continue
		}
		ok, err := serves(g.api)
		if err != nil {
			return r, err
		}
		if !ok {
			r.Off[g.gate] = fmt.Sprintf("the API server (%s) does not serve %s %s", info.GitVersion, g.api.GroupVersion(), g.api.Resource)
		}
	}
	return r, nil
}

// Apply switches off the gates of the report, except those the user set
// on the command line (set names them): those stay, with a warning that
// the scheduler will wait for their API.
func Apply(logger klog.Logger, fg featuregate.MutableFeatureGate, r Report, set map[string]bool) error {
	for _, w := range r.Warnings {
		logger.Info("Warning: "+w, "apiServer", r.Server)
	}
	off := map[string]bool{}
	for _, gate := range slices.Sorted(maps.Keys(r.Off)) {
		if set[string(gate)] {
			logger.Info("Warning: feature gate set on the command line although its API is missing; the scheduler will wait for that API", "gate", gate, "reason", r.Off[gate])
			continue
		}
		logger.Info("Switching a feature gate off: its API is missing", "gate", gate, "reason", r.Off[gate], "apiServer", r.Server)
		off[string(gate)] = false
	}
	if len(off) == 0 {
		return nil
	}
	if err := fg.SetFromMap(off); err != nil {
		return fmt.Errorf("switching off feature gates %v: %w", off, err)
	}
	return nil
}

// CheckAndApply runs Check, retrying for up to timeout while it fails for
// a reason that may pass (the server still starting, the CRDs being
// installed), then Apply.
func CheckAndApply(ctx context.Context, d discovery.DiscoveryInterface, fg featuregate.MutableFeatureGate, set map[string]bool, timeout time.Duration) (Report, error) {
	logger := klog.FromContext(ctx)
	var r Report
	var last error
	_ = wait.PollUntilContextTimeout(ctx, time.Second, timeout, true, func(context.Context) (bool, error) {
		r, last = Check(d, fg)
		if last != nil && !errors.Is(last, ErrUnsupported) {
			logger.Info("Checking the API server; trying again", "err", last)
			return false, nil
		}
		return true, nil
	})
	if last != nil {
		return r, last
	}
	if ctx.Err() != nil {
		return r, ctx.Err()
	}
	return r, Apply(logger, fg, r, set)
}
