"""Prometheus metrics for both programs, on prometheus_client: counters, gauges and histograms
behind a small interface (labels passed positionally, gauges replaced whole at scrape time),
the process's own metrics (CPU, memory, open files, GC) for free, and the HTTP endpoint that
serves them with /healthz and /readyz. Metric names are the constants below; docs/metrics.md
lists them with their labels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import prometheus_client as prom
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pcipt.settings import Setting

# No *_created series: they double every counter's lines and nobody here reads them.
prom.disable_created_metrics()  # type: ignore[no-untyped-call]

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

DEVICE_SECONDS: Final = "pcipt_device_seconds_total"
"""Counter: seconds devices were claimed for VMs, by namespace, flavor and price class."""
VM_DEVICE_SECONDS: Final = "pcipt_vm_device_seconds_total"
"""Counter: the same, by VM."""

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


class _Metric:
    def __init__(self, registry: Registry, name: str, labels: Sequence[str]) -> None:
        self.registry = registry
        self.name = name
        self.label_names = tuple(labels)


class Counter(_Metric):
    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str]) -> None:
        super().__init__(registry, name.removesuffix("_total"), labels)
        self._c = prom.Counter(self.name, help, self.label_names, registry=registry.prom)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        (self._c.labels(*labels) if labels else self._c).inc(by)


class Gauge(_Metric):
    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str]) -> None:
        super().__init__(registry, name, labels)
        self._g = prom.Gauge(name, help, self.label_names, registry=registry.prom)
        self._lock = threading.Lock()

    def set(self, value: float, *labels: str) -> None:
        (self._g.labels(*labels) if labels else self._g).set(value)

    def replace(self, values: dict[Labels, float]) -> None:
        """Set the whole series at once (series not named disappear)."""
        with self._lock:
            self._g.clear()
            for labels, value in values.items():
                self._g.labels(*labels).set(value)


class StateCounter(_Metric):
    """A counter computed from durable state at each scrape (say, device time from claim and
    release records): it only grows because that state only grows, and every replica and every
    restart computes the same value."""

    def __init__(self, registry: Registry, name: str, help: str, labels: Sequence[str]) -> None:
        super().__init__(registry, name.removesuffix("_total"), labels)
        self.help = help
        self.values: dict[Labels, float] = {}
        self._lock = threading.Lock()
        registry.prom.register(_StateCollector(self))

    def replace(self, values: dict[Labels, float]) -> None:
        with self._lock:
            self.values = dict(values)


class _StateCollector(Collector):
    def __init__(self, metric: StateCounter) -> None:
        self.metric = metric

    def collect(self) -> Iterable[prom.Metric]:
        fam = CounterMetricFamily(
            self.metric.name, self.metric.help, labels=self.metric.label_names
        )
        with self.metric._lock:
            for labels, value in sorted(self.metric.values.items()):
                fam.add_metric(list(labels), value)
        yield fam


class Histogram(_Metric):
    def __init__(
        self,
        registry: Registry,
        name: str,
        help: str,
        labels: Sequence[str],
        buckets: Iterable[float],
    ) -> None:
        super().__init__(registry, name, labels)
        self._h = prom.Histogram(
            name, help, self.label_names, registry=registry.prom, buckets=tuple(buckets)
        )

    def observe(self, value: float, *labels: str) -> None:
        (self._h.labels(*labels) if labels else self._h).observe(value)


class _Refresh(Collector):
    """Runs the registry's collectors before each scrape, so gauges computed from state are
    current; contributes no metrics of its own."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self.hooks = hooks

    def collect(self) -> Iterable[prom.Metric]:
        for hook in self.hooks:
            hook()
        return []


class Registry:
    def __init__(self) -> None:
        self.prom = prom.CollectorRegistry(auto_describe=True)
        self.collectors: list[Callable[[], None]] = []
        """Called before each scrape, to refresh gauges computed from state."""
        # Registered first: collection runs in registration order, so the hooks have run
        # before any of our metrics is read.
        self.prom.register(_Refresh(self.collectors))
        prom.ProcessCollector(registry=self.prom)
        prom.PlatformCollector(registry=self.prom)
        prom.GCCollector(registry=self.prom)

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(self, name, help, labels)

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(self, name, help, labels)

    def state_counter(self, name: str, help: str, labels: Sequence[str] = ()) -> StateCounter:
        return StateCounter(self, name, help, labels)

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(self, name, help, labels, buckets)

    def render(self) -> str:
        """The text exposition format, as /metrics serves it."""
        return prom.generate_latest(self.prom).decode()


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
