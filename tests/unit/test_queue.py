"""The scheduling queue on its own: what becomes ready when, oldest first, and back-off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.queue import SchedulingQueue
from pcipt.api.v1alpha1 import PassthroughVM

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def vm(name: str, *, age: int = 0, generation: int = 1, node: str | None = None) -> PassthroughVM:
    status: dict[str, object] = {"nodeName": node} if node else {}
    return PassthroughVM.model_validate(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PassthroughVM",
            "metadata": {
                "name": name,
                "namespace": "t",
                "uid": f"uid-{name}",
                "generation": generation,
                "creationTimestamp": (T0 + timedelta(seconds=age)).isoformat(),
            },
            "spec": {"cpu": {"cores": 1}, "memory": "1Gi", "devices": []},
            "status": status,
        }
    )


def names(q: SchedulingQueue, now: float = 0.0) -> list[str]:
    return [e.key[1] for e in q.take_batch(now)]


def test_new_vms_are_ready_oldest_first_and_taken_once() -> None:
    q = SchedulingQueue()
    assert q.offer(vm("young", age=5)) and q.offer(vm("old", age=1))
    assert names(q) == ["old", "young"]
    assert names(q) == []  # taken: nothing ready until something happens


def test_our_own_status_writes_do_not_make_a_vm_ready_again_but_a_spec_change_does() -> None:
    q = SchedulingQueue()
    q.offer(vm("a"))
    (entry,) = q.take_batch(0)
    q.tried(entry, 1)
    assert not q.offer(vm("a"))  # same generation: a status write of ours
    assert q.offer(vm("a", generation=2))
    assert names(q) == ["a"]


def test_a_placed_or_forgotten_vm_leaves_the_queue() -> None:
    q = SchedulingQueue()
    q.offer(vm("a"))
    q.offer(vm("b"))
    assert not q.offer(vm("a", node="n1"))
    q.forget("uid-b")
    assert len(q) == 0 and names(q) == []


def test_refused_vms_wait_on_their_flavors_until_capacity_grows() -> None:
    q = SchedulingQueue()
    q.offer(vm("gpu-vm", age=1))
    q.offer(vm("nic-vm", age=2))
    gpu, nic = q.take_batch(0)
    q.refused(gpu, {"a100"})
    q.refused(nic, {"vf"})
    q.capacity_news(False, {"other"})
    assert names(q) == []
    q.capacity_news(False, {"vf"})
    assert names(q) == ["nic-vm"]
    q.capacity_news(True, set())  # everything changed: all pending VMs
    assert names(q) == ["gpu-vm", "nic-vm"]


def test_a_vm_with_a_bind_in_flight_is_not_decided_again() -> None:
    q = SchedulingQueue()
    q.offer(vm("a"))
    (entry,) = q.take_batch(0)
    q.bind_started(entry)
    q.retry_all()
    assert names(q) == []
    q.bind_ended(entry)  # lost a race: look again now
    assert names(q) == ["a"]


def test_a_failed_bind_defers_the_vm_until_its_back_off_ends() -> None:
    q = SchedulingQueue()
    q.offer(vm("a"))
    (entry,) = q.take_batch(0)
    q.bind_started(entry)
    q.bind_ended(entry, retry_at=10.0)
    assert q.next_due() == 10.0
    q.retry_all()  # even when everything changed
    assert names(q, now=9.0) == []
    assert names(q, now=10.0) == ["a"]
    assert q.next_due() is None


def test_a_bound_vm_forgotten_before_its_bind_ends_is_not_brought_back() -> None:
    q = SchedulingQueue()
    q.offer(vm("a"))
    (entry,) = q.take_batch(0)
    q.bind_started(entry)
    q.forget(entry.uid)
    q.bind_ended(entry)
    assert names(q) == [] and len(q) == 0
