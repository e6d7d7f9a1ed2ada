"""Every kind of Event the components post is accepted by the real API server and can be read
back where `kubectl describe` looks for it: a namespaced object's in its namespace, a
cluster-scoped object's (PciDevice, Node) in `default`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from kubernetes import client

from pcipt import constants as c
from pcipt.events import EventRecorder
from pcipt.kubeclient import KubeClient, load_credentials
from tests.integration.conftest import KubeCluster

pytestmark = pytest.mark.integration


def test_events_about_namespaced_and_cluster_scoped_objects_are_accepted(
    kube: KubeCluster, namespace: str, unique: Callable[[str], str]
) -> None:
    device = unique("node-x.0000-3b-00-0")
    node = unique("node")
    vm = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_PASSTHROUGHVM,
        "metadata": {"name": "vm1", "namespace": namespace, "uid": "u-1"},
    }

    async def post() -> EventRecorder:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            for component, host in (("pcipt-controller", None), ("pcipt-nodeplugin", node)):
                rec = EventRecorder(api, component, host=host)
                rec.record(vm, "Normal", c.REASON_SCHEDULED, "placed")
                rec.record(
                    {"apiVersion": c.API_VERSION, "kind": c.KIND_PCIDEVICE, "name": device},
                    "Normal",
                    c.REASON_ORPHAN_RELEASED,
                    "released claim of a/b: its VM is gone",
                )
                rec.record(
                    {"apiVersion": "v1", "kind": "Node", "name": node},
                    "Warning",
                    "DeviceSpecInvalid",
                    "x" * 5000,  # too long for a message: cut, not refused
                )
                await rec.drain()
                assert (rec.posted, rec.failed) == (3, 0), component
        return rec

    asyncio.run(post())
    core = client.CoreV1Api(kube.api)
    in_ns = core.list_namespaced_event(namespace).items
    assert sorted(e.source.component for e in in_ns if e.involved_object.name == "vm1") == [
        "pcipt-controller",
        "pcipt-nodeplugin",
    ]
    default = core.list_namespaced_event("default").items
    about_device = [e for e in default if e.involved_object.name == device]
    assert [e.reason for e in about_device] == [c.REASON_ORPHAN_RELEASED] * 2
    assert all(e.involved_object.kind == c.KIND_PCIDEVICE for e in about_device)
    about_node = [e for e in default if e.involved_object.name == node]
    assert len(about_node) == 2 and all(len(e.message) == 1024 for e in about_node)


def test_repeats_bump_one_event_and_a_flood_of_messages_folds_into_one(
    kube: KubeCluster, namespace: str
) -> None:
    """client-go's correlation against the real API server: the same refusal five times is one
    Event with count 5; twelve different messages about one object are ten Events and one
    "(combined from similar events)" counted twice; 30 identical posts are cut at the bucket."""
    vm = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_PASSTHROUGHVM,
        "metadata": {"name": "busy", "namespace": namespace, "uid": "u-2"},
    }
    flood = {**vm, "metadata": {**vm["metadata"], "name": "flood", "uid": "u-3"}}
    spam = {**vm, "metadata": {**vm["metadata"], "name": "spam", "uid": "u-4"}}

    async def post() -> EventRecorder:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            rec = EventRecorder(api, "pcipt-controller")
            for _ in range(5):
                rec.record(vm, "Warning", c.REASON_FAILED_SCHEDULING, "no free a100")
                await rec.drain()
            for i in range(12):
                rec.record(flood, "Warning", c.REASON_FAILED_SCHEDULING, f"try {i}")
                await rec.drain()
            for _ in range(30):
                rec.record(spam, "Normal", c.REASON_RELEASED, "same")
            await rec.drain()
            return rec

    rec = asyncio.run(post())
    assert rec.failed == 0 and rec.correlator.suppressed == 5
    events = client.CoreV1Api(kube.api).list_namespaced_event(namespace).items
    about = {
        n: sorted((e.message, e.count) for e in events if e.involved_object.name == n)
        for n in ("busy", "flood", "spam")
    }
    assert about["busy"] == [("no free a100", 5)]
    assert about["flood"] == sorted(
        [(f"try {i}", 1) for i in range(10)] + [("(combined from similar events): try 11", 2)]
    )
    (spam_event,) = about["spam"]
    assert spam_event == ("same", 25)
