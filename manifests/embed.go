// Package manifests embeds the shipped CRDs and KubeSchedulerConfiguration,
// so that the local cluster and the tests run exactly what users install.
package manifests

import "embed"

// CRDs holds crds/*.yaml.
//
//go:embed crds/*.yaml
var CRDs embed.FS

// SchedulerConfig is scheduler/config.yaml.
//
//go:embed scheduler/config.yaml
var SchedulerConfig []byte
