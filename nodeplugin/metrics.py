"""The node plugin's metrics (names in pcipt.metrics; documented in docs/metrics.md)."""

from __future__ import annotations

from pcipt import metrics as m


class NodeMetrics:
    def __init__(self, registry: m.Registry) -> None:
        self.discovery = registry.histogram(
            m.DISCOVERY_DURATION,
            "Seconds one scan of the host's sysfs took.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.rescan_writes = registry.counter(m.RESCAN_WRITES, "API writes made by rescans.")
        self.published = registry.gauge(
            m.PUBLISHED, "PciDevices this node publishes, by health.", ("health",)
        )
        self.libvirt = registry.histogram(
            m.LIBVIRT_LATENCY, "Seconds libvirt operations took.", ("operation",)
        )
        self.libvirt_failures = registry.counter(
            m.LIBVIRT_FAILURES, "Failed libvirt operations.", ("operation",)
        )
        self.domains = registry.gauge(
            m.DOMAINS, "pcipt's domains on this node, by state.", ("state",)
        )
        self.config_errors = registry.counter(m.CONFIG_ERRORS, "Device-spec files refused.")
        self.errors = registry.counter(
            m.RECONCILE_ERRORS,
            "Errors in the loops, by component and stage.",
            ("component", "stage"),
        )

    def error(self, stage: str) -> None:
        self.errors.inc("nodeplugin", stage)
