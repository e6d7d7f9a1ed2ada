# pcipt: make test (every gate, on a fresh machine too) and make demo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Go is only needed to build the control-plane binaries once; find it where Go installs itself.
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin

.PHONY: test demo demo-stop unit integration lint crds crds-check manifests image controlplane node hwlab hwlab-deps system-deps venv clean help

help:
	@echo "make demo    pcipt end to end: control plane, controller, two simulated hosts, VMs"
	@echo "make test    install what is missing, then run every gate and test"
	@echo "make crds    regenerate crds/ and the chart's CRDs from the models"
	@echo "make manifests  regenerate deploy/pcipt.yaml from the chart"
	@echo "make image   build the container image with buildah"
	@echo "make hwlab   the hardware lab: scenarios on a real kernel under QEMU"

system-deps:
	@bash hack/install-system-deps.sh

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

controlplane: $(STAMP)
	$(PY) -m pcipt.devcluster build

# What the chart's tests and the real-pod tier add: helm, and kubelet, kube-proxy,
# kube-scheduler and kube-controller-manager for a local node (built once, cached).
node: $(STAMP)
	$(PY) -m pcipt.devcluster build --helm --node

crds: $(STAMP)
	$(PY) -m pcipt.crdgen
	$(PY) hack/render-manifests.py

crds-check: $(STAMP)
	$(PY) -m pcipt.crdgen --check

# deploy/pcipt.yaml: the chart rendered with its defaults, for installs without Helm.
manifests: $(STAMP)
	$(PY) hack/render-manifests.py

# The container image, with buildah (see hack/build-image.sh).
image:
	hack/build-image.sh $(IMAGE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

integration: $(STAMP) controlplane
	$(VENV)/bin/pytest tests/integration

test: $(STAMP) crds-check lint controlplane node hwlab-deps
	$(VENV)/bin/pytest

# The hardware lab: a real kernel under QEMU with an emulated IOMMU and SR-IOV devices
# (tests/hwlab/run.py). Installs QEMU (bookworm-backports), a kernel and busybox when missing.
hwlab-deps:
	@bash hack/install-hwlab-deps.sh

hwlab: $(STAMP) hwlab-deps
	$(PY) tests/hwlab/run.py

demo: $(STAMP) controlplane
	$(PY) demo/run.py $(DEMO_ARGS)

demo-stop: $(STAMP)
	$(PY) demo/run.py --stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
