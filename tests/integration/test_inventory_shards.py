"""`kubectl pcipt inventory` on a large cluster splits the device listing by node between
processes; against the real API server, the split counts exactly what one listing counts,
devices on nodes without a Lease and devices without the node label included."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from pcipt import constants as c
from pcipt.cli import kubectl_pcipt
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import LeaseKeeper, World

pytestmark = pytest.mark.integration


def _inventory(
    kube: KubeCluster, operator_namespace: str, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, Any]]:
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
        ]
    )
    assert rc == 0
    return list(json.loads(capsys.readouterr().out)["items"])


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
