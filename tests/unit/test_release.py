"""After a VM: a released device held back while it is scrubbed and quarantined, and the
evacuation rules (when a node is known to be down, what the VM's status says afterwards)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from controller.evacuation import Evacuator, evacuate_after
from controller.inventory import Inventory
from controller.scheduling import (
    Device,
    Placement,
    Refusal,
    schedule,
)
from controller.vmstatus import evacuated_status
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice
from pcipt.release import HELD_QUARANTINE, HELD_SCRUB_FAILED, HELD_SCRUBBING
from tests.unit.schedfix import flavor, inp, vm

NODE = "node-a"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def device(
    release: dict[str, Any] | None = None, scrub: dict[str, Any] | None = None, **status: Any
) -> PciDevice:
    spec: dict[str, Any] = {"nodeName": NODE, "address": "0000:3b:00.0"}
    if release is not None:
        spec["release"] = {"id": "r1", "vm": "t/old", "uid": "old", **release}
    st: dict[str, Any] = {"vendorID": "10de", "productID": "20b0", "classCode": "030200"}
    if scrub is not None:
        st["scrub"] = {"releaseID": "r1", **scrub}
    st.update(status)
    return PciDevice.model_validate(
        {
            "metadata": {"name": f"{NODE}.0000-3b-00-0", "resourceVersion": "5"},
            "spec": spec,
            "status": st,
        }
    )


def refused_for(d: Device) -> list[str]:
    got = schedule(inp(vm([{"name": "gpu", "flavor": "a100"}]), [d], [flavor()]))
    assert isinstance(got, Refusal), got
    return [r for n in got.nodes for r in n.reasons]


def test_a_device_released_for_scrubbing_is_held_until_the_node_answers_that_release() -> None:
    now = T0.timestamp()
    waiting = Device.from_model(device({"scrub": True}), now)
    assert waiting.held_back == HELD_SCRUBBING
    assert any("being scrubbed after release" in r for r in refused_for(waiting))
    # An answer to an older release does not count.
    old = device({"scrub": True}, {"phase": "Done", "releaseID": "r0"})
    assert Device.from_model(old, now).held_back == HELD_SCRUBBING
    failed = Device.from_model(device({"scrub": True}, {"phase": "Failed"}), now)
    assert failed.held_back == HELD_SCRUB_FAILED
    assert any("whose scrub after release failed" in r for r in refused_for(failed))
    done = Device.from_model(device({"scrub": True}, {"phase": "Done"}), now)
    assert done.held_back is None
    assert isinstance(
        schedule(inp(vm([{"name": "gpu", "flavor": "a100"}]), [done], [flavor()])), Placement
    )


def test_a_release_without_scrub_only_waits_for_its_quarantine() -> None:
    until = stamp(T0 + timedelta(seconds=60))
    d = device({"scrub": False, "quarantineUntil": until})
    assert Device.from_model(d, T0.timestamp()).held_back == HELD_QUARANTINE
    assert any(
        "in quarantine after release" in r
        for r in refused_for(Device.from_model(d, T0.timestamp()))
    )
    assert Device.from_model(d, T0.timestamp() + 61).held_back is None
    # No quarantine and no scrub: offered at once.
    assert Device.from_model(device({"scrub": False}), T0.timestamp()).held_back is None


def test_the_inventory_ends_a_quarantine_by_the_clock_and_notes_the_capacity() -> None:
    now = [T0.timestamp()]
    inv = Inventory(node_dead_after=3600, clock=lambda: now[0])
    inv.upsert_flavor(flavor())
    inv.renew_lease(NODE, now[0])
    until = stamp(T0 + timedelta(seconds=30))
    inv.upsert_device(device({"scrub": False, "quarantineUntil": until}))
    assert inv.free["a100"][NODE] == 0
    inv.take_news()
    now[0] += 10
    inv.tick()
    assert inv.free["a100"][NODE] == 0
    now[0] += 25
    inv.tick()
    assert inv.free["a100"][NODE] == 1
    assert "a100" in inv.take_news()[1]  # waiting VMs are tried again


def placed_vm(policy: str = "Restart") -> PassthroughVM:
    return PassthroughVM.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "t", "uid": "u1", "generation": 2},
            "spec": {"memory": "1Gi", "evacuationPolicy": policy},
            "status": {
                "phase": "Running",
                "nodeName": NODE,
                "devices": [
                    {"request": "gpu", "pciDevice": "d1", "address": "0000:3b:00.0"},
                ],
                "deviceSummary": "1/1",
                "compute": {"vcpus": 1, "memoryMiB": 1024},
                "domain": {"name": "t_vm", "state": "running"},
                "conditions": [
                    {"type": c.COND_DOMAIN_READY, "status": "True", "reason": "Running"},
                    {"type": c.COND_NODE_ALIVE, "status": "False", "reason": "NodeNotAlive"},
                    {"type": c.COND_SCHEDULED, "status": "True", "reason": "Scheduled"},
                ],
            },
        }
    )


def test_an_evacuated_vms_status_keeps_nothing_of_the_old_node_but_the_record() -> None:
    st = evacuated_status(placed_vm(), NODE, "it is down", ["d1"], T0)
    assert st["phase"] == "Pending" and st["nodeName"] is None
    assert st["devices"] == [] and st["compute"] is None and st["domain"] is None
    assert st["evacuation"] == {
        "fromNode": NODE,
        "time": "2026-12-01T12:00:00Z",
        "reason": "it is down",
        "devices": ["d1"],
    }
    conds = {x["type"]: x for x in st["conditions"]}
    assert c.COND_DOMAIN_READY not in conds and c.COND_NODE_ALIVE not in conds
    assert conds[c.COND_SCHEDULED]["reason"] == c.REASON_EVACUATED
    assert conds[c.COND_READY]["status"] == "False"
    assert conds[c.COND_READY]["reason"] == c.REASON_EVACUATED
    PassthroughVM.model_validate({**placed_vm().to_dict(), "status": st})


def evacuator(inv: Inventory) -> Evacuator:
    return Evacuator(
        inv,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        compute_ledger=None,  # type: ignore[arg-type]
        spawn=lambda coro: None,
        in_flight=set,
        reconsider=lambda vm: None,
    )


def test_a_node_is_known_down_only_when_its_lease_lapsed_and_it_is_fenced_or_opted_in() -> None:
    now = [T0.timestamp()]
    inv = Inventory(node_dead_after=40, clock=lambda: now[0])
    ev = evacuator(inv)
    inv.renew_lease(NODE, now[0])
    # Tainted but still renewing: a live node is never evacuated.
    inv.set_out_of_service(NODE, f"{c.TAINT_OUT_OF_SERVICE}=nodeshutdown:NoExecute")
    assert ev.down_reason(NODE) is None
    now[0] += 41
    inv.tick()
    why = ev.down_reason(NODE)
    assert why is not None and c.TAINT_OUT_OF_SERVICE in why and "41s" in why
    # Not tainted, not opted in: merely not alive is not enough (a partition looks the same).
    inv.set_out_of_service(NODE, None)
    assert ev.down_reason(NODE) is None
    inv.set_node_labels(NODE, {c.LABEL_EVACUATE_AFTER: "120"})
    assert ev.down_reason(NODE) is None
    now[0] += 80
    why = ev.down_reason(NODE)
    assert why is not None and "evacuates after 120s" in why


def test_the_opt_in_label_must_be_a_positive_number() -> None:
    assert evacuate_after({c.LABEL_EVACUATE_AFTER: "300"}) == 300
    for bad in ("", "0", "-5", "soon"):
        assert evacuate_after({c.LABEL_EVACUATE_AFTER: bad}) is None
    assert evacuate_after({}) is None


def test_an_out_of_service_node_is_refused_with_that_reason_even_when_alive() -> None:
    now = T0.timestamp()
    inv = Inventory(clock=lambda: now)
    inv.upsert_flavor(flavor())
    inv.upsert_device(device())
    inv.renew_lease(NODE, now)
    inv.set_out_of_service(NODE, c.TAINT_OUT_OF_SERVICE + ":NoExecute")
    got = schedule(inv.scheduling_input(vm([{"name": "gpu", "flavor": "a100"}]), "best-fit"))
    assert isinstance(got, Refusal) and "1 node(s) out of service" in got.message
    inv.set_out_of_service(NODE, None)
    got = schedule(inv.scheduling_input(vm([{"name": "gpu", "flavor": "a100"}]), "best-fit"))
    assert isinstance(got, Placement)
