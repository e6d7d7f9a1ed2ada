"""The namespace quota ledger on the real API server: three controllers' ledgers, each with its
own client and its own view, admitting VMs of one namespace at the same instant; the
resourceVersion precondition lets exactly as many through as the limit allows."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from kubernetes import client

from controller.inventory import Inventory
from controller.ledger import QuotaExceeded, QuotaLedger, ledger_name
from pcipt.api.v1alpha1 import PassthroughVM, PciFlavor
from pcipt.kubeclient import Conflict, KubeClient, load_credentials
from tests.integration.conftest import KubeCluster

LIMIT = 3


def _flavor() -> PciFlavor:
    return PciFlavor.model_validate(
        {
            "metadata": {"name": "a100"},
            "spec": {
                "deviceType": "gpu",
                "selector": {"vendorIDs": ["10de"]},
                "limits": {"maxPerNamespace": LIMIT},
            },
        }
    )


def _vm(tenant: str, i: int) -> PassthroughVM:
    return PassthroughVM.model_validate(
        {
            "metadata": {"name": f"vm-{i}", "namespace": tenant, "uid": uuid.uuid4().hex},
            "spec": {"memory": "1Gi", "devices": [{"name": "gpu", "flavor": "a100"}]},
        }
    )


async def _race(kube: KubeCluster, operator_ns: str, tenant: str) -> tuple[int, int, list]:
    """12 VMs, 4 per controller, all acquiring at once."""
    apis = [KubeClient(load_credentials(str(kube.kubeconfig))) for _ in range(3)]
    ledgers = []
    for api in apis:
        inv = Inventory()
        inv.upsert_flavor(_flavor())
        ledgers.append(QuotaLedger(api, operator_ns, inv))
    vms = [_vm(tenant, i) for i in range(12)]

    async def one(i: int) -> bool:
        try:
            await ledgers[i % 3].acquire(vms[i], {"a100": 1}, f"bind-{i}")
            return True
        except QuotaExceeded:
            return False

    try:
        got = await asyncio.gather(*(one(i) for i in range(12)))
        admitted = [vms[i] for i, ok in enumerate(got) if ok]
        # Releasing one makes room for exactly one more, whichever controller asks.
        await ledgers[1].release(tenant, admitted[0].metadata.uid or "")
        again = await asyncio.gather(*(one(i) for i, ok in enumerate(got) if not ok))
        return sum(got), sum(again), admitted
    finally:
        for api in apis:
            await api.close()


def test_three_ledgers_admit_exactly_the_limit(kube: KubeCluster, namespace: str) -> None:
    operator_ns = namespace  # any namespace tenants cannot write will do
    tenant = f"tenant-{uuid.uuid4().hex[:6]}"
    first, second, admitted = asyncio.run(_race(kube, operator_ns, tenant))
    assert (first, second) == (LIMIT, 1)
    cm = client.CoreV1Api(kube.api).read_namespaced_config_map(ledger_name(tenant), operator_ns)
    assert len(cm.data) == LIMIT
    assert admitted[0].metadata.uid not in cm.data
    assert cm.metadata.labels == {"pcipt.io/quota-ledger": "true"}


@pytest.mark.parametrize("held", [0, 2])
def test_claims_without_entries_count_too(kube: KubeCluster, namespace: str, held: int) -> None:
    """VMs bound before the ledger existed have claims but no entry: they still count."""

    async def run() -> bool:
        api = KubeClient(load_credentials(str(kube.kubeconfig)))
        inv = Inventory()
        inv.upsert_flavor(_flavor())
        for k in range(held):
            inv.held["t"][f"old-{k}"] = Counter({"a100": 1})
        try:
            await QuotaLedger(api, namespace, inv).acquire(_vm("t", 0), {"a100": 2}, "b")
            return True
        except QuotaExceeded:
            return False
        finally:
            await api.close()

    assert asyncio.run(run()) is (held == 0)


async def _cpu_race(kube: KubeCluster, operator_ns: str, node: str) -> list[bool]:
    """Three controllers' compute ledgers, each sure the same two host CPUs are free, write
    them down for three different VMs at once."""
    from controller.ledger import ComputeLedger
    from pcipt.api.v1alpha1 import ComputeStatus
    from pcipt.compute import NodeCompute, NumaCompute

    topo = NodeCompute({0: NumaCompute((0, 1, 2, 3), ((0, 2), (1, 3)), 8192)})
    take = ComputeStatus.model_validate(
        {
            "policy": "dedicated",
            "vcpus": 2,
            "memoryMiB": 1024,
            "numa": [{"node": 0, "vcpus": [0, 1], "cpus": [0, 2], "memoryMiB": 1024}],
        }
    )
    apis = [KubeClient(load_credentials(str(kube.kubeconfig))) for _ in range(3)]
    ledgers = []
    for api in apis:
        inv = Inventory()
        inv.set_compute(node, topo)
        ledgers.append(ComputeLedger(api, operator_ns, inv))

    async def one(i: int) -> bool:
        try:
            await ledgers[i].acquire(_vm("t", i), node, take, f"bind-{i}")
            return True
        except Conflict:  # another controller took the CPUs first
            return False

    try:
        return list(await asyncio.gather(*(one(i) for i in range(3))))
    finally:
        for api in apis:
            await api.close()


def test_three_compute_ledgers_give_a_host_cpu_to_one_vm(kube: KubeCluster, namespace: str) -> None:
    node = f"node-{uuid.uuid4().hex[:6]}"
    got = asyncio.run(_cpu_race(kube, namespace, node))
    assert sorted(got) == [False, False, True]
    cm = client.CoreV1Api(kube.api).read_namespaced_config_map(f"pcipt-compute.{node}", namespace)
    assert len(cm.data) == 1
