"""Which replica acts: leader election on a coordination.k8s.io Lease, as kube-controller-manager
and kube-scheduler do it. Safety never depends on it (every write is conditional, the audit
re-reads before it repairs); it keeps replicas from racing each other and posting Events twice.

- A candidate takes the Lease when it is free, expired, or already its own. Expiry is judged by
  this process's clock from when it last saw the Lease change (as client-go does), so clocks
  between hosts do not matter. Every write carries the resourceVersion read: of two candidates,
  one wins.
- The identity is stable per pod (the pod's name): a leader killed and restarted by the kubelet
  takes its Lease back at once instead of waiting for it to expire.
- The leader renews every `renew_period`; one that has not renewed for `lease_duration` (the
  API server away) stops acting before a standby may start.
- A leader that stops cleanly gives the Lease up, so a standby takes over within one retry.
- Standbys keep their watches and inventory current (warm): taking over is one full LIST.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pcipt import clock
from pcipt.backoff import Health
from pcipt.kubeclient import ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.leader")


class LeaderElector:
    def __init__(
        self,
        api: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_change: Callable[[bool], Awaitable[None]],
        lease_duration: float = 4.0,
        renew_period: float = 1.0,
        retry_period: float = 0.5,
    ) -> None:
        self.api = api
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.name = name
        self.identity = identity
        self.on_change = on_change
        self.lease_duration = lease_duration
        """Seconds a Lease not renewed stays its holder's (leaseDurationSeconds)."""
        self.renew_period = renew_period
        """Seconds between a leader's renewals."""
        self.retry_period = retry_period
        """Seconds between a standby's looks."""
        self.leading = False
        self._renewed_at = 0.0  # monotonic: the last successful write as leader
        self._observed: tuple[str, str, str] | None = None  # holder, renewTime, resourceVersion
        self._observed_at = 0.0
        self._health = Health(log, f"leader election on Lease {name}")

    async def run(self) -> None:
        while True:
            try:
                leading = await self._try()
                self._health.ok()
            except Exception as e:  # the API server away, or a refusal: keep trying
                self._health.failed(e, self.retry_period)
                # A leader that cannot renew steps down before its Lease could be taken.
                leading = self.leading and (
                    time.monotonic() - self._renewed_at < self.lease_duration - self.renew_period
                )
            await self._set(leading)
            await asyncio.sleep(self.renew_period if leading else self.retry_period)

    async def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        log.info(
            "%s lease=%s identity=%s",
            "leading" if leading else "standing by",
            self.name,
            self.identity,
        )
        try:
            await self.on_change(leading)
        except Exception as e:  # taking over failed (its catch-up LIST): try again next look
            log.warning("taking over failed, standing by: %s", e)
            self.leading = False
            await self.on_change(False)

    async def _try(self) -> bool:
        """One look: acquire or renew when allowed; whether this replica leads now."""
        try:
            lease = await self.api.get(f"{self.path}/{self.name}")
        except NotFound:
            try:
                await self.api.create(self.path, self._body(None))
            except Conflict:
                return False  # another candidate created it first
            self._renewed_at = time.monotonic()
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, str(spec.get("renewTime")), lease["metadata"]["resourceVersion"])
        if observed != self._observed:
            self._observed, self._observed_at = observed, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = time.monotonic() - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            return False
        try:
            await self.api.replace(f"{self.path}/{self.name}", self._body(lease))
        except Conflict:
            return False  # another candidate wrote first; look again next time
        self._renewed_at = time.monotonic()
        return True

    def _body(self, lease: dict[str, Any] | None) -> dict[str, Any]:
        now = clock.micro_timestamp()
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (lease is not None)
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=max(1, round(self.lease_duration)),
            renewTime=now,
        )
        meta: dict[str, Any] = {"name": self.name}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    async def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby need not wait for it to expire."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.api.get(f"{self.path}/{self.name}")
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            body = {
                **lease,
                "spec": {**spec, "holderIdentity": "", "leaseDurationSeconds": 1},
            }
            await self.api.replace(f"{self.path}/{self.name}", body)
            log.info("gave up lease=%s identity=%s", self.name, self.identity)
        except (ApiError, OSError, TimeoutError) as e:
            log.warning("lease %s not given up (it expires by itself): %s", self.name, e)
