"""Device time's arithmetic (pcipt/usage.py): intervals clipped to a window, open claims
counted to now, folding old entries keeps the totals."""

from __future__ import annotations

import json

from pcipt.usage import (
    ROLLED_UP,
    Interval,
    by_namespace_and_flavor,
    entry_key,
    fold,
    parse_ledger,
    totals,
)


def test_closed_and_open_intervals_clipped_to_the_window() -> None:
    closed = Interval("t", "vm1", "a100", "gpu-premium", 100.0, 400.0)
    open_ = Interval("t", "vm1", "a100", "gpu-premium", 300.0, None)
    other = Interval("u", "vm9", "vf", "", 0.0, 50.0)
    assert totals([closed, open_, other], now=500.0) == {
        ("t", "vm1", "a100", "gpu-premium"): 300.0 + 200.0,
        ("u", "vm9", "vf", ""): 50.0,
    }
    # Since 350: 50 s of the closed one, 150 s of the open one, nothing of the old one.
    assert totals([closed, open_, other], now=500.0, since=350.0) == {
        ("t", "vm1", "a100", "gpu-premium"): 200.0
    }
    per_flavor = by_namespace_and_flavor(totals([closed, open_], now=500.0))
    assert per_flavor == {("t", "a100", "gpu-premium"): 500.0}


def test_a_ledger_round_trips_and_folding_keeps_every_second() -> None:
    entries = {}
    for i in range(10):
        entries[entry_key(f"n.0000-3b-00-{i}", 1000.0 + i)] = {
            "vm": "t/vm1" if i % 2 else "t/vm2",
            "uid": "u",
            "device": f"n.0000-3b-00-{i}",
            "flavor": "a100",
            "priceClass": "gpu",
            "from": 1000.0 + i,
            "to": 2000.0 + i,
            "reason": "Deleted",
        }
    whole = totals(parse_ledger("t", {k: json.dumps(v) for k, v in entries.items()})[0], now=9e9)
    folded = fold(entries, keep=3)
    assert len(folded) == 4 and ROLLED_UP in folded
    intervals, rolled, before = parse_ledger("t", {k: json.dumps(v) for k, v in folded.items()})
    assert len(intervals) == 3 and before == 2006.0
    assert totals(intervals, rolled, now=9e9) == whole
    # Folding again adds to the rolled-up totals.
    again = fold({**folded, "x.1": {**entries[next(iter(entries))], "to": 2100.0}}, keep=1)
    i2, r2, _ = parse_ledger("t", {k: json.dumps(v) for k, v in again.items()})
    assert sum(totals(i2, r2, now=9e9).values()) == sum(whole.values()) + 1100.0
