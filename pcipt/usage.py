"""Device time, for charging: seconds each device was claimed for a VM, from its claim's time
to its release, by namespace, VM, flavor and the flavor's price class.

Closed intervals are kept in usage ledgers: one ConfigMap per tenant namespace in the
operator's namespace (`pcipt-usage.<namespace>`, labelled `pcipt.io/usage-ledger=true`),
written by the controller before it releases a claim, one entry per claim:

    data:
      node-a.0000-3b-00-0.1764694800: '{"vm": "ns/trainer", "uid": "...", "device": "...",
          "flavor": "a100", "priceClass": "gpu-premium", "from": 1764694800.0,
          "to": 1764698400.0, "reason": "Deleted"}'

Open intervals are the claims themselves (spec.claimRef.claimedAt), counted once
SETTLE_SECONDS old (a bind's rollback of a claim it just made is not device time). Both live
in the API server, so the totals are the same whichever controller replica computes them, before and
after a restart; and since a claim's interval is written to the ledger before the claim goes,
a total never shrinks. Companion devices (IOMMU group peers) are not charged.

Old entries are folded into one `rolled-up` entry per ledger (totals per VM, flavor and price
class, before a time), which keeps a ledger within a ConfigMap's size; `--since` before that
time counts the folded totals whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LEDGER_PREFIX = "pcipt-usage."
LEDGER_LABEL = "pcipt.io/usage-ledger"
ROLLED_UP = "rolled-up"

Key = tuple[str, str, str, str]
"""(namespace, vm, flavor, price class)"""


@dataclass(frozen=True)
class Interval:
    namespace: str
    vm: str
    flavor: str
    price_class: str
    start: float
    end: float | None
    """None: still claimed."""


SETTLE_SECONDS = 2.0
"""A claim counts once it is this old: a bind that loses a race rolls back younger claims,
and those are neither counted nor recorded, so no total ever goes down."""


def settled(claimed_at: float | None, now: float | None = None) -> bool:
    return (
        claimed_at is not None
        and (time.time() if now is None else now) - claimed_at >= SETTLE_SECONDS
    )


def entry_key(device: str, claimed_at: float) -> str:
    """A ledger entry's key: one per claim (a retried release writes the same one)."""
    return f"{device}.{int(claimed_at)}"


def parse_ledger(
    namespace: str, data: Mapping[str, str] | None
) -> tuple[list[Interval], dict[Key, float], float | None]:
    """A ledger ConfigMap's intervals, its folded totals and the time they run to."""
    intervals: list[Interval] = []
    rolled: dict[Key, float] = {}
    before: float | None = None
    for key, text in (data or {}).items():
        try:
            e = json.loads(text)
        except ValueError:
            continue
        if not isinstance(e, dict):
            continue
        if key == ROLLED_UP:
            before = float(e.get("before", 0)) or None
            for row in e.get("totals", []):
                k = (namespace, str(row["vm"]), str(row["flavor"]), str(row.get("priceClass", "")))
                rolled[k] = rolled.get(k, 0.0) + float(row["seconds"])
            continue
        try:
            intervals.append(
                Interval(
                    namespace,
                    str(e["vm"]).partition("/")[2] or str(e["vm"]),
                    str(e["flavor"]),
                    str(e.get("priceClass") or ""),
                    float(e["from"]),
                    float(e["to"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return intervals, rolled, before


def totals(
    intervals: Iterable[Interval],
    rolled: Mapping[Key, float] | None = None,
    *,
    now: float,
    since: float | None = None,
) -> dict[Key, float]:
    """Device-seconds per (namespace, vm, flavor, price class), each interval clipped to
    [since, now]; folded totals counted whole."""
    out: dict[Key, float] = dict(rolled or {})
    for i in intervals:
        start = max(i.start, since) if since is not None else i.start
        end = min(i.end if i.end is not None else now, now)
        if end > start:
            k = (i.namespace, i.vm, i.flavor, i.price_class)
            out[k] = out.get(k, 0.0) + end - start
    return out


def by_namespace_and_flavor(per_vm: Mapping[Key, float]) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for (ns, _vm, flavor, price), v in per_vm.items():
        out[(ns, flavor, price)] = out.get((ns, flavor, price), 0.0) + v
    return out


def fold(entries: dict[str, dict[str, Any]], keep: int) -> dict[str, dict[str, Any]]:
    """Fold all but the `keep` latest closed entries into the rolled-up entry."""
    closed = sorted(
        ((k, e) for k, e in entries.items() if k != ROLLED_UP), key=lambda kv: float(kv[1]["to"])
    )
    if len(closed) <= keep:
        return entries
    old, recent = closed[: len(closed) - keep], closed[len(closed) - keep :]
    rolled = entries.get(ROLLED_UP) or {"totals": [], "before": 0}
    sums: dict[tuple[str, str, str], float] = {
        (r["vm"], r["flavor"], r.get("priceClass", "")): float(r["seconds"])
        for r in rolled["totals"]
    }
    before = float(rolled.get("before") or 0)
    for _, e in old:
        vm = str(e["vm"]).partition("/")[2] or str(e["vm"])
        k = (vm, e["flavor"], e.get("priceClass") or "")
        sums[k] = sums.get(k, 0.0) + float(e["to"]) - float(e["from"])
        before = max(before, float(e["to"]))
    out = dict(recent)
    out[ROLLED_UP] = {
        "totals": [
            {"vm": vm, "flavor": f, "priceClass": p, "seconds": round(s, 3)}
            for (vm, f, p), s in sorted(sums.items())
        ],
        "before": before,
    }
    return out
