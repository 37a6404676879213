# dynamig — run `make help` for the targets.
GO       ?= go
BIN      := bin
PKGS     := ./...
BENCHTIME ?= 20x
CONTROLLER_GEN := $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0
# go-nvml's cgo build prints ~30 deprecation warnings from nvml.h: noise.
CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations
export CGO_CFLAGS
# The typed client of dynamig.io/v1alpha1 (clientset, listers, informers),
# from k8s.io/code-generator at the module's Kubernetes version.
CODEGEN_VERSION := v0.37.2
CODEGEN = $(GO) run k8s.io/code-generator/cmd/$(1)@$(CODEGEN_VERSION) --go-header-file hack/boilerplate.go.txt
MODULE  := github.com/dynamig/dynamig
API_PKG := $(MODULE)/pkg/apis/dynamig/v1alpha1
GENERATED := pkg/apis/dynamig/v1alpha1/zz_generated.deepcopy.go manifests/crds manifests/helm/dynamig/crds pkg/generated

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build the binaries into bin/.
	$(GO) build -o $(BIN)/ ./cmd/...

# The local cluster's control plane, built from the Go modules (tool lines in
# go.mod); the end-to-end tests and make demo run it.
# The kubelet runs the local cluster's nodes on a fake container runtime
# (test/kubeletnode). local.BuildControlPlane (test/local/controlplane.go)
# names the packages and sets the version ldflags.

CONTROL_PLANE_BINS := $(BIN)/kube-apiserver $(BIN)/kube-controller-manager $(BIN)/kubelet $(BIN)/server

.PHONY: control-plane
control-plane: $(CONTROL_PLANE_BINS) ## Build etcd, kube-apiserver, kube-controller-manager and kubelet into bin/ for the local cluster.

$(CONTROL_PLANE_BINS) &: go.mod go.sum
	$(GO) run ./cmd/dynamig-local --build-control-plane $(BIN)
	touch $(CONTROL_PLANE_BINS)

.PHONY: test
test: control-plane ## Run all tests with the race detector (unit, integration, end to end).
	$(GO) test -race -count=1 -timeout 30m $$($(GO) list $(PKGS) | grep -v /test/e2e)
	@# The end-to-end tests last, alone: their control-plane processes and
	@# timing should not compete with the integration tests for 2 cores.
	$(GO) test -race -count=1 -timeout 30m ./test/e2e/

.PHONY: test-integration
test-integration: ## Run the scheduler and the node agent against a real kube-apiserver and etcd (part of make test).
	$(GO) test -race -count=1 -v ./test/integration/

.PHONY: verify
verify: ## Check formatting, go vet, and that generated files are up to date.
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@$(MAKE) --no-print-directory generate
	@if ! git diff --quiet -- $(GENERATED) || [ -n "$$(git ls-files --others --exclude-standard -- $(GENERATED))" ]; then \
		echo "generated files are stale; run make generate and commit:"; git status --short -- $(GENERATED); exit 1; fi

