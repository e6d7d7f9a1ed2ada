"""Kubernetes Events for transitions (bind, refusal, release, repairs, device faults), posted in
the background so that they never add latency to the work they describe.

Both programs post through this one recorder. An Event lives in its object's namespace; one
about a cluster-scoped object (a PciDevice, a Node) goes to `default`, the only namespace the
API server accepts for it besides none. A post that fails is logged and dropped: an Event is
never worth a retry storm, and nothing reads them back to decide.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from pcipt import clock
from pcipt import constants as c
from pcipt.kubeclient import ApiError, KubeClient

log = logging.getLogger("pcipt.events")

CLUSTER_SCOPED_EVENTS_NAMESPACE = "default"


class EventRecorder:
    def __init__(self, api: KubeClient, component: str, host: str | None = None) -> None:
        self.api = api
        self.component = component
        self.host = host
        self._tasks: set[asyncio.Task[None]] = set()
        self.posted = 0
        self.failed = 0

    def record(self, obj: dict[str, Any] | Any, type_: str, reason: str, message: str) -> None:
        """Post an Event about obj (a raw object, a model with metadata, or an object
        reference with apiVersion, kind, name and optionally namespace/uid) without waiting."""
        raw = obj if isinstance(obj, dict) else obj.model_dump(by_alias=True, mode="json")
        meta = raw.get("metadata") or {k: raw.get(k) for k in ("name", "namespace", "uid")}
        ns = meta.get("namespace") or CLUSTER_SCOPED_EVENTS_NAMESPACE
        now = clock.timestamp()
        source: dict[str, str] = {"component": self.component}
        if self.host:
            source["host"] = self.host
        involved = {
            "apiVersion": raw.get("apiVersion") or c.API_VERSION,
            "kind": raw.get("kind"),
            "name": meta.get("name"),
        }
        for k in ("namespace", "uid"):
            if meta.get(k):
                involved[k] = meta[k]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name') or 'pcipt'}.", "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": source,
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        task = asyncio.get_running_loop().create_task(self._post(ns, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, ns: str, body: dict[str, Any]) -> None:
        try:
            await self.api.create(f"/api/v1/namespaces/{ns}/events", body)
            self.posted += 1
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            self.failed += 1
            log.warning("event not posted reason=%s: %s", body.get("reason"), e)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
