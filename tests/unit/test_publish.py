"""What the node plugin writes after a rescan: nothing when nothing changed; a gone or no longer
offered device is deleted when free, and marked (Missing / Unhealthy) while a VM holds it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from nodeplugin.devicespec import decide, load_specs
from nodeplugin.discovery import HostInventory, discover
from nodeplugin.pciids import parse
from nodeplugin.publish import Desired, desired_devices, plan
from pcipt import constants as c
from tests.unit.hosts import build_lab

CONFIG = "devices: [{name: gpu, match: {vendorID: '10de'}, attributes: {tier: gold}}]"
IDS = parse("10de  NVIDIA Corporation\n\t20b0  GA100 [A100 SXM4 40GB]\n")


@pytest.fixture
def host(tmp_path: Path) -> HostInventory:
    build_lab(tmp_path / "sys")
    return discover(tmp_path / "sys")


def desired(host: HostInventory, config: str = CONFIG) -> dict[str, Desired]:
    return desired_devices("node-a", host, decide(load_specs(config), host, {}), IDS)


def stored(want: dict[str, Desired], claimed: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """What the API server would hold after applying `want` (with times and claims added)."""
    out = {}
    for name, d in want.items():
        status = copy.deepcopy(d.status)
        for cond in status["conditions"]:
            cond["lastTransitionTime"] = "2026-01-01T00:00:00Z"
        spec: dict[str, Any] = dict(d.spec)
        if name in claimed:
            spec["claimRef"] = {"namespace": "t", "name": "vm", "uid": "u", "request": "gpu"}
        out[name] = {
            "metadata": {"name": name, "labels": dict(d.labels), "resourceVersion": "7"},
            "spec": spec,
            "status": status,
        }
    return out


def test_objects_are_named_and_labelled_for_kubectl(host: HostInventory) -> None:
    want = desired(host)
    gpu = want["node-a.0000-3b-00-0"]
    assert gpu.labels == {
        c.LABEL_NODE: "node-a",
        c.LABEL_VENDOR: "10de",
        c.LABEL_PRODUCT: "20b0",
        c.LABEL_CLASS: "030200",
    }
    assert gpu.spec == {"nodeName": "node-a", "address": "0000:3b:00.0"}
    st = gpu.status
    assert (st["vendorName"], st["productName"], st["driver"], st["numaNode"]) == (
        "NVIDIA Corporation",
        "GA100 [A100 SXM4 40GB]",
        "nvidia",
        0,
    )
    assert st["iommuGroup"] == 7 and st["iommuGroupPeers"] == ["0000:3b:00.1"]
    assert st["attributes"] == {"tier": "gold"} and st["health"] == "Healthy"
    assert set(want) == {"node-a.0000-3b-00-0", "node-a.0000-3b-00-1"}


def test_first_publish_creates_spec_and_status(host: HostInventory) -> None:
    p = plan(desired(host), {}, set())
    assert len(p.apply_spec) == len(p.apply_status) == 2 and p.writes == 4


def test_a_rescan_with_nothing_changed_writes_nothing(host: HostInventory) -> None:
    want = desired(host)
    assert plan(want, stored(want), set(want)).writes == 0


def test_a_changed_fact_rewrites_only_status(host: HostInventory) -> None:
    want = desired(host)
    have = stored(want)
    have["node-a.0000-3b-00-0"]["status"]["driver"] = "vfio-pci"
    p = plan(want, have, set(want))
    assert [d.name for d in p.apply_status] == ["node-a.0000-3b-00-0"] and not p.apply_spec


def test_a_field_no_longer_set_is_removed(host: HostInventory) -> None:
    want = desired(host)
    have = stored(want)
    have["node-a.0000-3b-00-0"]["status"]["physicalNetwork"] = "physnet9"
    assert [d.name for d in plan(want, have, set(want)).apply_status] == ["node-a.0000-3b-00-0"]


def test_a_vanished_free_device_is_deleted_with_a_precondition(host: HostInventory) -> None:
    want = desired(host)
    have = stored(want)
    del want["node-a.0000-3b-00-1"]
    p = plan(want, have, {"node-a.0000-3b-00-0"})
    assert p.delete == [("node-a.0000-3b-00-1", "7")] and p.writes == 1


def test_a_vanished_held_device_is_marked_missing_not_deleted(host: HostInventory) -> None:
    want = desired(host)
    have = stored(want, claimed={"node-a.0000-3b-00-1"})
    del want["node-a.0000-3b-00-1"]
    p = plan(want, have, {"node-a.0000-3b-00-0"})
    assert not p.delete and [(n, h, r) for n, h, r, _ in p.mark] == [
        ("node-a.0000-3b-00-1", "Missing", "NotFound")
    ]


def test_a_config_edit_never_unpublishes_a_held_device(host: HostInventory) -> None:
    want = desired(host)
    have = stored(want, claimed={"node-a.0000-3b-00-0"})
    narrowed = desired(host, "devices: [{match: {vendorID: '10de', productID: '1aef'}}]")
    p = plan(narrowed, have, set(want))
    assert not p.delete
    assert [(n, h, r) for n, h, r, _ in p.mark] == [
        ("node-a.0000-3b-00-0", "Unhealthy", "NotInDeviceSpec")
    ]


def test_no_iommu_group_is_unhealthy_with_advice(tmp_path: Path) -> None:
    from nodeplugin.simulate import build_host, load_profile

    (h,) = load_profile(
        "hosts: {h: {devices: [{address: '0000:01:00.0', vendor: '10de', device: '20b0', class: '030200'}]}}"
    )
    build_host(tmp_path / "s", h)
    inv = discover(tmp_path / "s")
    st = desired_devices("h", inv, decide(load_specs(CONFIG), inv, {}), IDS)[
        "h.0000-01-00-0"
    ].status
    assert st["health"] == "Unhealthy" and "enable the IOMMU" in st["conditions"][0]["message"]


def test_managed_false_is_healthy_only_on_vfio_pci_or_a_variant(tmp_path: Path) -> None:

    tree = build_lab(tmp_path / "sys")
    config = "devices: [{name: gpu, match: {vendorID: '10de', productID: '20b0'}, managed: false}]"

    def status() -> dict[str, Any]:
        inv = discover(tmp_path / "sys")
        return desired_devices("node-a", inv, decide(load_specs(config), inv, {}), IDS)[
            "node-a.0000-3b-00-0"
        ].status

    st = status()
    assert st["health"] == "Unhealthy" and st["conditions"][0]["reason"] == "NotBoundToVfio"
    assert "it is on nvidia" in st["conditions"][0]["message"]
    assert st["attributes"] == {"managed": "false"}
    for drv in ("vfio-pci", "nvgrace_gpu_vfio_pci"):
        tree.unbind("0000:3b:00.0")
        tree.bind("0000:3b:00.0", drv)
        assert status()["health"] == "Healthy", drv
