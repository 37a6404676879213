package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/restmapper"
)

// testSchedulerManifests applies every object of manifests/scheduler —
// the ConfigMap built from config.yaml as kustomize would — with
// server-side dry-run, so that a broken manifest fails the tests.
func (c *cluster) testSchedulerManifests(t *testing.T) {
	ctx := context.Background()
	_, err := c.cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "dynamig-system"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = c.cs.CoreV1().Namespaces().Delete(context.Background(), "dynamig-system", metav1.DeleteOptions{})
	})

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

	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(discovery.NewDiscoveryClientForConfigOrDie(c.cfg)))
	for _, obj := range objs {
		gvk := obj.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		require.NoError(t, err, "%s %s", gvk, obj.GetName())
		_, err = c.dyn.Resource(m.Resource).Namespace(obj.GetNamespace()).Create(ctx, obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
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
