"""Kubernetes Events for transitions (bind, refusal, release, repairs, device faults), posted in
the background so that they never add latency to the work they describe.

Both programs post through this one recorder. An Event lives in its object's namespace; one
about a cluster-scoped object (a PciDevice, a Node) goes to `default`, the only namespace the
API server accepts for it besides none. A post that fails is logged and dropped: an Event is
never worth a retry storm, and nothing reads them back to decide.

Under bursts the recorder correlates the way client-go's recorder does, so that a VM refused
over and over, or a device flapping, costs the API server a counter bump instead of an object
each time:
- the same Event again (object, type, reason, message) within the cache's memory patches the
  first one's `count` and `lastTimestamp` instead of creating another;
- more than `similar_max` different messages with one object, type and reason within
  `similar_window` seconds fold into one Event whose message says "(combined from similar
  events)", counted from then on;
- each (object, type, reason, message) has a token bucket (`spam_burst` Events, then one per
  `spam_refill` seconds); past it, Events are dropped and counted in `suppressed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pcipt import clock
from pcipt import constants as c
from pcipt.kubeclient import ApiError, KubeClient

log = logging.getLogger("pcipt.events")

CLUSTER_SCOPED_EVENTS_NAMESPACE = "default"
COMBINED_PREFIX = "(combined from similar events): "


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Similar:
    since: float
    messages: set[str] = field(default_factory=set)


@dataclass
class _Posted:
    namespace: str
    name: str | None
    """None while its create is in flight."""
    count: int
    message: str


class EventCorrelator:
    """Decides, per Event, whether to create it, bump an earlier one, or drop it. No I/O."""

    def __init__(
        self,
        *,
        spam_burst: int = 25,
        spam_refill: float = 300.0,
        similar_max: int = 10,
        similar_window: float = 600.0,
        cache_size: int = 4096,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spam_burst = spam_burst
        self.spam_refill = spam_refill
        self.similar_max = similar_max
        self.similar_window = similar_window
        self.cache_size = cache_size
        self.monotonic = monotonic
        self._buckets: OrderedDict[tuple[Any, ...], _Bucket] = OrderedDict()
        self._similar: OrderedDict[tuple[Any, ...], _Similar] = OrderedDict()
        self.posted: OrderedDict[tuple[Any, ...], _Posted] = OrderedDict()
        self.suppressed = 0

    def _remember(self, table: OrderedDict[Any, Any], key: tuple[Any, ...], value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.cache_size:
            table.popitem(last=False)

    def admit(self, body: dict[str, Any]) -> tuple[str, ...] | None:
        """The dedup key to post body under (its message possibly rewritten as combined), or
        None when the spam filter drops it."""
        inv = body["involvedObject"]
        obj = (
            body["source"].get("component"),
            body["source"].get("host"),
            inv.get("kind"),
            inv.get("namespace"),
            inv.get("name"),
            inv.get("uid"),
            inv.get("apiVersion"),
            body["type"],
            body["reason"],
        )
        now = self.monotonic()
        spam_key = (*obj, body["message"])
        bucket = self._buckets.get(spam_key)
        if bucket is None:
            bucket = _Bucket(float(self.spam_burst), now)
        else:
            bucket.tokens = min(
                float(self.spam_burst), bucket.tokens + (now - bucket.at) / self.spam_refill
            )
            bucket.at = now
        if bucket.tokens < 1.0:
            self._remember(self._buckets, spam_key, bucket)
            self.suppressed += 1
            return None
        bucket.tokens -= 1.0
        self._remember(self._buckets, spam_key, bucket)

        similar = self._similar.get(obj)
        if similar is None or now - similar.since > self.similar_window:
            similar = _Similar(now)
        similar.messages.add(body["message"])
        self._remember(self._similar, obj, similar)
        if len(similar.messages) > self.similar_max:
            body["message"] = (COMBINED_PREFIX + body["message"])[:1024]
            return (*obj, COMBINED_PREFIX)
        return spam_key


_last_ns = [0]


def _event_name(name: str | None) -> str:
    """<object>.<nanoseconds in hex>, never the same twice from this process."""
    _last_ns[0] = max(time.time_ns(), _last_ns[0] + 1)
    suffix = f".{_last_ns[0]:x}"
    return ((name or "pcipt")[: 253 - len(suffix)].rstrip(".-") or "pcipt") + suffix


class EventRecorder:
    def __init__(
        self,
        api: KubeClient,
        component: str,
        host: str | None = None,
        correlator: EventCorrelator | None = None,
    ) -> None:
        self.api = api
        self.component = component
        self.host = host
        self.correlator = correlator or EventCorrelator()
        self._tasks: set[asyncio.Task[None]] = set()
        self.posted = 0
        self.bumped = 0
        self.failed = 0

    def record(self, obj: dict[str, Any] | Any, type_: str, reason: str, message: str) -> None:
        """Post an Event about obj (a raw object, a model with metadata, or an object
        reference with apiVersion, kind, name and optionally namespace/uid) without waiting."""
        if isinstance(obj, dict):
            raw = obj
            meta = raw.get("metadata") or {k: raw.get(k) for k in ("name", "namespace", "uid")}
        elif hasattr(obj, "metadata"):  # a model: its reference only, not a dump of it all
            raw = {"apiVersion": obj.api_version, "kind": obj.kind}
            m = obj.metadata
            meta = {"name": m.name, "namespace": m.namespace, "uid": m.uid}
        else:
            raw = obj.model_dump(by_alias=True, mode="json")
            meta = {k: raw.get(k) for k in ("name", "namespace", "uid")}
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
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named here, as client-go names them (object name, then the time in hex), so
            # that the answer to the create need not be read.
            "metadata": {"name": _event_name(meta.get("name")), "namespace": ns},
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
        key = self.correlator.admit(body)
        if key is None:
            return
        seen = self.correlator.posted.get(key)
        if seen is not None:
            seen.count += 1
            seen.message = body["message"]  # a combined Event says the latest
            if seen.name is None:
                return  # its create is in flight: it bumps the count when done
            coro = self._bump(key, seen, now)
        else:
            entry = _Posted(ns, None, 1, body["message"])
            self.correlator._remember(self.correlator.posted, key, entry)
            coro = self._post(ns, body, key, entry)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(
        self, ns: str, body: dict[str, Any], key: tuple[Any, ...], entry: _Posted
    ) -> None:
        try:
            await self.api.request(
                "POST", f"/api/v1/namespaces/{ns}/events", body=body, parse=False
            )
            self.posted += 1
            entry.name = body["metadata"]["name"]
            if entry.count > 1 and entry.name:
                await self._bump(key, entry, clock.timestamp())  # repeats while in flight
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            self.failed += 1
            self.correlator.posted.pop(key, None)
            log.warning("event not posted reason=%s: %s", body.get("reason"), e)

    async def _bump(self, key: tuple[Any, ...], entry: _Posted, now: str) -> None:
        try:
            await self.api.patch(
                f"/api/v1/namespaces/{entry.namespace}/events/{entry.name}",
                {"count": entry.count, "lastTimestamp": now, "message": entry.message},
            )
            self.bumped += 1
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            # Gone (Events live an hour) or unreachable: the next one is created afresh.
            self.correlator.posted.pop(key, None)
            self.failed += 1
            log.warning("event count not updated event=%s: %s", entry.name, e)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
