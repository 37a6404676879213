package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of dynamig's resources.
const GroupName = "dynamig.io"

// SchemeGroupVersion is dynamig.io/v1alpha1.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: "v1alpha1"}

// Resource is the NodePartition resource of this version.
var Resource = SchemeGroupVersion.WithResource("nodepartitions")

var (
	schemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds the types of this version to a scheme.
	AddToScheme = schemeBuilder.AddToScheme
)

func addKnownTypes(scheme *runtime.Scheme) error {
	scheme.AddKnownTypes(SchemeGroupVersion, &NodePartition{}, &NodePartitionList{})
	metav1.AddToGroupVersion(scheme, SchemeGroupVersion)
	return nil
}
