"""The API as the real kube-apiserver serves it: CRDs installed from crds/, examples applied,
bad manifests refused at admission with messages that name the field."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from pcipt import constants as c
from pcipt.api.v1alpha1 import KINDS, PassthroughVM, PciDevice, PciFlavor
from tests.integration.conftest import KubeCluster
from tests.manifests import InvalidManifest, example_docs, example_files, invalid_manifests

MODELS = {"PciDevice": PciDevice, "PciFlavor": PciFlavor, "PassthroughVM": PassthroughVM}


def _kubectl_retry(kube: KubeCluster, *args: str, timeout: float = 20.0) -> str:
    """kubectl right after a CRD is installed may not see it in discovery yet; retry a little."""
    deadline = time.monotonic() + timeout
    while True:
        proc = kube.kubectl(*args)
        if proc.returncode == 0 or time.monotonic() > deadline:
            assert proc.returncode == 0, proc.stderr
            return proc.stdout
        time.sleep(0.5)


def test_every_crd_is_established_with_names_and_status_subresource(kube: KubeCluster) -> None:
    ext = client.ApiextensionsV1Api(kube.api)
    for kind in KINDS:
        crd = ext.read_custom_resource_definition(f"{kind.crd_plural}.{c.GROUP}")
        conds = {x.type: x.status for x in crd.status.conditions}
        assert conds["Established"] == "True"
        assert crd.spec.names.short_names == kind.crd_short_names
        assert crd.spec.names.categories == [c.CATEGORY]
        version = crd.spec.versions[0]
        assert version.name == c.VERSION and version.subresources.status is not None


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_example_applies_and_reads_back_into_the_models(
    kube: KubeCluster, namespace: str, unique: Callable[[str], str], path: Path
) -> None:
    proc = kube.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(path.read_text()))
    if any("status" in d for d in docs):  # what a node plugin writes through the status subresource
        proc = kube.kubectl(
            "apply", "--server-side", "--subresource=status", "-n", namespace, "-f", str(path)
        )
        assert proc.returncode == 0, proc.stderr
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind not in MODELS:  # e.g. the tenant Namespace: applied, nothing of ours to check
            continue
        got = json.loads(
            kube.kubectl(
                "get", kind.lower(), name, "-n", namespace, "-o", "json", check=True
            ).stdout
        )
        model = MODELS[kind].model_validate(got)
        # Everything the file says is in the stored object, and survives a trip through the model.
        _assert_subset(doc["spec"], model.to_dict()["spec"], path=f"{path.name}:spec")
        if "status" in doc:
            _assert_subset(doc["status"], model.to_dict()["status"], path=f"{path.name}:status")
    kube.kubectl("delete", "-n", namespace, "-f", str(path), "--wait=false")


def _assert_subset(want: object, got: object, path: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not a map"
        for k, v in want.items():
            assert k in got, f"{path}.{k} missing from {sorted(got)}"
            _assert_subset(v, got[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _assert_subset(w, g, f"{path}[{i}]")
    else:
        assert want == got, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("bad", invalid_manifests(), ids=lambda m: m.id)
def test_api_server_refuses_bad_manifest_naming_the_field(
    kube: KubeCluster, namespace: str, bad: InvalidManifest
) -> None:
    proc = kube.kubectl("create", "-n", namespace, "-f", str(bad.path))
    assert proc.returncode != 0, f"{bad.path.name} was accepted"
    assert bad.field in proc.stderr, proc.stderr
    assert bad.error in proc.stderr, proc.stderr
    # One mistake per manifest, so each proves one rule. (When a schema rule fails the server
    # adds a note that CEL rules were skipped; that note is not a second mistake.)
    errors = [
        line
        for line in proc.stderr.splitlines()
        if line.startswith("* ") and "some validation rules were not checked" not in line
    ]
    assert len(errors) <= 1, f"{bad.path.name} must carry exactly one mistake: {proc.stderr}"


def test_at_least_twelve_bad_manifests_are_covered() -> None:
    assert len(invalid_manifests()) >= 12


def test_server_applies_the_documented_defaults(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    vm = {
        "apiVersion": c.API_VERSION,
        "kind": "PassthroughVM",
        "metadata": {"name": "defaults"},
        "spec": {
            "memory": "2Gi",
            "devices": [{"name": "gpu", "flavor": "a100"}],
            "networks": [{"name": "net", "flavor": "vf"}],
        },
    }
    got = custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL_PASSTHROUGHVM, vm
    )
    spec = got["spec"]
    assert spec["running"] is True
    assert spec["devices"][0]["count"] == 1 and spec["devices"][0]["optional"] is False
    assert spec["networks"][0] == {
        "name": "net",
        "flavor": "vf",
        "mode": "hostdev",
        "trusted": False,
        "spoofCheck": True,
    }
    model = PassthroughVM.model_validate(got)
    assert model.spec.cpu.cores == 1 and model.spec.cpu.pinning == "auto"


def _device(custom: client.CustomObjectsApi, node: str, address: str) -> dict[str, object]:
    name = f"{node}.{address.replace(':', '-').replace('.', '-')}"
    body = {
        "apiVersion": c.API_VERSION,
        "kind": "PciDevice",
        "metadata": {"name": name, "labels": {c.LABEL_NODE: node, c.LABEL_VENDOR: "10de"}},
        "spec": {"nodeName": node, "address": address},
    }
    return dict(custom.create_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, body))


def test_pcidevice_node_and_address_are_immutable(
    custom: client.CustomObjectsApi, unique: Callable[[str], str]
) -> None:
    node = unique("imm")
    dev = _device(custom, node, "0000:3b:00.0")
    name = dev["metadata"]["name"]  # type: ignore[index]
    for patch, field in (
        ({"spec": {"address": "0000:3b:00.1"}}, "spec.address"),
        ({"spec": {"nodeName": "elsewhere"}}, "spec.nodeName"),
    ):
        with pytest.raises(client.ApiException) as err:
            custom.patch_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name, patch)
        assert err.value.status == 422
        assert field in err.value.body and "is immutable" in err.value.body
    custom.delete_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)


def test_status_is_written_only_through_the_status_subresource(
    custom: client.CustomObjectsApi, unique: Callable[[str], str]
) -> None:
    node = unique("st")
    dev = _device(custom, node, "0000:af:00.0")
    name = dev["metadata"]["name"]  # type: ignore[index]
    custom.patch_cluster_custom_object(
        c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name, {"status": {"driver": "ignored"}}
    )
    got = custom.get_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)
    assert "driver" not in got.get("status", {})
    custom.patch_cluster_custom_object_status(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PCIDEVICE,
        name,
        {"status": {"driver": "vfio-pci", "numaNode": 1}},
    )
    got = custom.get_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)
    assert PciDevice.model_validate(got).status.driver == "vfio-pci"
    custom.delete_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)


@pytest.mark.parametrize(
    ("status", "field"),
    [
        ({"driver": "x" * 1_600_000}, "status.driver"),
        ({"productID": "10\u00e9d"}, "status.productID"),
        ({"vendorID": "0x8086"}, "status.vendorID"),
        ({"classCode": "0300"}, "status.classCode"),
        ({"netdev": "a-very-long-interface-name"}, "status.netdev"),
        ({"iommuGroupPeers": ["3b:00.1"]}, "status.iommuGroupPeers[0]"),
        ({"attributes": {f"k{i}": "v" for i in range(65)}}, "status.attributes"),
        ({"numaNode": -2}, "status.numaNode"),
    ],
)
def test_pcidevice_status_is_bounded_like_the_spec(
    custom: client.CustomObjectsApi,
    unique: Callable[[str], str],
    status: dict[str, object],
    field: str,
) -> None:
    """What a node plugin (or anyone with its rights) writes is checked as strictly as a spec:
    a 1.6 MB driver name used to pass validation and make etcd answer 500."""
    dev = _device(custom, unique("bounds"), "0000:3b:00.0")
    name = dev["metadata"]["name"]  # type: ignore[index]
    try:
        with pytest.raises(client.ApiException) as err:
            custom.patch_cluster_custom_object_status(
                c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name, {"status": status}
            )
        assert err.value.status == 422, err.value.body[:500]
        assert field in err.value.body, err.value.body[:500]
    finally:
        custom.delete_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)


def test_kubectl_get_shows_printer_columns_and_label_selection(
    kube: KubeCluster, custom: client.CustomObjectsApi, unique: Callable[[str], str]
) -> None:
    node = unique("cols")
    name = _device(custom, node, "0000:3b:00.0")["metadata"]["name"]  # type: ignore[index]
    out = _kubectl_retry(kube, "get", "pcidev", "-l", f"{c.LABEL_NODE}={node}")
    header = out.splitlines()[0].split()
    assert header == [
        "NAME",
        "NODE",
        "ADDRESS",
        "VENDOR",
        "PRODUCT",
        "DRIVER",
        "NUMA",
        "CLAIMED-BY",
        "HEALTH",
        "AGE",
    ]
    assert name in out and len(out.splitlines()) == 2
    wide = _kubectl_retry(kube, "get", "pcidev", name, "-o", "wide").splitlines()[0]
    assert "VENDOR-ID" in wide and "IOMMU" in wide
    flavors = _kubectl_retry(kube, "get", "pciflavor").splitlines()
    assert not flavors or flavors[0].split() == ["NAME", "TYPE", "TOTAL", "FREE", "AGE"]
    vms = _kubectl_retry(kube, "get", "ptvm", "-A")
    assert vms == "" or vms.splitlines()[0].split() == [
        "NAMESPACE",
        "NAME",
        "PHASE",
        "NODE",
        "DEVICES",
        "READY",
        "AGE",
    ]


def test_kubectl_get_category_lists_every_kind(kube: KubeCluster) -> None:
    proc = kube.kubectl("api-resources", "--categories", c.CATEGORY, "-o", "name")
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {f"{k.crd_plural}.{c.GROUP}" for k in KINDS}


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("pcidevice.spec.claimRef", "The VM this device is bound to"),
        ("pciflavor.spec.selector.classCodes", "PCI class-code prefixes"),
        ("ptvm.spec.networks.spoofCheck", "MAC spoof checking on the VF"),
        ("ptvm.status.scheduling.message", "0/5 nodes are available"),
    ],
)
def test_kubectl_explain_shows_the_model_docs(kube: KubeCluster, path: str, text: str) -> None:
    out = _kubectl_retry(kube, "explain", path)
    assert text in " ".join(out.split())


def test_every_example_file_is_a_known_kind() -> None:
    kinds = {d["kind"] for _, d in example_docs()}
    assert kinds <= {*MODELS, "Namespace"}
    assert {"PciDevice", "PciFlavor", "PassthroughVM"} <= kinds


EXAMPLE_CATALOGUE = {
    "flavor-gpu-a100.yaml": "a GPU flavor for tenant namespaces, with per-VM and namespace limits",
    "flavor-nic-vf.yaml": "an SR-IOV VF flavor on physnet2 with VLAN and spoof-check permissions",
    "pcidevice-gpu.yaml": "one PciDevice as a node plugin publishes it",
    "lab-devices.yaml": "two hosts' PciDevices: GPUs on two NUMA nodes, an IOMMU companion, VFs",
    "namespace-gpu-tenant.yaml": "a tenant namespace the GPU flavor admits",
    "vm-2gpu.yaml": "a VM with two NUMA-local GPUs",
    "vm-sriov-vlan.yaml": "a VM with an SR-IOV VF on a VLAN with a fixed MAC",
    "vm-too-big.yaml": "a VM no demo host can take (the demo and the refusal tests use it)",
}


def test_every_example_is_catalogued_and_applied_above() -> None:
    """Each example is applied by test_example_applies_and_reads_back_into_the_models (which
    runs over every file in examples/); this list keeps their purpose written down."""
    assert {p.name for p in example_files()} == set(EXAMPLE_CATALOGUE)
