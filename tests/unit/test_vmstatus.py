"""What the controller writes to a VM it cannot place: once per change of the reasons, not for
every count that moves while other VMs bind (a write storm that also races the binds)."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.scheduling import NodeRefusal, Refusal
from controller.vmstatus import pending_status
from pcipt.api.v1alpha1 import PassthroughVM
from tests.unit.schedfix import vm

NOW = datetime(2026, 12, 2, tzinfo=UTC)
REASON = "have no free a100 (need 1): claimed by other VMs"


def refusal(details: str) -> Refusal:
    return Refusal(
        message=f"0/1 nodes are available: 1 node(s) {REASON}.",
        reason="Unschedulable",
        nodes=(NodeRefusal("node-a", (REASON,), (details,)),),
        total_nodes=1,
    )


def applied(v: PassthroughVM, status: dict) -> PassthroughVM:  # type: ignore[type-arg]
    body = v.model_dump(by_alias=True, mode="json")
    body["status"] = {**body["status"], **status}
    return PassthroughVM.model_validate(body)


def test_a_refusal_is_written_once_and_not_again_for_moving_counts() -> None:
    v = vm([{"name": "gpu", "flavor": "a100"}])
    first = pending_status(v, refusal("gpu (a100): 10 claimed by other VMs"), NOW)
    assert first is not None
    v = applied(v, first)
    assert (
        pending_status(
            v, refusal("gpu (a100): 9 claimed by other VMs, 1 being bound to other VMs"), NOW
        )
        is None
    )
    changed = Refusal(
        message="0/1 nodes are available: 1 node(s) not alive.",
        reason="Unschedulable",
        nodes=(NodeRefusal("node-a", ("not alive",)),),
        total_nodes=1,
    )
    assert pending_status(v, changed, NOW) is not None
