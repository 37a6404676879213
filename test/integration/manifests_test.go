package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"

	"github.com/dynamig/dynamig/pkg/apis/dynamig/v1alpha1"
)

// testSchedulerManifests applies every object of manifests/scheduler —
// the ConfigMap built from config.yaml as kustomize would — with
// server-side dry-run, so that a broken manifest fails the tests.
func (c *cluster) testSchedulerManifests(t *testing.T) {
	c.ensureNamespace(t, "dynamig-system")

	var objs []*unstructured.Unstructured
	for _, f := range []string{"rbac.yaml", "deployment.yaml"} {
		objs = append(objs, readObjects(t, filepath.Join("../../manifests/scheduler", f))...)
	}
	config, err := os.ReadFile(schedulerConfig)
	require.NoError(t, err)
	cm := &v1.ConfigMap{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"},
		ObjectMeta: metav1.ObjectMeta{Name: "dynamig-scheduler-config", Namespace: "dynamig-system"},
		Data:       map[string]string{"config.yaml": string(config)}}
	u, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cm)
	require.NoError(t, err)
	objs = append(objs, &unstructured.Unstructured{Object: u})

	c.dryRun(t, objs)
}

// dryRun creates every object with server-side dry-run.
func (c *cluster) dryRun(t *testing.T, objs []*unstructured.Unstructured) {
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(c.cfg)))
	for _, obj := range objs {
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		require.NoError(t, err, "%s %s", gvk, obj.GetName())
		_, err = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace()).Create(context.Background(), obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		require.NoError(t, err, "%s %s/%s", gvk.Kind, obj.GetNamespace(), obj.GetName())
	}
}

// readObjects decodes a multi-document YAML file.
func readObjects(t *testing.T, file string) []*unstructured.Unstructured {
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		obj := &unstructured.Unstructured{}
		if err := dec.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return out
			}
			require.NoError(t, err, file)
		}
		if len(obj.Object) > 0 {
			out = append(out, obj)
		}
	}
}

// ensureNamespace creates a namespace unless it exists.
func (c *cluster) ensureNamespace(t *testing.T, name string) {
	_, err := c.cs.CoreV1().Namespaces().Create(context.Background(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
}

// testAgentManifests applies manifests/node-agent with server-side
// dry-run, then installs its RBAC and admission policy for real and checks,
// as an agent on node "np-a" (impersonated with its bound token's node
// name), that it may write only its own node's NodePartition status and
// delete only pods on its own node.
func (c *cluster) testAgentManifests(t *testing.T) {
	ctx := context.Background()
	c.dryRun(t, readObjects(t, "../../manifests/node-agent/namespace.yaml"))
	c.ensureNamespace(t, "dynamig-system")
	c.ensureNamespace(t, "gpu-operator")
	var objs []*unstructured.Unstructured
	for _, f := range []string{"rbac.yaml", "admission-policy.yaml", "daemonset.yaml"} {
		objs = append(objs, readObjects(t, filepath.Join("../../manifests/node-agent", f))...)
	}
	c.dryRun(t, objs)

	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(c.cfg)))
	for _, obj := range objs {
		if obj.GetKind() == "DaemonSet" {
			continue
		}
		m, err := mapper.RESTMapping(obj.GroupVersionKind().GroupKind(), obj.GroupVersionKind().Version)
		require.NoError(t, err)
		res := c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
		_, err = res.Create(ctx, obj, metav1.CreateOptions{})
		require.NoError(t, err, "%s %s", obj.GetKind(), obj.GetName())
		t.Cleanup(func() { _ = res.Delete(context.Background(), obj.GetName(), metav1.DeleteOptions{}) })
	}

	cfg := rest.CopyConfig(c.cfg)
	cfg.Impersonate = rest.ImpersonationConfig{
		UserName: "system:serviceaccount:dynamig-system:dynamig-agent",
		Groups:   []string{"system:serviceaccounts", "system:authenticated"},
		Extra:    map[string][]string{"authentication.kubernetes.io/node-name": {"np-a"}},
	}
	asAgent := partitions(t, cfg)
	own := &v1alpha1.NodePartition{ObjectMeta: metav1.ObjectMeta{Name: "np-a"}}
	other := &v1alpha1.NodePartition{ObjectMeta: metav1.ObjectMeta{Name: "np-b"}}
	t.Cleanup(func() {
		for _, n := range []string{"np-a", "np-b"} {
			_ = c.parts.Delete(context.Background(), n, metav1.DeleteOptions{})
		}
	})
	// The policy takes effect once the API server has loaded it.
	waitFor(t, 30*time.Second, "the admission policy denies another node's NodePartition", func() (bool, error) {
		_, err := asAgent.Create(ctx, other, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err != nil && strings.Contains(err.Error(), "may not change objects of node 'np-b'"), nil
	})
	created, err := asAgent.Create(ctx, own, metav1.CreateOptions{})
	require.NoError(t, err, "its own node's NodePartition")
	_, err = asAgent.UpdateStatus(ctx, created, metav1.UpdateOptions{})
	require.NoError(t, err, "its own status")
	_, err = asAgent.Update(ctx, created, metav1.UpdateOptions{})
	require.True(t, apierrors.IsForbidden(err), "the spec is the scheduler's: %v", err)

	_, err = c.parts.Create(ctx, other, metav1.CreateOptions{})
	require.NoError(t, err)
	theirs, err := c.parts.Get(ctx, "np-b", metav1.GetOptions{})
	require.NoError(t, err)
	_, err = asAgent.UpdateStatus(ctx, theirs, metav1.UpdateOptions{})
	require.Error(t, err, "another node's status")
	assert.Contains(t, err.Error(), "may not change objects of node 'np-b'")

	agentPods := kubernetes.NewForConfigOrDie(cfg).CoreV1().Pods("gpu-operator")
	for node, allowed := range map[string]bool{"np-a": true, "np-b": false} {
		pod, err := c.cs.CoreV1().Pods("gpu-operator").Create(ctx, &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "plugin-" + node},
			Spec:       v1.PodSpec{NodeName: node, Containers: []v1.Container{{Name: "p", Image: "plugin"}}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		err = agentPods.Delete(ctx, pod.Name, metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}})
		if allowed {
			assert.NoError(t, err, "a pod on its node")
		} else {
			assert.Error(t, err, "a pod on another node")
		}
		require.NoError(t, c.cs.CoreV1().Pods("gpu-operator").Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}))
	}
}
