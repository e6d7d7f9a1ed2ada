"""Time as the Kubernetes API writes it: UTC, RFC 3339.

`timestamp` is metav1.Time (whole seconds: conditions, Events, claims); `micro_timestamp` is
metav1.MicroTime (Lease renewTime and acquireTime must carry microseconds).
"""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def timestamp(t: datetime | None = None) -> str:
    return (t or now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp(t: datetime | None = None) -> str:
    return (t or now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(value: str) -> datetime:
    """An API timestamp (either precision) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
