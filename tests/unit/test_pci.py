from __future__ import annotations

import pytest

from pcipt.api.v1alpha1 import pcidevice_name
from pcipt.pci import (
    PciAddress,
    PciAddressError,
    canonical_address,
    is_canonical_address,
    normalize_hex_id,
)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0000:3b:00.0", "0000:3b:00.0"),
        ("0000:3B:1F.7", "0000:3b:1f.7"),
        ("3b:00.1", "0000:3b:00.1"),
        ("0000:00:00.0", "0000:00:00.0"),
        ("1:2:3.4", "0001:02:03.4"),
        (" 0000:af:02.3 ", "0000:af:02.3"),
    ],
)
def test_parse_gives_the_kernel_spelling(text: str, canonical: str) -> None:
    assert canonical_address(text) == canonical


@pytest.mark.parametrize(
    "text",
    ["", "0000:zz:1f.9", "0000:3b:20.0", "0000:3b:00.8", "3b:00", "0000:3b:00:0", "00000:3b:00.0"],
)
def test_parse_refuses_what_is_not_an_address(text: str) -> None:
    with pytest.raises(PciAddressError, match="is not a PCI address"):
        PciAddress.parse(text)


def test_addresses_sort_as_the_kernel_lists_them() -> None:
    addrs = [
        PciAddress.parse(a)
        for a in ["0000:3b:00.1", "0000:0a:00.0", "0001:00:00.0", "0000:3b:00.0"]
    ]
    assert [str(a) for a in sorted(addrs)] == [
        "0000:0a:00.0",
        "0000:3b:00.0",
        "0000:3b:00.1",
        "0001:00:00.0",
    ]


def test_slot_and_dashed_forms() -> None:
    a = PciAddress.parse("0000:3b:02.5")
    assert a.slot == "0000:3b:02" and a.dashed() == "0000-3b-02-5"


def test_canonical_check_is_strict_about_case_and_width() -> None:
    assert is_canonical_address("0000:3b:00.0")
    assert not is_canonical_address("0000:3B:00.0")
    assert not is_canonical_address("3b:00.0")


def test_pcidevice_name_joins_node_and_dashed_address() -> None:
    assert pcidevice_name("node-a", "0000:3B:00.0") == "node-a.0000-3b-00-0"


@pytest.mark.parametrize(
    ("raw", "norm"), [("0x10DE", "10de"), ("10de", "10de"), (" 8086 ", "8086")]
)
def test_hex_ids_normalize(raw: str, norm: str) -> None:
    assert normalize_hex_id(raw) == norm
