"""`kubectl pcipt inventory` on a large cluster: it reads the controller's published counts,
and when it counts every device itself (--recount, or counts it cannot use) it splits the
listing by node between processes. Against the real API server: the split counts exactly what
one listing counts, devices on nodes without a Lease and devices without the node label
included; a real controller's counts are what a recount finds, and follow a claim."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import controller.invsummary
from controller.inventory import Inventory
from controller.invsummary import InventorySummaryWriter
from pcipt import clock, invsummary
from pcipt import constants as c
from pcipt.api.v1alpha1 import PciDevice, PciFlavor, pcidevice_name
from pcipt.cli import kubectl_pcipt
from pcipt.kubeclient import KubeClient, load_credentials
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import ControllerProcess, LeaseKeeper, World, wait_for

pytestmark = pytest.mark.integration


def _inventory_doc(
    kube: KubeCluster, operator_namespace: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> dict[str, Any]:
    capsys.readouterr()
    rc = kubectl_pcipt.main(
        [
            "--kubeconfig",
            str(kube.kubeconfig),
            "--operator-namespace",
            operator_namespace,
            "inventory",
            "-o",
            "json",
            *extra,
        ]
    )
    assert rc == 0
    return dict(json.loads(capsys.readouterr().out))


def _inventory(
    kube: KubeCluster, operator_namespace: str, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, Any]]:
    return list(_inventory_doc(kube, operator_namespace, capsys)["items"])


def test_the_sharded_listing_counts_what_one_listing_counts(
    kube: KubeCluster,
    *,
    world: World,
    operator_namespace: str,
    leases: Callable[..., LeaseKeeper],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flavor = world.flavor("shard")
    attrs = {"test": world.test_id}
    with_lease = ("s1", "s2", "s3")
    leases(*(world.node(n) for n in with_lease))
    for n in with_lease:
        world.device(n, "0000:10:00.0", attributes=attrs)
        world.device(n, "0000:11:00.0", attributes=attrs, unschedulable=True)
        world.device(n, "0000:12:00.0", attributes=attrs, health="Unhealthy")
    lost = world.device("s-gone", "0000:10:00.0", attributes=attrs)  # no Lease: not alive
    unlabelled = world.device("s-gone", "0000:11:00.0", attributes=attrs)
    client.CustomObjectsApi(kube.api).patch_cluster_custom_object(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PCIDEVICE,
        unlabelled,
        {"metadata": {"labels": {c.LABEL_NODE: None}}},
    )

    monkeypatch.setattr(kubectl_pcipt, "SHARD_ABOVE", 10**9)
    whole = _inventory(kube, operator_namespace, capsys)

    split: list[list[str] | None] = []
    real = kubectl_pcipt._shard_selectors

    def spy(nodes: list[str], shards: int) -> list[str] | None:
        got = real(nodes, max(shards, 3))
        split.append(got)
        return got

    monkeypatch.setattr(kubectl_pcipt, "SHARD_ABOVE", 0)
    monkeypatch.setattr(kubectl_pcipt, "_shard_selectors", spy)
    sharded = _inventory(kube, operator_namespace, capsys)
    assert split and split[0] is not None and len(split[0]) == 3, split

    assert sharded == whole
    mine = {r["node"]: r for r in whole if r["flavor"] == flavor}
    for n in map(world.node, with_lease):
        assert mine[n]["total"] == 3 and mine[n]["free"] == 1, mine[n]
        assert mine[n]["cordoned"] == 1 and mine[n]["unhealthy"] == 1 and mine[n]["alive"]
    gone = mine[lost.split(".")[0]]
    assert gone["total"] == 2 and gone["node-not-alive"] == 2 and not gone["alive"]


def test_past_the_threshold_inventory_reads_the_controllers_counts_which_a_recount_confirms(
    kube: KubeCluster,
    *,
    world: World,
    operator_namespace: str,
    leases: Callable[..., LeaseKeeper],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    flavor = world.flavor("summary")
    attrs = {"test": world.test_id}
    nodes = (world.node("m1"), world.node("m2"))
    leases(*nodes)
    for n in ("m1", "m2"):
        world.device(n, "0000:10:00.0", attributes=attrs)
        world.device(n, "0000:11:00.0", attributes=attrs, unschedulable=True)
    monkeypatch.setattr(kubectl_pcipt, "SUMMARY_ABOVE", 0)

    def agreed(allocated: int) -> list[dict[str, Any]] | None:
        """The controller's counts of these nodes, once a recount finds the same."""
        got = _inventory_doc(kube, operator_namespace, capsys)
        again = _inventory_doc(kube, operator_namespace, capsys, "--recount")
        assert again["countedBy"] == "kubectl-pcipt"
        mine = [r for r in got["items"] if r["node"] in nodes]
        if got["countedBy"] != "controller" or mine != [
            r for r in again["items"] if r["node"] in nodes
        ]:
            return None
        return mine if sum(r["allocated"] for r in mine) == allocated else None

    ctl = ControllerProcess(kube.kubeconfig, tmp_path).start()
    try:
        rows = wait_for(lambda: agreed(0), 30, interval=0.5, what="the controller's counts")
        assert [(r["node"], r["flavor"]) for r in rows] == [(n, flavor) for n in nodes]
        for r in rows:
            assert (r["total"], r["free"], r["cordoned"], r["alive"]) == (2, 1, 1, True), r

        world.vm("vm1", [{"name": "gpu", "flavor": flavor}])
        rows = wait_for(lambda: agreed(1), 30, interval=0.5, what="the claim counted")
        assert sum(r["free"] for r in rows) == 1
        cms = client.CoreV1Api(kube.api).list_namespaced_config_map(
            operator_namespace, label_selector="pcipt.io/inventory-summary=true"
        )
        names = sorted(cm.metadata.name for cm in cms.items)
        assert names == ["pcipt-inventory", "pcipt-inventory-0"], names
    finally:
        ctl.stop()


