"""Prometheus metrics: counters, gauges and histograms in the text exposition format, and the
HTTP endpoint that serves them. Metric names are the constants below; docs/metrics.md lists
them with their labels.

A few dozen lines instead of a client library: the components need three metric types and one
endpoint, on the aiohttp that kopf already brings.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from aiohttp import web

from pcipt.settings import Setting

# --- names ---------------------------------------------------------------------------------

# controller
DEVICES: Final = "pcipt_devices"
"""Gauge: devices by node, flavor and state (free, allocated, unhealthy, cordoned)."""
ALLOCATIONS: Final = "pcipt_allocations"
"""Gauge: devices held, by namespace and flavor (the basis for charging per device-hour)."""
SCHEDULING_LATENCY: Final = "pcipt_scheduling_latency_seconds"
"""Histogram: VM creation to Scheduled."""
SCHEDULING_DECISION: Final = "pcipt_scheduling_decision_seconds"
"""Histogram: one scheduler decision, in the controller."""
BINDS: Final = "pcipt_binds_total"
"""Counter: VMs bound."""
BIND_CONFLICTS: Final = "pcipt_bind_conflicts_total"
"""Counter: binds that lost a race (a precondition failed) and were planned again."""
REFUSALS: Final = "pcipt_scheduling_refusals_total"
"""Counter: refused scheduling attempts, by reason."""
RELEASES: Final = "pcipt_releases_total"
"""Counter: devices released."""
AUDIT_REPAIRS: Final = "pcipt_audit_repairs_total"
"""Counter: repairs made by the audit, by kind (orphans, reclaimed, replanned)."""
RECONCILE_ERRORS: Final = "pcipt_reconcile_errors_total"
"""Counter: errors in the components' loops, by component and stage."""
PENDING: Final = "pcipt_pending_vms"
"""Gauge: VMs waiting to be placed."""
NODES_ALIVE: Final = "pcipt_nodes_alive"
"""Gauge: nodes whose plugin renews its Lease (alive=true|false)."""
# node plugin
DISCOVERY_DURATION: Final = "pcipt_discovery_duration_seconds"
"""Histogram: one scan of the host's sysfs."""
RESCAN_WRITES: Final = "pcipt_rescan_writes_total"
"""Counter: API writes made by rescans (zero while nothing changes)."""
PUBLISHED: Final = "pcipt_published_devices"
"""Gauge: PciDevices this node publishes, by health."""
LIBVIRT_LATENCY: Final = "pcipt_libvirt_operation_seconds"
"""Histogram: libvirt operations, by operation (define, start, stop, remove)."""
LIBVIRT_FAILURES: Final = "pcipt_libvirt_failures_total"
"""Counter: failed libvirt operations, by operation."""
DOMAINS: Final = "pcipt_domains"
"""Gauge: pcipt's domains on this node, by state."""
CONFIG_ERRORS: Final = "pcipt_device_spec_errors_total"
"""Counter: device-spec files refused."""

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Series(_Metric):
    """A metric with one number per label set: what counters and gauges share."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[Labels, float] = {}

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
            for k, v in sorted(self.values.items())
        ]


class Counter(_Series):
    kind = "counter"

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + by


class Gauge(_Series):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self.values[labels] = value

    def replace(self, values: dict[Labels, float]) -> None:
        """Set the whole series at once (series not named disappear)."""
        with self._lock:
            self.values = dict(values)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, list[float]] = {}
        """per label set: bucket counts (non-cumulative), then sum, then count"""

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            s = self.series.setdefault(labels, [0.0] * (len(self.buckets) + 3))
            s[bisect.bisect_left(self.buckets, value)] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, *labels: str) -> float:
        return self.series.get(labels, [0.0])[-1]

    def render(self) -> list[str]:
        out = self.header()
        for key, s in sorted(self.series.items()):
            cumulative = 0.0
            for i, edge in enumerate([*self.buckets, math.inf]):
                cumulative += s[i]
                le = _labels(self.label_names, key, f'le="{_num(edge)}"')
                out.append(f"{self.name}_bucket{le} {_num(cumulative)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(s[-1])}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []
        self.collectors: list[Callable[[], None]] = []
        """Called before each scrape, to refresh gauges computed from state."""

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        m = Counter(name, help, labels)
        self.metrics.append(m)
        return m

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        m = Gauge(name, help, labels)
        self.metrics.append(m)
        return m

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        m = Histogram(name, help, labels, buckets)
        self.metrics.append(m)
        return m

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


SETTINGS: Final = (
    Setting("--metrics-port", 8080, "port for /metrics, /healthz and /readyz (0: off)", int),
    Setting("--metrics-host", "127.0.0.1", "address to serve metrics on (the chart sets 0.0.0.0)"),
)
"""--metrics-port and --metrics-host, with their PCIPT_METRICS_* environment twins."""


async def serve(
    registry: Registry, host: str, port: int, health: Callable[[], bool] | None = None
) -> web.AppRunner:
    """Serve /metrics (and /healthz, /readyz) on host:port; returns the runner to clean up."""

    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(
            text=registry.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def healthz(_req: web.Request) -> web.Response:
        ok = health() if health is not None else True
        return web.Response(text="ok\n" if ok else "not ready\n", status=200 if ok else 503)

    app = web.Application()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", healthz)]
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
