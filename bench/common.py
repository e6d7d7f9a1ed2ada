"""What the benchmarks share: percentiles, and a watch that notes when each VM reaches a state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcipt import constants as c
from pcipt.kubeclient import KubeClient, crd_path, retry_transient


def pct(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))]


class FirstSeen:
    """Notes, on the client's monotonic clock, when each PassthroughVM of a namespace is first
    seen passing `test` (by a LIST at start, then the watch from that LIST's resourceVersion)."""

    def __init__(
        self,
        api: KubeClient,
        namespace: str,
        test: Callable[[dict[str, Any]], bool],
        path: str | None = None,
    ) -> None:
        """`path`: what to watch instead of the namespace's PassthroughVMs (pods, say)."""
        self.api = api
        self.path = path or crd_path(c.PLURAL_PASSTHROUGHVM, namespace=namespace)
        self.test = test
        self.at: dict[str, float] = {}
        self.task: asyncio.Task[None] | None = None

    def _note(self, obj: dict[str, Any]) -> None:
        if self.test(obj):
            self.at.setdefault(obj["metadata"]["name"], time.monotonic())

    async def _list(self) -> str:
        got = await retry_transient(self.api.list, self.path)
        for obj in got["items"]:
            self._note(obj)
        return str(got["metadata"]["resourceVersion"])

    async def start(self) -> None:
        rv = await self._list()
        self.task = asyncio.get_running_loop().create_task(self._watch(rv))

    async def _watch(self, rv: str) -> None:
        while True:
            try:
                async for ev in self.api.watch(self.path, resource_version=rv, timeout=600):
                    obj = ev.get("object", {})
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    self._note(obj)
            except asyncio.CancelledError:
                raise
            except Exception:  # a dropped or expired watch: catch up with a fresh LIST
                await asyncio.sleep(0.1)
                rv = await self._list()

    def count(self, names: list[str]) -> int:
        return sum(1 for n in names if n in self.at)

    async def wait(
        self, names: list[str], timeout: float, check: Callable[[], None] | None = None
    ) -> None:
        """Until every name is seen; `check` is called meanwhile and may raise (a component
        that died: say so now, not after the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(names) == len(names):
                return
            if check is not None:
                check()
            await asyncio.sleep(0.05)
        missing = [n for n in names if n not in self.at]
        raise TimeoutError(f"{len(missing)} VMs not seen after {timeout}s, e.g. {missing[:3]}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


def scheduled(vm: dict[str, Any]) -> bool:
    return bool((vm.get("status") or {}).get("nodeName"))


def running(vm: dict[str, Any]) -> bool:
    return (vm.get("status") or {}).get("phase") == "Running"


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        k: round(int(fields[f].split()[0]) / 1024, 1)
        for k, f in (("rss", "VmRSS"), ("peak", "VmHWM"))
    }
