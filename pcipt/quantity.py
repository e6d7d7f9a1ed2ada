"""Kubernetes resource quantities (`4Gi`, `512M`, `1e9`, `1024`) to exact numbers.

Pure. Only the forms the API server accepts for a quantity are accepted here, so a value that
passes local validation is never refused by the server, and the other way round.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

_QUANTITY_RE: Final = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_BINARY: Final = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL: Final = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}


class QuantityError(ValueError):
    """A value that is not a Kubernetes quantity."""


def parse_quantity(value: int | str) -> Decimal:
    """Return the quantity's exact value (bytes, for memory)."""
    if isinstance(value, bool):
        raise QuantityError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    m = _QUANTITY_RE.match(value.strip())
    if m is None:
        raise QuantityError(f"{value!r} is not a quantity such as 4Gi, 512Mi or 2G")
    try:
        number = Decimal(m.group("num"))
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise QuantityError(f"{value!r} is not a quantity") from e
    suffix = m.group("suffix") or ""
    if suffix in _BINARY:
        return number * (Decimal(1024) ** _BINARY[suffix])
    if suffix in _DECIMAL:
        return number * (Decimal(10) ** _DECIMAL[suffix])
    return number * (Decimal(10) ** int(suffix[1:]))


def quantity_bytes(value: int | str) -> int:
    """A memory quantity in whole bytes (rounded up, as the kubelet does)."""
    q = parse_quantity(value)
    whole = int(q)
    return whole if q == whole else whole + 1
