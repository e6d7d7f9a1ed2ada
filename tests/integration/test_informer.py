"""The node plugin's informer against the real API server: the local copy follows every change,
an answer to our own write never replaces a later change by someone else, and a watch that can
no longer resume (410 Gone) lists again and reports what changed meanwhile, deletions included."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pcipt.devcluster import LocalCluster
from pcipt.informer import Informer
from pcipt.kubeclient import ApiError, KubeClient, load_credentials
from tests.integration.conftest import KubeCluster

pytestmark = pytest.mark.integration


def _run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def _until(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _cm(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"v": value},
    }


def _rv(obj: dict[str, Any] | None) -> str:
    return "" if obj is None else str(obj["metadata"]["resourceVersion"])


def test_the_answer_to_our_own_write_never_hides_a_later_change(
    kube: KubeCluster, namespace: str
) -> None:
    """The agent publishes a device and records the answer; the controller's claim, written just
    after, may come down the watch before that answer is recorded. The older copy is dropped."""
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    async def scenario() -> None:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            inf = Informer(api, path)
            task = asyncio.create_task(inf.run())
            try:
                await inf.synced.wait()
                ours = await api.create(path, _cm("dev", "published"))
                theirs = await api.replace(f"{path}/dev", {**ours, "data": {"v": "claimed"}})
                key = f"{namespace}/dev"
                await _until(lambda: _rv(inf.items.get(key)) == _rv(theirs), "the watch")
                inf.apply("MODIFIED", ours)  # our answer, late
                assert inf.items[key]["data"] == {"v": "claimed"}
                # A newer answer of ours is still taken at once.
                newer = await api.replace(f"{path}/dev", {**theirs, "data": {"v": "again"}})
                inf.apply("MODIFIED", newer)
                assert inf.items[key]["data"] == {"v": "again"}
            finally:
                task.cancel()

    _run(scenario())


def test_across_an_api_server_restart_it_resumes_or_lists_again(tmp_path: Path) -> None:
    """A running informer rides out the API server going away and sees what is created once it
    is back. One whose resourceVersion the restarted server can no longer serve (etcd compacted
    meanwhile: 410 Gone) lists again and reports every change it missed, deletions included."""
    cluster = LocalCluster(tmp_path / "cp")
    cluster.up()
    path = "/api/v1/namespaces/default/configmaps"
    try:

        async def scenario() -> None:
            async with KubeClient(load_credentials(str(cluster.kubeconfig))) as api:
                running = Informer(api, path)
                task = asyncio.create_task(running.run())
                await running.synced.wait()
                await asyncio.to_thread(cluster.stop_apiserver)
                await asyncio.sleep(1)
                await asyncio.to_thread(cluster.start_apiserver)
                await api.create(path, _cm("after", "1"))
                await _until(lambda: "default/after" in running.items, "the restarted watch")
                task.cancel()

                for name in ("keep", "change", "drop"):
                    await api.create(path, _cm(name, "1"))
                seen: list[tuple[str, str]] = []
                away = Informer(
                    api, path, on_event=lambda k, o: seen.append((k, o["metadata"]["name"]))
                )
                last = await away.relist()
                seen.clear()
                # What happens while it is away.
                await api.delete(f"{path}/drop")
                changed = await api.get(f"{path}/change")
                await api.replace(f"{path}/change", {**changed, "data": {"v": "2"}})
                await api.create(path, _cm("new", "1"))
                await asyncio.to_thread(_compact_etcd, cluster)
                await asyncio.to_thread(cluster.stop_apiserver)
                await asyncio.to_thread(cluster.start_apiserver)
                gone: list[int] = []
                try:
                    async for ev in api.watch(path, resource_version=last, timeout=5):
                        if ev.get("type") == "ERROR":
                            gone.append(int(ev["object"].get("code", 0)))
                            break
                except ApiError as e:
                    gone.append(e.status)
                assert gone == [410], f"the server resumed a watch from {last}: {gone}"

                task = asyncio.create_task(away.run(resume_from=last))
                try:
                    await _until(
                        lambda: (
                            {("DELETED", "drop"), ("MODIFIED", "change"), ("ADDED", "new")}
                            <= set(seen)
                        ),
                        "the list after 410",
                    )
                    assert not [e for e in seen if e[1] == "keep"], seen
                    assert sorted(k.split("/")[1] for k in away.items) == [
                        "after",
                        "change",
                        "keep",
                        "new",
                    ]
                finally:
                    task.cancel()

        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        cluster.down()


def _compact_etcd(cluster: LocalCluster) -> None:
    """Compact etcd's history up to now through its HTTP gateway, as kube-apiserver has etcd
    do every five minutes."""
    st = cluster.state()
    assert st is not None

    def call(api: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{st.etcd_url}/v3/{api}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    revision = int(call("kv/range", {"key": "Lw=="})["header"]["revision"])
    call("kv/compaction", {"revision": revision, "physical": True})


def test_a_lean_informer_keeps_stubs_and_reports_what_a_relist_finds_gone(
    kube: KubeCluster, namespace: str
) -> None:
    """The controller's informers (keep=False) hold only names, uids and versions; a relist
    (after 410, or on resuming leadership) reports only what changed, and a deletion with the
    uid the controller forgets the VM by."""
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    async def scenario() -> None:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            seen: list[tuple[str, str, str]] = []
            inf = Informer(
                api,
                path,
                keep=False,
                on_event=lambda k, o: seen.append(
                    (k, o["metadata"]["name"], o["metadata"].get("uid", ""))
                ),
            )
            kept = await api.create(path, _cm("kept", "1"))
            gone = await api.create(path, _cm("gone", "1"))
            await inf.relist()
            assert {(k, n) for k, n, _ in seen} == {("ADDED", "kept"), ("ADDED", "gone")}
            assert inf.items[f"{namespace}/kept"] == {
                "metadata": {
                    k: kept["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")
                }
            }
            seen.clear()
            await api.delete(f"{path}/gone")
            await api.replace(f"{path}/kept", {**kept, "data": {"v": "2"}})
            await inf.relist()
            assert sorted(seen) == [
                ("DELETED", "gone", gone["metadata"]["uid"]),
                ("MODIFIED", "kept", kept["metadata"]["uid"]),
            ]
            seen.clear()
            await inf.relist()  # nothing changed: nothing reported
            assert seen == []

    _run(scenario())
