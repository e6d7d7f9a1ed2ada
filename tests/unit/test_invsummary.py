"""The counts the controller publishes for `kubectl pcipt inventory` (pcipt.invsummary): the
same states the plugin gives each device itself, written in parts a reader can check, and
refused by the reader when stale, half-written or counted with other flavors."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.inventory import Inventory
from controller.invsummary import InventorySummaryWriter
from pcipt import clock, invsummary
from pcipt.api.v1alpha1 import PciDevice, PciFlavor, pcidevice_name
from pcipt.cli import kubectl_pcipt
from pcipt.invsummary import INDEX, Unusable, decode, encode, index_data, part_name

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _device(node: str, address: str, vendor: str = "10de", **spec: Any) -> PciDevice:
    health = spec.pop("health", "Healthy")
    scrub = spec.pop("scrub_status", None)
    return PciDevice.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciDevice",
            "metadata": {"name": pcidevice_name(node, address), "resourceVersion": "1"},
            "spec": {"nodeName": node, "address": address, **spec},
            "status": {
                "vendorID": vendor,
                "productID": "20b5",
                "classCode": "030200",
                "health": health,
                **({"scrub": scrub} if scrub else {}),
            },
        }
    )


def _flavor(name: str, vendor: str) -> PciFlavor:
    return PciFlavor.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciFlavor",
            "metadata": {"name": name, "generation": 3},
            "spec": {"deviceType": "gpu", "selector": {"vendorIDs": [vendor]}},
        }
    )


def test_every_state_is_what_the_plugin_would_count_from_the_devices() -> None:
    now = time.time()
    later = clock.timestamp(datetime.fromtimestamp(now + 3600, UTC))
    claim = {"namespace": "t", "name": "vm", "uid": "u1", "request": "gpu", "flavor": "a100"}
    release = {"id": "r1", "vm": "t/vm", "uid": "u0"}
    devices = [
        _device("n1", "0000:01:00.0"),
        _device("n1", "0000:02:00.0", claimRef=claim),
        _device("n1", "0000:03:00.0", health="Unhealthy"),
        _device("n1", "0000:04:00.0", unschedulable=True),
        _device("n1", "0000:05:00.0", reserved={"vm": "t/vm", "uid": "u0"}),
        _device("n1", "0000:06:00.0", release={**release, "scrub": True}),
        _device("n1", "0000:07:00.0", release={**release, "quarantineUntil": later}),
        _device(
            "n1",
            "0000:08:00.0",
            release={**release, "scrub": True},
            scrub_status={"releaseID": "r1", "phase": "Failed"},
        ),
        _device("n1", "0000:09:00.0", vendor="8086"),  # in no flavor
        _device("n2", "0000:01:00.0"),  # no Lease
        _device("n2", "0000:02:00.0", health="Missing"),
    ]
    inv = Inventory(node_dead_after=40.0, clock=lambda: now)
    flavors = [_flavor("a100", "10de"), _flavor("any-nvidia", "10de")]
    for f in flavors:
        inv.upsert_flavor(f)
    for d in devices:
        inv.upsert_device(d)
    inv.renew_lease("n1", now)

    rows, alive = InventorySummaryWriter(None, inv, "ops").count()  # type: ignore[arg-type]
    ctx = kubectl_pcipt._Counting(flavors=flavors, alive={"n1": True}, labels={})
    assert rows == dict(kubectl_pcipt._count([d.to_dict() for d in devices], ctx))
    assert alive == {"n1": True, "n2": False}
    assert rows[("n1", "a100")] == Counter(
        total=8,
        free=1,
        allocated=1,
        unhealthy=1,
        cordoned=1,
        reserved=1,
        scrubbing=2,
        quarantined=1,
    )
    assert rows[("n1", "<none>")] == Counter(total=1, free=1)
    assert rows[("n2", "any-nvidia")] == Counter(total=2, unhealthy=1, **{"node-not-alive": 1})


def _configmaps(
    rows: invsummary.Rows, alive: dict[str, bool], checked: datetime, counted: datetime = NOW
) -> list[Any]:
    flavors: dict[str, int | None] = {"a100": 3}
    stamp, parts = encode(rows, alive, flavors, counted)
    cms = [{"metadata": {"name": part_name(i)}, "data": d} for i, d in enumerate(parts)]
    cms.append(
        {"metadata": {"name": INDEX}, "data": index_data(stamp, len(parts), flavors, checked)}
    )
    return cms


def _rows(nodes: int) -> tuple[invsummary.Rows, dict[str, bool]]:
    rows: invsummary.Rows = {}
    for i in range(nodes):
        rows[(f"n{i:02d}", "a100")] = Counter(total=4, free=3, allocated=1)
        rows[(f"n{i:02d}", "<none>")] = Counter(total=1, **{"node-not-alive": 1})
    return rows, {f"n{i:02d}": i % 2 == 0 for i in range(nodes)}


def test_counts_come_back_as_written_from_parts_that_keep_a_node_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(invsummary, "ROWS_PER_PART", 5)
    rows, alive = _rows(7)
    cms = _configmaps(rows, alive, NOW)
    assert len(cms) == 1 + 4  # two nodes (four rows) a part, the index
    for cm in cms[:-1]:
        nodes = json.loads(cm["data"][invsummary.KEY])["nodes"]
        assert all(len(n["rows"]) == 2 for n in nodes.values())  # both of a node's rows
    got = decode(cms, {"a100": 3}, NOW + timedelta(seconds=10), max_age=45)
    assert got.rows == rows and got.alive == alive
    assert got.counted_at == NOW


def test_a_reader_refuses_counts_it_cannot_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invsummary, "ROWS_PER_PART", 5)
    rows, alive = _rows(7)
    later = NOW + timedelta(seconds=10)

    def refused(cms: list[Any], flavors: dict[str, int | None] | None = None) -> str:
        with pytest.raises(Unusable) as e:
            decode(cms, {"a100": 3} if flavors is None else flavors, later, max_age=45)
        return str(e.value)

    assert "has not published" in refused([])
    cms = _configmaps(rows, alive, NOW - timedelta(seconds=60))
    assert "last checked 70s ago" in refused(cms)
    cms = _configmaps(rows, alive, NOW)
    assert "flavors changed" in refused(cms, {"a100": 4})
    assert "flavors changed" in refused(cms, {"a100": 3, "h100": 1})
    # A part left from the counting before (the writer was between parts and index).
    before = NOW - timedelta(seconds=5)
    older = _configmaps(_rows(6)[0], alive, before, counted=before)
    mixed = [older[0], *cms[1:]]
    assert "two countings" in refused(mixed)
    assert "two countings" in refused(cms[1:])  # a part missing
    broken = [*cms[:-1], {"metadata": {"name": INDEX}, "data": {invsummary.KEY: "{"}}]
    assert "not a summary" in refused(broken)
