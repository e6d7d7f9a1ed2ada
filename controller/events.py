"""Kubernetes Events for transitions (bind, refusal, release, repairs), posted in the
background so that they never add latency to a bind, and never more than one per transition."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from pcipt import constants as c
from pcipt.kubeclient import ApiError, KubeClient

log = logging.getLogger("pcipt.controller.events")


class EventRecorder:
    def __init__(
        self, api: KubeClient, namespace: str, component: str = "pcipt-controller"
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.component = component
        self._tasks: set[asyncio.Task[None]] = set()
        self.posted = 0

    def record(self, obj: dict[str, Any] | Any, type_: str, reason: str, message: str) -> None:
        """Post an Event about obj (a raw object or a model with metadata) without waiting."""
        raw = obj if isinstance(obj, dict) else obj.model_dump(by_alias=True, mode="json")
        meta = raw.get("metadata", {})
        ns = meta.get("namespace") or self.namespace
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'pcipt')}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": raw.get("apiVersion") or c.API_VERSION,
                "kind": raw.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": self.component},
            "reportingComponent": self.component,
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
        except (ApiError, OSError, TimeoutError) as e:
            log.warning("event not posted reason=%s: %s", body.get("reason"), e)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
