"""The scheduling queue: which VMs wait for a placement, and which of them to look at next.

Work is proportional to what changed. A VM is looked at when it is new or its spec changed;
a refused VM then waits, by the flavors it asked for, until the free capacity of one of them
grows (or something every decision depends on changes: flavors, namespaces, nodes). A VM whose
bind failed on the API server's weather is deferred until its back-off ends, and its devices
freed for the moment wake nobody.

No I/O and no clock of its own: the caller says what time it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.inventory import VmKey, vm_key
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.backoff import Backoff


@dataclass
class PendingVM:
    key: VmKey
    uid: str
    created: str
    """creationTimestamp: the oldest VM is looked at first."""
    generation: int | None = None
    """The spec generation last tried; a new one is tried again at once."""
    refused_message: str | None = None
    """The last refusal said in an Event (one Event per new reason)."""
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=30.0))
    """Delays between binds that failed on the API server's weather."""
    failure: str | None = None
    """The last such failure, logged once."""


class SchedulingQueue:
    def __init__(self) -> None:
        self.pending: dict[str, PendingVM] = {}
        """Every VM not placed yet, by UID."""
        self.ready: set[str] = set()
        """Pending VMs to look at in the next pass."""
        self.waiting: dict[str, set[str]] = {}
        """Refused VMs by the flavors they wait on."""
        self.binding: set[str] = set()
        """VMs with a bind in flight (placed, not yet written)."""
        self.deferred: dict[str, float] = {}
        """VMs backing off after a failed bind: not looked at before this (monotonic) time."""

    def __len__(self) -> int:
        return len(self.pending)

    # --- what the watch says ------------------------------------------------------------------

    def offer(self, vm: PassthroughVM) -> bool:
        """A VM not being deleted, as the watch last saw it. True when it is ready now (new, or
        its spec changed: our own status writes do not make it ready again)."""
        uid = vm.metadata.uid or ""
        if vm.status.node_name:
            self.forget(uid)
            return False
        entry = self.pending.get(uid)
        if entry is None:
            ts = vm.metadata.creation_timestamp
            entry = self.pending[uid] = PendingVM(vm_key(vm), uid, ts.isoformat() if ts else "")
        if entry.generation == vm.metadata.generation:
            return False
        self.ready.add(uid)
        return True

    def forget(self, uid: str) -> None:
        """Placed, deleted or being deleted: no longer waits."""
        self.pending.pop(uid, None)
        self.ready.discard(uid)
        self.deferred.pop(uid, None)

    # --- what the inventory says --------------------------------------------------------------

    def capacity_news(self, everything: bool, grown: Iterable[str]) -> None:
        """Everything changed: every pending VM is ready. Else the VMs waiting on a flavor
        whose free capacity grew."""
        if everything:
            self.waiting.clear()
            self.ready.update(self.pending)
            return
        for flavor in grown:
            self.ready.update(self.waiting.pop(flavor, ()))

    def retry_all(self) -> None:
        self.ready.update(self.pending)

    def retry(self, uid: str) -> None:
        if uid in self.pending:
            self.ready.add(uid)

    # --- the scheduler's side -----------------------------------------------------------------

    def take_batch(self, now: float) -> list[PendingVM]:
        """The ready VMs, oldest first, leaving none ready. Skips VMs with a bind in flight
        (their bind's end decides) and VMs still backing off (they come back when due)."""
        for uid, at in list(self.deferred.items()):
            if at <= now:
                del self.deferred[uid]
                self.retry(uid)
        batch = sorted(
            (
                self.pending[u]
                for u in self.ready
                if u in self.pending and u not in self.binding and u not in self.deferred
            ),
            key=lambda e: (e.created, e.key),
        )
        self.ready.clear()
        return batch

    def next_due(self) -> float | None:
        """When the earliest deferred VM is due, if any is."""
        return min(self.deferred.values(), default=None)

    def refused(self, entry: PendingVM, flavors: Iterable[str]) -> None:
        for flavor in flavors:
            self.waiting.setdefault(flavor, set()).add(entry.uid)

    def bind_started(self, entry: PendingVM) -> None:
        self.binding.add(entry.uid)

    def bind_ended(self, entry: PendingVM, retry_at: float | None = None) -> None:
        """The bind is over: bound (the VM leaves when the watch shows it placed; until then it
        is looked at again and found placed), lost a race (looked at again now), or failed
        (looked at again at retry_at)."""
        self.binding.discard(entry.uid)
        if entry.uid not in self.pending:
            return
        if retry_at is None:
            self.ready.add(entry.uid)
        else:
            self.deferred[entry.uid] = retry_at

    def tried(self, entry: PendingVM, generation: int | None) -> None:
        entry.generation = generation
