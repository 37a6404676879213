// Package client builds the typed dynamig.io client (pkg/generated) from a
// rest.Config of any origin: kube-scheduler's, an in-cluster config, a
// test server's.
package client

import (
	"fmt"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"

	"github.com/dynamig/dynamig/pkg/generated/clientset/versioned"
)

// New returns the dynamig.io clientset for cfg, speaking JSON: custom
// resources have no protobuf encoding, and kube-scheduler's client
// configuration (clientConnection.contentType) and test servers' default
// to protobuf, which the generated client would then fail to encode.
func New(cfg *rest.Config) (versioned.Interface, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = runtime.ContentTypeJSON
	cfg.AcceptContentTypes = runtime.ContentTypeJSON
	cs, err := versioned.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating the dynamig.io client: %w", err)
	}
	return cs, nil
}

// TrimManagedFields is an informer transform (cache.TransformFunc) that
// drops metadata.managedFields, as kube-scheduler does for its pods:
// nothing in dynamig reads them, they are about half of a NodePartition's
// size, and an update sent without them leaves the server's as they are.
func TrimManagedFields(obj any) (any, error) {
	if a, err := meta.Accessor(obj); err == nil && a.GetManagedFields() != nil {
		a.SetManagedFields(nil)
	}
	return obj, nil
}
