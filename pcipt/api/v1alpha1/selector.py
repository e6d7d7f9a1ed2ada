"""The device selector: the constraints a flavor (and, on top of it, a VM's request) puts on
which PciDevices qualify. Set fields AND together; entries of one list OR.

Types only; evaluating a selector against a device is `pcipt.selectors`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from pcipt.api.v1alpha1.meta import (
    ApiModel,
    LabelSelector,
    cel,
    cel_matches,
    cel_value_message,
    k8s,
)
from pcipt.pci import CLASS_PREFIX_PATTERN, HEX_ID_PATTERN

HexId = Annotated[
    str,
    Field(
        max_length=6,
        json_schema_extra=k8s(
            cel(
                cel_matches(HEX_ID_PATTERN),
                message_expression=cel_value_message(
                    "is not a PCI ID: use 4 hex digits, e.g. 10de"
                ),
            )
        ),
    ),
]
"""A 16-bit PCI vendor or product ID as 4 hex digits (either letter case)."""

ClassPrefix = Annotated[
    str,
    Field(
        max_length=6,
        json_schema_extra=k8s(
            cel(
                cel_matches(CLASS_PREFIX_PATTERN),
                message_expression=cel_value_message(
                    "is not a class-code prefix: use 2, 4 or 6 hex digits, "
                    "e.g. 03 (display), 0302 (3D controller), 020000 (Ethernet)"
                ),
            )
        ),
    ),
]
"""A PCI class code or a prefix of it: class (2 hex digits), class+subclass (4) or all 6."""

ADDRESS_GLOB_PATTERN = r"^[0-9a-fA-F*?!:.\-\[\]]+$"

AddressGlob = Annotated[
    str,
    Field(
        max_length=64,
        json_schema_extra=k8s(
            cel(
                cel_matches(ADDRESS_GLOB_PATTERN),
                message_expression=cel_value_message(
                    "is not an address pattern: use hex digits, ':', '.' and the wildcards "
                    "*, ? and [...], e.g. 0000:3b:*.*"
                ),
            )
        ),
    ),
]
"""A shell-style pattern over the canonical address, e.g. `0000:3b:*.*` or `*:0[2-3]:00.?`."""

SriovRole = Literal["PF", "VF", "None"]
ShortName = Annotated[str, Field(min_length=1, max_length=253)]


def _check_pattern(values: list[str] | None, pattern: str, what: str) -> list[str] | None:
    for v in values or []:
        if not re.match(pattern, v):
            raise ValueError(f"{v!r} is not {what}")
    return values


class DeviceSelector(ApiModel):
    """Which devices qualify. Every field that is set must match (AND); a device matches a list
    field when it matches any entry (OR). An empty selector matches every device."""

    vendor_ids: list[HexId] | None = Field(default=None, alias="vendorIDs", max_length=32)
    """PCI vendor IDs, e.g. 10de (NVIDIA), 8086 (Intel), 15b3 (Mellanox)."""
    product_ids: list[HexId] | None = Field(default=None, alias="productIDs", max_length=64)
    """PCI device (product) IDs, e.g. 20b0 (A100 SXM4 40GB)."""
    class_codes: list[ClassPrefix] | None = Field(default=None, max_length=32)
    """PCI class-code prefixes: 03 for any display controller, 0108 for NVMe, 0200 for Ethernet."""
    drivers: list[ShortName] | None = Field(default=None, max_length=32)
    """Kernel drivers the device is bound to on its host, e.g. vfio-pci, nvidia, mlx5_core."""
    sriov_roles: list[SriovRole] | None = Field(default=None, max_length=3)
    """SR-IOV role: PF (physical function), VF (virtual function) or None (not SR-IOV)."""
    physical_networks: list[ShortName] | None = Field(default=None, max_length=32)
    """Physical networks a NIC is cabled to, as the host's device spec declares them."""
    addresses: list[AddressGlob] | None = Field(default=None, max_length=64)
    """Shell-style patterns over the PCI address, e.g. 0000:3b:*.*."""
    attributes: LabelSelector | None = None
    """Requirements on the free attributes the host's device spec attaches to a device."""
    node_selector: LabelSelector | None = None
    """Requirements on the labels of the Node the device is on."""

    @field_validator("vendor_ids", "product_ids")
    @classmethod
    def _hex_ids(cls, v: list[str] | None) -> list[str] | None:
        return _check_pattern(v, HEX_ID_PATTERN, "a PCI ID: use 4 hex digits, e.g. 10de")

    @field_validator("class_codes")
    @classmethod
    def _class_codes(cls, v: list[str] | None) -> list[str] | None:
        return _check_pattern(
            v, CLASS_PREFIX_PATTERN, "a class-code prefix of 2, 4 or 6 hex digits"
        )

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        return _check_pattern(v, ADDRESS_GLOB_PATTERN, "an address pattern such as 0000:3b:*.*")
