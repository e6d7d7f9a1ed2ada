"""The Event correlator's decisions (client-go's: dedup, similar-message folding, per-object
spam bucket), with a clock the test moves. The API server's side is tests/integration/test_events.py."""

from __future__ import annotations

import re
from typing import Any

from pcipt.events import COMBINED_PREFIX, EventCorrelator, _event_name


def event(
    message: str = "no free a100", reason: str = "FailedScheduling", name: str = "vm1"
) -> dict[str, Any]:
    return {
        "involvedObject": {"kind": "PassthroughVM", "namespace": "t", "name": name, "uid": "u"},
        "source": {"component": "pcipt-controller"},
        "type": "Warning",
        "reason": reason,
        "message": message,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_same_event_again_has_the_same_key_and_other_objects_do_not() -> None:
    corr = EventCorrelator(monotonic=Clock())
    assert corr.admit(event()) == corr.admit(event())
    assert corr.admit(event(name="vm2")) != corr.admit(event())
    assert corr.admit(event(reason="Scheduled")) != corr.admit(event())


def test_a_burst_of_one_event_is_cut_at_the_bucket_and_refills_slowly() -> None:
    clock = Clock()
    corr = EventCorrelator(spam_burst=25, spam_refill=300, monotonic=clock)
    admitted = [corr.admit(event()) for _ in range(30)]
    assert sum(k is not None for k in admitted) == 25 and corr.suppressed == 5
    clock.now += 299
    assert corr.admit(event()) is None
    clock.now += 2
    assert corr.admit(event()) is not None
    assert corr.admit(event(name="vm2")) is not None  # another object has its own bucket


def test_more_than_ten_messages_about_one_object_fold_into_one_combined_event() -> None:
    clock = Clock()
    corr = EventCorrelator(similar_max=10, similar_window=600, monotonic=clock)
    keys = []
    for i in range(12):
        body = event(f"refused on try {i}")
        keys.append(corr.admit(body))
    assert len(set(keys[:10])) == 10
    combined = event("refused on try 12")
    key = corr.admit(combined)
    assert key == keys[10] == keys[11]  # one Event, counted up from here
    assert combined["message"] == COMBINED_PREFIX + "refused on try 12"
    clock.now += 601  # a quiet window later, messages stand alone again
    assert corr.admit(event("refused on try 13")) != key


def test_event_names_are_unique_valid_names_after_the_object() -> None:
    """Events are named client-side (so the create's answer need not be read): the object's
    name, a dot, the time in hex; never twice the same; a valid name however long the
    object's."""
    dns = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    names = [_event_name("vm-1") for _ in range(1000)]
    assert len(set(names)) == 1000
    assert all(n.startswith("vm-1.") and dns.match(n) for n in names)
    long = _event_name("a" * 235 + "-" + "b" * 17)  # cut right after the dash
    assert len(long) <= 253 and dns.match(long), long
    assert dns.match(_event_name(None))
