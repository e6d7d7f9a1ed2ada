"""List, then watch, a collection, keeping a local copy current and calling back on each change.

After a watch error (410 Gone, a dropped connection, the API server restarting) it lists again
and reports what changed meanwhile, objects deleted included, so callers never lose an event
that matters; it backs off while the server is away. The node plugin watches through it, and
so does the controller for its busy kinds (devices and VMs: three events a bind), where kopf's
per-event machinery cost a fifth of its CPU; with `keep=False` it holds only each object's
identity and version, as the caller keeps its own copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pcipt.backoff import Backoff, Health
from pcipt.kubeclient import KubeClient

log = logging.getLogger("pcipt.informer")

Handler = Callable[[str, dict[str, Any]], None]


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


def _stub(obj: dict[str, Any]) -> dict[str, Any]:
    """What a lean informer keeps of an object: enough to report its deletion."""
    meta = obj.get("metadata", {})
    return {
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta
        }
    }


def _older(obj: dict[str, Any], than: dict[str, Any] | None) -> bool:
    """Whether obj is an older version than the one held. resourceVersions are opaque in
    general; kube-apiserver's are etcd revisions, so decimal ones are compared, any other
    pair counts as not older."""
    if than is None:
        return False
    a = obj.get("metadata", {}).get("resourceVersion", "")
    b = than.get("metadata", {}).get("resourceVersion", "")
    return a.isdecimal() and b.isdecimal() and int(a) < int(b)


class Informer:
    def __init__(
        self,
        api: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        on_event: Handler | None = None,
        name: str = "",
        keep: bool = True,
    ) -> None:
        """keep=False: `items` holds stubs (name, namespace, uid, resourceVersion), for a
        caller that keeps its own copy of the objects; a deletion found by a relist is
        reported with the stub."""
        self.api = api
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.on_event = on_event or (lambda _t, _o: None)
        self.name = name or path
        self._keep = (lambda o: o) if keep else _stub
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        try:
            self.on_event(kind, obj)
        except Exception:
            log.exception("handler failed informer=%s event=%s", self.name, kind)

    async def relist(self) -> str:
        got = await self.api.list(
            self.path, label_selector=self.label_selector, field_selector=self.field_selector
        )
        fresh = {object_key(o): o for o in got.get("items", [])}
        for key, gone in list(self.items.items()):
            if key not in fresh:
                del self.items[key]
                self._emit("DELETED", gone)
        for key, obj in fresh.items():
            prev = self.items.get(key)
            rv = obj["metadata"].get("resourceVersion")
            if prev is None or prev.get("metadata", {}).get("resourceVersion") != rv:
                self.items[key] = self._keep(obj)
                self._emit("ADDED" if prev is None else "MODIFIED", obj)
        self.synced.set()
        return str(got.get("metadata", {}).get("resourceVersion", ""))

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """Record an object we wrote ourselves, before the watch brings it back.

        The answer to our write can arrive after the watch delivered a later change by someone
        else (the controller's claim on a device we had just published): the older copy is
        dropped then, or the later change would be lost until the next relist."""
        key = object_key(obj)
        if kind == "DELETED":
            if self.items.pop(key, None) is not None:
                self._emit("DELETED", obj)
            return
        if _older(obj, self.items.get(key)):
            return
        self.items[key] = self._keep(obj)
        self._emit(kind, obj)

    async def run(self, resume_from: str = "") -> None:
        """Keep the copy current until cancelled; from resume_from (a resourceVersion seen
        before) when given, else from a fresh list."""
        backoff = Backoff(base=0.5, cap=10.0)
        health = Health(log, f"watch of {self.name}")
        rv = resume_from
        while True:
            try:
                if not rv:
                    rv = await self.relist()
                    backoff.reset()
                    health.ok()
                async for ev in self.api.watch(
                    self.path,
                    resource_version=rv,
                    label_selector=self.label_selector,
                    field_selector=self.field_selector,
                ):
                    kind, obj = ev.get("type", ""), ev.get("object", {})
                    if kind == "ERROR":
                        rv = ""  # usually 410 Gone: our resourceVersion is too old
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if kind == "BOOKMARK":
                        continue
                    key = object_key(obj)
                    if kind == "DELETED":
                        self.items.pop(key, None)
                    else:
                        self.items[key] = self._keep(obj)
                    self._emit(kind, obj)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = backoff.next()
                health.failed(e, delay)
                rv = ""
                await asyncio.sleep(delay)
