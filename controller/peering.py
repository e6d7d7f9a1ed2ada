"""Which replica acts, with kopf peering: the runtime's own loops (scheduling, releases, audit,
flavor counts) run only while kopf would run this operator's handlers.

kopf pauses an operator when a live peer in the ClusterKopfPeering object has a higher
priority, or the same one (then every tied operator pauses), but it does not tell background
tasks. This gate reads the same object with the same identity and priority and makes the
same decision, so the runtime pauses and resumes with kopf. Safety never depends on it: every
write is conditional, and the audit re-reads before it repairs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.peering")
PEERING_PATH = "/apis/kopf.dev/v1/clusterkopfpeerings"


async def ensure_peering_object(api: KubeClient, name: str) -> bool:
    """Create the ClusterKopfPeering object if it is missing (kopf only patches it, and stays
    paused without one). The chart cannot create it: its CRD may come in the same release.
    True when this call created it."""
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    try:
        await api.create(PEERING_PATH, body)
    except Conflict:
        return False
    except NotFound as e:
        raise ApiError(
            404,
            "NotFound",
            "the ClusterKopfPeering CRD (kopf.dev) is not installed: apply "
            "crds/kopf.dev_clusterkopfpeerings.yaml, or install the chart with crds.enabled",
        ) from e
    log.info("created ClusterKopfPeering %s", name)
    return True


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def decide(
    status: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: datetime
) -> tuple[bool, str]:
    """kopf's rule: pause while a live peer has a higher priority, or the same one."""
    if identity not in status:
        return False, "not registered in the peering object yet"
    for peer, info in sorted(status.items()):
        if peer == identity:
            continue
        seen = info.get("lastseen")
        deadline = (_parse(seen) if seen else now) + timedelta(
            seconds=int(info.get("lifetime", 60))
        )
        if deadline <= now:
            continue
        other = int(info.get("priority", 0))
        if other > priority:
            return False, f"peer {peer} has a higher priority ({other} > {priority})"
        if other == priority:
            return False, f"peer {peer} has the same priority ({priority}): all tied peers pause"
    return True, "highest priority among live peers"


class PeeringGate:
    def __init__(
        self,
        api: KubeClient,
        *,
        name: str,
        identity: str,
        priority: int,
        on_change: Callable[[bool], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        self.api = api
        self.name = name
        self.identity = identity
        self.priority = priority
        self.on_change = on_change
        self.interval = interval
        self.active = False

    async def run(self) -> None:
        while True:
            try:
                await ensure_peering_object(self.api, self.name)
                break
            except Exception as e:
                log.warning("peering object %s not ensured, retrying: %s", self.name, e)
                await asyncio.sleep(max(self.interval, 2.0))
        while True:
            try:
                got = await self.api.get(f"{PEERING_PATH}/{self.name}")
                active, why = decide(
                    got.get("status") or {}, self.identity, self.priority, datetime.now(UTC)
                )
            except ApiError as e:
                active, why = False, f"peering object {self.name} unreadable: {e.status} {e.reason}"
            except Exception as e:  # the API server may be away; keep the last decision
                log.warning("peering check failed: %s", e)
                await asyncio.sleep(self.interval)
                continue
            if active != self.active:
                self.active = active
                log.info("%s peering=%s: %s", "active" if active else "paused", self.name, why)
                await self.on_change(active)
            await asyncio.sleep(self.interval)
