"""Conditions in the metav1.Condition form, and the Ready summary, shared by the controller
and the node plugin. Pure: the caller passes the time.

Ready follows kstatus: True when the VM is where its spec asks (running, or cleanly stopped),
False with the first unmet condition's reason and message otherwise, so Argo CD and Flux show
health from it alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pcipt import constants as c
from pcipt.api.v1alpha1 import Condition


def set_condition(
    conditions: Iterable[Condition],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """Return `conditions` with `type_` set; lastTransitionTime moves only when status does."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    old = get_condition(conditions, type_)
    keep_time = old is not None and old.status == st and old.last_transition_time is not None
    new = Condition(
        type=type_,
        status=st,
        reason=reason,
        message=message[:32000],
        last_transition_time=old.last_transition_time if keep_time and old else now,
        observed_generation=generation,
    )
    out = [x for x in conditions if x.type != type_] + [new]
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(out, key=lambda x: (order.get(x.type, len(order)), x.type))


CONDITION_ORDER = (c.COND_READY, c.COND_SCHEDULED, c.COND_DEVICES_BOUND, c.COND_DOMAIN_READY)


def get_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((x for x in conditions if x.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == "True"


def same_conditions(a: Iterable[Condition], b: Iterable[Condition]) -> bool:
    """Equal apart from timestamps: whether writing `b` over `a` would change anything."""

    def key(cs: Iterable[Condition]) -> list[tuple[str, str, str, str, int | None]]:
        return sorted((x.type, x.status, x.reason, x.message, x.observed_generation) for x in cs)

    return key(a) == key(b)


def ready_condition(conditions: Iterable[Condition], *, running: bool) -> tuple[bool, str, str]:
    """The Ready summary (status, reason, message) from the other conditions."""
    conds = list(conditions)
    node = get_condition(conds, c.COND_NODE_ALIVE)
    if node is not None and node.status == "False":
        return False, node.reason or c.REASON_NODE_NOT_ALIVE, node.message
    health = get_condition(conds, c.COND_DEVICES_HEALTHY)
    if health is not None and health.status == "False":
        return False, health.reason or c.REASON_DEVICE_UNHEALTHY, health.message
    wanted = [c.COND_SCHEDULED, c.COND_DEVICES_BOUND, c.COND_DOMAIN_READY]
    for t in wanted:
        cond = get_condition(conds, t)
        if cond is None:
            if t == c.COND_DOMAIN_READY:
                return False, "DomainPending", "waiting for the node plugin to start the VM"
            return False, "Pending", f"{t} not reported yet"
        if cond.status != "True":
            if t == c.COND_DOMAIN_READY and not running and cond.reason == c.REASON_STOPPED:
                return True, "Stopped", "the VM is stopped, as spec.running asks"
            return False, cond.reason or t, cond.message
    return True, "Running" if running else "Stopped", "the VM is running" if running else "stopped"