.PHONY: generate
generate: ## Regenerate deepcopy code, the CRDs (manifests/crds, the Helm chart) and the typed client in pkg/generated (pinned generators).
	$(CONTROLLER_GEN) object paths=./pkg/apis/... crd:crdVersions=v1 output:crd:dir=./manifests/crds
	cp manifests/crds/*.yaml manifests/helm/dynamig/crds/
	rm -rf pkg/generated
	$(call CODEGEN,client-gen) --input-base $(MODULE)/pkg/apis --input dynamig/v1alpha1 \
		--output-dir pkg/generated/clientset --output-pkg $(MODULE)/pkg/generated/clientset --clientset-name versioned
	$(call CODEGEN,lister-gen) --output-dir pkg/generated/listers --output-pkg $(MODULE)/pkg/generated/listers $(API_PKG)
	$(call CODEGEN,informer-gen) --output-dir pkg/generated/informers --output-pkg $(MODULE)/pkg/generated/informers \
		--versioned-clientset-package $(MODULE)/pkg/generated/clientset/versioned \
		--listers-package $(MODULE)/pkg/generated/listers $(API_PKG)

.PHONY: bench
bench: ## Planner latency benchmarks and the quality table (docs/benchmarks.md).
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./pkg/planner/
	$(GO) run ./cmd/dynamig bench --snapshots 200 --seed 1

.PHONY: fuzz
fuzz: ## Fuzz the parsers for FUZZTIME each (default 30s).
	$(GO) test -run '^$$' -fuzz FuzzParseProfile -fuzztime $(or $(FUZZTIME),30s) ./pkg/mig/
	$(GO) test -run '^$$' -fuzz FuzzParseResourceName -fuzztime $(or $(FUZZTIME),30s) ./pkg/mig/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(or $(FUZZTIME),30s) ./pkg/scenario/

.PHONY: images
images: ## Build the container images (needs docker): dynamig/dynamig-scheduler:dev, dynamig/dynamig-agent:dev.
	docker build -f Dockerfile.scheduler -t dynamig/dynamig-scheduler:dev .
	docker build -f Dockerfile.agent -t dynamig/dynamig-agent:dev .

.PHONY: test-e2e
test-e2e: control-plane ## Run the end-to-end tests on the local cluster (part of make test).
	$(GO) test -race -count=1 -v ./test/e2e/

COMPAT_VERSIONS ?= 1.34 1.35 1.36
.PHONY: test-compat
test-compat: control-plane ## Run the seed in both device-plugin modes and a day in the life (examples/day.yaml, agent mode) on older control planes (COMPAT_VERSIONS, default 1.34 1.35 1.36), built from test/compat/k8s-<version>.
	$(GO) build -o $(BIN)/ ./cmd/dynamig-local
	for v in $(COMPAT_VERSIONS); do \
		for m in agent nvidia; do \
			echo "== Kubernetes $$v, device plugin $$m: the seed"; $(BIN)/dynamig-local --kubernetes-version $$v --device-plugin $$m || exit 1; \
		done; \
		echo "== Kubernetes $$v, device plugin agent: a day in the life"; $(BIN)/dynamig-local --kubernetes-version $$v --time-scale 1440 examples/day.yaml || exit 1; \
	done

RUNS ?= 1000
SEED ?= 1
PARALLEL ?= 1
.PHONY: soak
soak: control-plane ## Randomized soak on the local cluster: RUNS scenarios (default 1000) from SEED, faults (FAULTS=a,b to pick) at random moments, invariants checked after each; GUARDS_OFF=<guard> builds a test binary without that guard (docs/reliability.md); DEVICE_PLUGIN=nvidia for nodes in restart mode (default: agent mode); PARALLEL=K splits the runs over K clusters (a run takes about a fifth of a core); SLICE_DELAY=1s makes every run's GPUs slow (default: half the runs).
	DYNAMIG_GUARDS_OFF=$(GUARDS_OFF) $(GO) run $(if $(GUARDS_OFF),-tags dynamig_unsafe) ./cmd/dynamig-local --soak $(RUNS) --soak-seed $(SEED) --soak-parallel $(PARALLEL) $(if $(FAULTS),--soak-faults $(FAULTS)) $(if $(DEVICE_PLUGIN),--device-plugin $(DEVICE_PLUGIN)) $(if $(SLICE_DELAY),--slice-delay $(SLICE_DELAY))

SCALE_NODES ?= 5000
SCALE_PODS ?= 1000
SCALE_STEADY_PODS ?= 1300
SCALE_STEADY_RATE ?= 5
.PHONY: scale
scale: control-plane ## Scale run: SCALE_NODES (default 5000) light nodes × 8 GPUs on real etcd and kube-apiserver, the dynamig-scheduler binary with the shipped configuration; a burst of SCALE_PODS MIG pods, then SCALE_STEADY_PODS one by one (SCALE_STEADY_RATE a second) for PostFilter latency over as many plans, RSS, API requests per pod, non-GPU throughput in 5 paired runs (docs/benchmarks.md; a 300-node version runs in make test).
	$(GO) run ./cmd/dynamig-local --scale --scale-nodes $(SCALE_NODES) --scale-pods $(SCALE_PODS) --scale-steady-pods $(SCALE_STEADY_PODS) --scale-steady-rate $(SCALE_STEADY_RATE)

.PHONY: demo
demo: ## Run the seed on a local cluster: real API server, scheduler and agents on simulated GPUs (SCENARIO=file for another).
	$(GO) run ./cmd/dynamig-local $(SCENARIO)
