"""Every device counted by node, flavor and state, as the controller keeps it: published for
`kubectl pcipt inventory`, which on a large cluster reads it instead of listing every device.

Listing 50 000 PciDevices is 60 MB of JSON the API server must copy and encode (about 1.6 s of
its CPU, and as much again in its garbage collector every other time) before the client
decodes it; the controller has the same counts in memory all along. It writes them, at most
every few seconds while they change, to ConfigMaps in the operator's namespace:

- `pcipt-inventory`: the index: when the counts were made (`stamp`), how many parts there are,
  the flavors' generations they were counted with, and `checkedAt`, renewed while the counts
  stay the same (a cheap write to a small object), so a reader can tell current counts from
  the leftovers of a controller that stopped;
- `pcipt-inventory-<i>`: the rows, a few thousand per part, whole nodes per part, each part
  carrying the stamp of the index it belongs to.

A reader lists them together (one LIST: one snapshot) and uses them only when every part has
the index's stamp, the index was checked recently, and the flavors are still those it was
counted with; else it counts every device itself. The states are the ones `device_state`
gives, in the order it tests them, the same code on both sides.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pcipt import clock
from pcipt.release import HELD_QUARANTINE

LABEL: Final = "pcipt.io/inventory-summary"
INDEX: Final = "pcipt-inventory"
KEY: Final = "summary.json"
STATES: Final = (
    "free",
    "allocated",
    "unhealthy",
    "cordoned",
    "reserved",
    "scrubbing",
    "quarantined",
    "node-not-alive",
)
NO_FLAVOR: Final = "<none>"
"""The flavor column of devices no flavor selects."""
ROWS_PER_PART: Final = 4000
"""About 60 bytes a row: a part stays far below a ConfigMap's 1 MiB."""

Rows = dict[tuple[str, str], Counter[str]]
"""(node, flavor) -> state -> devices, plus "total"."""


def device_state(  # noqa: PLR0917 - a device's facts, in the order they decide
    claimed: bool,
    health: str,
    unschedulable: bool,
    reserved: bool,
    held: str | None,
    alive: bool,
) -> str:
    """What inventory calls a device: the first that holds of allocated (claimed), unhealthy,
    cordoned, reserved (kept after use), quarantined or scrubbing (held back after a release:
    pcipt.release.held_back's answer), node-not-alive, free."""
    if claimed:
        return "allocated"
    if health != "Healthy":
        return "unhealthy"
    if unschedulable:
        return "cordoned"
    if reserved:
        return "reserved"
    if held is not None:
        return "quarantined" if held == HELD_QUARANTINE else "scrubbing"
    if not alive:
        return "node-not-alive"
    return "free"


def part_name(i: int) -> str:
    return f"{INDEX}-{i}"


def encode(
    rows: Rows,
    alive: dict[str, bool],
    flavors: dict[str, int | None],
    counted_at: datetime,
) -> tuple[str, list[dict[str, str]]]:
    """The stamp and each part's ConfigMap data, rows sorted, a node's rows in one part."""
    stamp = clock.micro_timestamp(counted_at)
    by_node: dict[str, list[list[Any]]] = {}
    for (node, flavor), counts in sorted(rows.items()):
        by_node.setdefault(node, []).append([flavor, counts["total"], *(counts[s] for s in STATES)])
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for node, node_rows in by_node.items():
        if current is None or current["n"] + len(node_rows) > ROWS_PER_PART:
            current = {"n": 0, "nodes": {}}
            parts.append(current)
        current["nodes"][node] = {"alive": alive.get(node, False), "rows": node_rows}
        current["n"] += len(node_rows)
    data = [
        {KEY: json.dumps({"stamp": stamp, "nodes": p["nodes"]}, separators=(",", ":"))}
        for p in parts
    ]
    return stamp, data


def index_data(
    stamp: str, parts: int, flavors: dict[str, int | None], checked_at: datetime
) -> dict[str, str]:
    return {
        KEY: json.dumps(
            {
                "stamp": stamp,
                "parts": parts,
                "columns": ["flavor", "total", *STATES],
                "flavors": flavors,
                "checkedAt": clock.micro_timestamp(checked_at),
            },
            sort_keys=True,
        )
    }


@dataclass
class Summary:
    counted_at: datetime
    checked_at: datetime
    rows: Rows
    alive: dict[str, bool]


class Unusable(Exception):
    """Why the published counts cannot be used; the reader counts every device instead."""


def decode(
    configmaps: list[dict[str, Any]],
    flavors: dict[str, int | None],
    now: datetime,
    max_age: float,
) -> Summary:
    """The counts in the ConfigMaps as listed, or Unusable saying why not."""
    docs: dict[str, dict[str, Any]] = {}
    for cm in configmaps:
        name = (cm.get("metadata") or {}).get("name", "")
        try:
            docs[name] = json.loads((cm.get("data") or {}).get(KEY) or "")
        except ValueError as e:
            raise Unusable(f"configmap {name} is not a summary: {e}") from e
    index = docs.get(INDEX)
    if index is None:
        raise Unusable("the controller has not published its counts (no configmap " + INDEX + ")")
    try:
        stamp, nparts = str(index["stamp"]), int(index["parts"])
        checked = clock.parse(index["checkedAt"])
        counted = clock.parse(stamp)
        columns = list(index["columns"])
        counted_with = dict(index["flavors"])
    except (KeyError, TypeError, ValueError) as e:
        raise Unusable(f"configmap {INDEX} is malformed: {e}") from e
    age = (now - checked).total_seconds()
    if age > max_age:
        raise Unusable(
            f"the controller's counts were last checked {age:.0f}s ago (over {max_age:g}s)"
        )
    if columns != ["flavor", "total", *STATES]:
        raise Unusable("the controller counts other states than this plugin knows")
    if counted_with != flavors:
        raise Unusable("the flavors changed since the controller last counted")
    rows: Rows = {}
    alive: dict[str, bool] = {}
    for i in range(nparts):
        part = docs.get(part_name(i))
        if part is None or part.get("stamp") != stamp:
            raise Unusable("the controller was writing its counts (parts of two countings)")
        for node, entry in (part.get("nodes") or {}).items():
            alive[node] = bool(entry.get("alive"))
            for flavor, total, *counts in entry.get("rows") or []:
                row: Counter[str] = Counter({"total": total})
                row.update({s: n for s, n in zip(STATES, counts, strict=True) if n})
                rows[(node, flavor)] = row
    return Summary(counted, checked, rows, alive)
