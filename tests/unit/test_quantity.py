from __future__ import annotations

from decimal import Decimal

import pytest

from pcipt.quantity import QuantityError, parse_quantity, quantity_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4Gi", 4 * 1024**3),
        ("512Mi", 512 * 1024**2),
        ("2G", 2 * 10**9),
        ("1.5Gi", int(1.5 * 1024**3)),
        ("1e3", 1000),
        ("1E3", 1000),
        (1024, 1024),
        ("100m", Decimal("0.1")),
        ("+3k", 3000),
        (".5Ki", 512),
    ],
)
def test_parse_quantity(value: int | str, expected: int | Decimal) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("value", ["", "lots", "4GB", "Gi", "4 Gi", "--1", True])
def test_parse_refuses_non_quantities(value: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(value)  # type: ignore[arg-type]


def test_bytes_round_up() -> None:
    assert quantity_bytes("1500m") == 2
    assert quantity_bytes("8Gi") == 8 * 1024**3