def _published(kube: KubeCluster, namespace: str) -> dict[str, dict[str, Any]]:
    cms = client.CoreV1Api(kube.api).list_namespaced_config_map(
        namespace, label_selector=f"{invsummary.LABEL}=true"
    )
    return {cm.metadata.name: json.loads(cm.data[invsummary.KEY]) for cm in cms.items}


def test_the_published_counts_are_written_in_parts_emptied_when_fewer_and_renewed(
    kube: KubeCluster, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer against the real API server: parts, the index last, parts a smaller count
    no longer needs emptied (the controller may not delete ConfigMaps), the index renewed
    while nothing moves; what a reader decodes is what was counted."""
    monkeypatch.setattr(invsummary, "ROWS_PER_PART", 2)
    now = time.time()
    inv = Inventory(node_dead_after=40.0, clock=lambda: now)
    inv.upsert_flavor(
        PciFlavor.model_validate(
            {
                "apiVersion": c.API_VERSION,
                "kind": "PciFlavor",
                "metadata": {"name": "gpu", "generation": 1},
                "spec": {"deviceType": "gpu", "selector": {"vendorIDs": ["10de"]}},
            }
        )
    )
    names = []
    for n in range(5):
        inv.renew_lease(f"w{n}", now)
        for addr in ("0000:10:00.0", "0000:11:00.0"):
            dev = PciDevice.model_validate(
                {
                    "apiVersion": c.API_VERSION,
                    "kind": "PciDevice",
                    "metadata": {"name": pcidevice_name(f"w{n}", addr), "resourceVersion": "1"},
                    "spec": {"nodeName": f"w{n}", "address": addr},
                    "status": {"vendorID": "10de", "productID": "20b0", "health": "Healthy"},
                }
            )
            inv.upsert_device(dev)
            names.append(dev.metadata.name)

    def read() -> invsummary.Summary:
        cms = client.CoreV1Api(kube.api).list_namespaced_config_map(
            namespace, label_selector=f"{invsummary.LABEL}=true"
        )
        raw = [{"metadata": {"name": cm.metadata.name}, "data": cm.data} for cm in cms.items]
        return invsummary.decode(raw, {"gpu": 1}, clock.now(), max_age=45)

    async def scenario() -> None:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            writer = InventorySummaryWriter(api, inv, namespace)
            await writer.write()
            got = _published(kube, namespace)
            # A row per node (one flavor), two rows a part: three parts.
            assert sorted(got) == ["pcipt-inventory", *(f"pcipt-inventory-{i}" for i in range(3))]
            assert got["pcipt-inventory"]["parts"] == 3
            assert read().rows == writer.count()[0]
            assert read().rows[("w3", "gpu")] == Counter(total=2, free=2)

            for name in names[2:]:  # one node left
                inv.delete_device(name)
            await writer.write()
            got = _published(kube, namespace)
            assert got["pcipt-inventory"]["parts"] == 1
            assert all(got[f"pcipt-inventory-{i}"]["nodes"] == {} for i in (1, 2))
            assert read().rows == {("w0", "gpu"): Counter(total=2, free=2)}
            stamp = got["pcipt-inventory"]["stamp"]
            checked = got["pcipt-inventory"]["checkedAt"]

            await writer.write()  # nothing moved, renewal not due: no write
            assert _published(kube, namespace)["pcipt-inventory"]["checkedAt"] == checked
            monkeypatch.setattr(controller.invsummary, "HEARTBEAT", 0.0)
            await writer.write()
            index = _published(kube, namespace)["pcipt-inventory"]
            assert index["stamp"] == stamp and index["checkedAt"] > checked

            # A restarted controller learns the parts left and writes over them.
            again = InventorySummaryWriter(api, inv, namespace)
            await again.write()
            assert read().rows == {("w0", "gpu"): Counter(total=2, free=2)}

    asyncio.run(scenario())
