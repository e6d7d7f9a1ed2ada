"""The pure scheduler: a table of cases, one rule each, plus property-based checks that a
placement never uses a device twice and always keeps every hard constraint."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.scheduling import (
    Claim,
    NodeFacts,
    Placement,
    Refusal,
    SchedulingInput,
    free_counts,
    request_problems,
    schedule,
)
from controller.vmstatus import scheduled_status
from tests.unit.schedfix import dev, flavor, inp, nic_flavor, other_claim, vf, vm

A, B, C = "node-a", "node-b", "node-c"


@dataclass
class Expect:
    node: str | None = None
    """Expected node; None with refusal set means refused."""
    addresses: set[str] | None = None
    companions: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    refusal: str | None = None
    """Expected Refusal.reason."""
    message: str | None = None
    """A piece of the refusal message (or of a skip reason)."""


Case = tuple[Callable[[], SchedulingInput], Expect]
GPU = [{"name": "gpu", "flavor": "a100"}]


def gpus(n: int, **kw: object) -> list[dict[str, object]]:
    return [{"name": "gpu", "flavor": "a100", "count": n, **kw}]


CASES: dict[str, Case] = {
    # --- matching -------------------------------------------------------------------------
    "single-gpu-on-only-node": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0")]),
        Expect(A, {"0000:3b:00.0"}),
    ),
    "vendor-mismatch-refused": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0", vendor="1002")]),
        Expect(refusal="Unschedulable", message="1 node(s) have no free a100 (need 1)"),
    ),
    "product-mismatch-refused": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0", product="20b5")]),
        Expect(refusal="Unschedulable", message="have no free a100"),
    ),
    "class-prefix-selects-display-controllers": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0", cls="010802"), dev(A, "0000:3c:00.0", cls="030200")],
            [flavor(selector={"classCodes": ["03"]})],
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "driver-selector": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0", driver="nvidia"), dev(A, "0000:3c:00.0")],
            [flavor(selector={"drivers": ["vfio-pci"]})],
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "request-selector-narrows-the-flavor": (
        lambda: inp(
            vm([{"name": "gpu", "flavor": "any", "selector": {"productIDs": ["20b5"]}}]),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0", product="20b5")],
            [flavor("any", selector={"vendorIDs": ["10de"]})],
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "attribute-in": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", attrs={"tier": "bronze"}),
                dev(A, "0000:3c:00.0", attrs={"tier": "gold"}),
            ],
            [
                flavor(
                    selector={
                        "attributes": {
                            "matchExpressions": [
                                {"key": "tier", "operator": "In", "values": ["gold"]}
                            ]
                        }
                    }
                )
            ],
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "attribute-notin-and-doesnotexist": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", attrs={"broken": "yes"}),
                dev(A, "0000:3c:00.0", attrs={"tier": "x"}),
                dev(A, "0000:3d:00.0"),
            ],
            [
                flavor(
                    selector={
                        "attributes": {
                            "matchExpressions": [
                                {"key": "broken", "operator": "DoesNotExist"},
                                {"key": "tier", "operator": "NotIn", "values": ["x"]},
                            ]
                        }
                    }
                )
            ],
        ),
        Expect(A, {"0000:3d:00.0"}),
    ),
    "address-glob-selector": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:af:00.0")],
            [flavor(selector={"addresses": ["0000:af:*.*"]})],
        ),
        Expect(A, {"0000:af:00.0"}),
    ),
    "pinned-address-wins-over-best-fit": (
        lambda: inp(
            vm([{"name": "gpu", "flavor": "a100", "address": "0000:3c:00.0"}]),
            [dev(A, "0000:3b:00.0"), dev(B, "0000:3c:00.0"), dev(B, "0000:3d:00.0")],
        ),
        Expect(B, {"0000:3c:00.0"}),
    ),
    "pinned-address-claimed-is-refused-with-the-address": (
        lambda: inp(
            vm([{"name": "gpu", "flavor": "a100", "address": "0000:3c:00.0"}]),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0", claim=other_claim())],
        ),
        Expect(refusal="Unschedulable", message="have no free a100 at 0000:3c:00.0"),
    ),
    "claimed-device-never-chosen": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0", claim=other_claim())]),
        Expect(refusal="Unschedulable", message="have no free a100 (need 1)"),
    ),
    "cordoned-device-never-chosen": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0", cordoned=True), dev(A, "0000:3c:00.0")]),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "unhealthy-device-never-chosen": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0", healthy=False)]),
        Expect(refusal="Unschedulable", message="have no free a100"),
    ),
    "dead-node-never-chosen": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0"), dev(B, "0000:3b:00.0")],
            nodes=[NodeFacts(A, alive=False), NodeFacts(B)],
        ),
        Expect(B, {"0000:3b:00.0"}),
    ),
    "only-dead-nodes-says-not-alive": (
        lambda: inp(vm(GPU), [dev(A, "0000:3b:00.0")], nodes=[NodeFacts(A, alive=False)]),
        Expect(refusal="Unschedulable", message="0/1 nodes are available: 1 node(s) not alive."),
    ),
    "vm-node-selector": (
        lambda: inp(
            vm(GPU, node_selector={"kubernetes.io/hostname": B}),
            [dev(A, "0000:3b:00.0"), dev(B, "0000:3b:00.0")],
        ),
        Expect(B, {"0000:3b:00.0"}),
    ),
    "flavor-node-selector-over-node-labels": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0"), dev(B, "0000:3b:00.0")],
            [
                flavor(
                    selector={
                        "vendorIDs": ["10de"],
                        "nodeSelector": {"matchLabels": {"zone": "z2"}},
                    }
                )
            ],
            nodes=[NodeFacts(A, {"zone": "z1"}), NodeFacts(B, {"zone": "z2"})],
        ),
        Expect(B, {"0000:3b:00.0"}),
    ),
    "own-claims-are-adopted-after-a-crash": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0"),
                dev(B, "0000:3b:00.0", claim=Claim("vm-uid", "tenant", "vm", "gpu", "a100")),
            ],
        ),
        Expect(B, {"0000:3b:00.0"}),
    ),
    "reserved-in-flight-device-is-not-chosen": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")],
            reserved=frozenset({"node-a.0000-3b-00-0"}),
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    # --- permission and limits --------------------------------------------------------------
    "namespace-not-permitted": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0")],
            [flavor(access={"namespaceSelector": {"matchLabels": {"gpu": "yes"}}})],
            ns_labels={"gpu": "no"},
        ),
        Expect(refusal="NotPermitted", message="namespace tenant may not use flavor a100"),
    ),
    "namespace-permitted-by-label": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0")],
            [flavor(access={"namespaceSelector": {"matchLabels": {"gpu": "yes"}}})],
            ns_labels={"gpu": "yes"},
        ),
        Expect(A, {"0000:3b:00.0"}),
    ),
    "max-per-vm": (
        lambda: inp(
            vm(gpus(3)),
            [dev(A, f"0000:3{i}:00.0") for i in range(4)],
            [flavor(limits={"maxPerVM": 2})],
        ),
        Expect(refusal="LimitExceeded", message="allows 2 per VM"),
    ),
    "max-per-namespace-counts-what-it-holds": (
        lambda: inp(
            vm(gpus(2)),
            [dev(A, f"0000:3{i}:00.0") for i in range(4)],
            [flavor(limits={"maxPerNamespace": 3})],
            usage={"a100": 2},
        ),
        Expect(
            refusal="LimitExceeded", message="namespace tenant holds 2 a100 and the VM needs 2 more"
        ),
    ),
    "max-per-namespace-within": (
        lambda: inp(
            vm(gpus(1)),
            [dev(A, f"0000:3{i}:00.0") for i in range(4)],
            [flavor(limits={"maxPerNamespace": 3})],
            usage={"a100": 2},
        ),
        Expect(A, {"0000:30:00.0"}),
    ),
    "trusted-needs-permission": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "trusted": True}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor()],
        ),
        Expect(refusal="NetworkNotAllowed", message="asks for a trusted VF"),
    ),
    "spoof-check-off-needs-permission": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "spoofCheck": False}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor()],
        ),
        Expect(refusal="NetworkNotAllowed", message="turns spoof checking off"),
    ),
    "spoof-check-off-allowed": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "spoofCheck": False}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor(networking={"allowSpoofCheckOff": True})],
        ),
        Expect(A, {"0000:5e:02.0"}),
    ),
    "min-tx-rate-needs-permission": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "minTxRate": 100}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor()],
        ),
        Expect(refusal="NetworkNotAllowed", message="reserves minTxRate 100 Mbps"),
    ),
    "max-tx-rate-above-the-flavors": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "maxTxRate": 2000}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor(networking={"maxTxRate": 1000})],
        ),
        Expect(refusal="NetworkNotAllowed", message="allows at most 1000 Mbps"),
    ),
    "no-rate-limit-where-the-flavor-caps-it": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "maxTxRate": 0}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor(networking={"maxTxRate": 1000})],
        ),
        Expect(refusal="NetworkNotAllowed", message="asks for no rate limit"),
    ),
    "link-state-needs-permission": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "linkState": "enable"}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor()],
        ),
        Expect(refusal="NetworkNotAllowed", message="sets linkState enable"),
    ),
    "rates-and-link-state-allowed": (
        lambda: inp(
            vm(
                networks=[
                    {
                        "name": "net",
                        "flavor": "vf",
                        "minTxRate": 100,
                        "maxTxRate": 500,
                        "linkState": "disable",
                    }
                ]
            ),
            [vf(A, "0000:5e:02.0")],
            [
                nic_flavor(
                    networking={"allowMinTxRate": True, "maxTxRate": 1000, "allowLinkState": True}
                )
            ],
        ),
        Expect(A, {"0000:5e:02.0"}),
    ),
    "vlan-outside-ranges": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "vlan": 300}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor(networking={"vlanRanges": ["100-199"]})],
        ),
        Expect(refusal="NetworkNotAllowed", message="VLAN 300, outside flavor vf's VLANs 100-199"),
    ),
    "missing-flavor": (
        lambda: inp(vm([{"name": "gpu", "flavor": "h100"}]), [dev(A, "0000:3b:00.0")]),
        Expect(refusal="FlavorNotFound", message="flavor h100 does not exist"),
    ),
    "network-on-a-gpu-flavor": (
        lambda: inp(vm(networks=[{"name": "net", "flavor": "a100"}]), [dev(A, "0000:3b:00.0")]),
        Expect(refusal="FlavorNotFound", message="networks need a flavor of deviceType nic"),
    ),
    # --- NUMA -------------------------------------------------------------------------------
    "numa-required-refused-when-split": (
        lambda: inp(
            vm(gpus(2, numaPolicy="required")),
            [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:af:00.0", numa=1)],
        ),
        Expect(refusal="Unschedulable", message="cannot place gpu on a single NUMA node"),
    ),
    "numa-required-takes-the-node-with-a-local-pair": (
        lambda: inp(
            vm(gpus(2, numaPolicy="required")),
            [
                dev(A, "0000:3b:00.0", numa=0),
                dev(A, "0000:af:00.0", numa=1),
                dev(A, "0000:b0:00.0", numa=1),
            ],
        ),
        Expect(A, {"0000:af:00.0", "0000:b0:00.0"}),
    ),
    "numa-preferred-falls-back-across-numa": (
        lambda: inp(
            vm(gpus(2, numaPolicy="preferred")),
            [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:af:00.0", numa=1)],
        ),
        Expect(A, {"0000:3b:00.0", "0000:af:00.0"}),
    ),
    "numa-preferred-prefers-a-node-with-a-local-set": (
        lambda: inp(
            vm(gpus(2, numaPolicy="preferred")),
            [
                dev(A, "0000:3b:00.0", numa=0),
                dev(A, "0000:af:00.0", numa=1),
                dev(B, "0000:3b:00.0", numa=1),
                dev(B, "0000:3c:00.0", numa=1),
                dev(B, "0000:3d:00.0", numa=0),
            ],
        ),
        Expect(B, {"0000:3b:00.0", "0000:3c:00.0"}),
    ),
    "numa-flavor-policy-applies-without-override": (
        lambda: inp(
            vm(gpus(2)),
            [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:af:00.0", numa=1)],
            [flavor(numaPolicy="required")],
        ),
        Expect(refusal="Unschedulable", message="single NUMA node"),
    ),
    "numa-none-takes-lowest-addresses": (
        lambda: inp(
            vm(gpus(2)),
            [
                dev(A, "0000:af:00.0", numa=1),
                dev(A, "0000:3b:00.0", numa=0),
                dev(A, "0000:b0:00.0", numa=1),
            ],
        ),
        Expect(A, {"0000:3b:00.0", "0000:af:00.0"}),
    ),
    "numa-unknown-cannot-satisfy-required": (
        lambda: inp(vm(gpus(1, numaPolicy="required")), [dev(A, "0000:3b:00.0", numa=-1)]),
        Expect(refusal="Unschedulable", message="single NUMA node"),
    ),
    "same-numa-gpu-and-nic": (
        lambda: inp(
            vm(GPU, [{"name": "net", "flavor": "vf"}], same_numa=["gpu", "net"]),
            [
                dev(A, "0000:3b:00.0", numa=0),
                dev(A, "0000:af:00.0", numa=1),
                vf(A, "0000:d8:02.0", numa=1),
            ],
            [flavor(), nic_flavor()],
        ),
        Expect(A, {"0000:af:00.0", "0000:d8:02.0"}),
    ),
    "same-numa-impossible": (
        lambda: inp(
            vm(GPU, [{"name": "net", "flavor": "vf"}], same_numa=["gpu", "net"]),
            [dev(A, "0000:3b:00.0", numa=0), vf(A, "0000:d8:02.0", numa=1)],
            [flavor(), nic_flavor()],
        ),
        Expect(refusal="Unschedulable", message="cannot place gpu, net on one NUMA node"),
    ),
    # GPUDirect: the GPU and the NIC under one root complex, though both roots have each.
    "same-pcie-root-gpu-and-nic": (
        lambda: inp(
            vm(GPU, [{"name": "net", "flavor": "vf"}], same_root=["gpu", "net"]),
            [
                dev(A, "0000:3b:00.0", root="pci0000:3a"),
                dev(A, "0000:af:00.0", root="pci0000:ae"),
                vf(A, "0000:d8:02.0", root="pci0000:ae"),
                vf(A, "0000:5e:02.0", root="pci0000:5d"),
            ],
            [flavor(), nic_flavor()],
        ),
        Expect(A, {"0000:af:00.0", "0000:d8:02.0"}),
    ),
    "same-pcie-root-impossible": (
        lambda: inp(
            vm(GPU, [{"name": "net", "flavor": "vf"}], same_root=["gpu", "net"]),
            [dev(A, "0000:3b:00.0", root="pci0000:3a"), vf(A, "0000:d8:02.0", root="pci0000:d7")],
            [flavor(), nic_flavor()],
        ),
        Expect(refusal="Unschedulable", message="cannot place gpu, net under one PCIe root"),
    ),
    "same-pcie-root-unknown-root-does-not-count": (
        lambda: inp(
            vm(GPU, [{"name": "net", "flavor": "vf"}], same_root=["gpu", "net"]),
            [dev(A, "0000:3b:00.0"), vf(A, "0000:d8:02.0")],
            [flavor(), nic_flavor()],
        ),
        Expect(refusal="Unschedulable", message="cannot place gpu, net under one PCIe root"),
    ),
    # --- IOMMU groups -----------------------------------------------------------------------
    "iommu-companion-claimed-with-the-gpu": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
                dev(
                    A,
                    "0000:3b:00.1",
                    vendor="10de",
                    product="1aef",
                    cls="040300",
                    group=7,
                    peers=("0000:3b:00.0",),
                ),
            ],
        ),
        Expect(A, {"0000:3b:00.0", "0000:3b:00.1"}, companions={"0000:3b:00.1"}),
    ),
    "iommu-group-partly-claimed-blocks-the-device": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
                dev(
                    A,
                    "0000:3b:00.1",
                    product="1aef",
                    cls="040300",
                    group=7,
                    peers=("0000:3b:00.0",),
                    claim=other_claim(),
                ),
            ],
        ),
        Expect(refusal="Unschedulable", message="have no free a100 (need 1)"),
    ),
    "iommu-unpublished-peer-blocks-the-device": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
                dev(A, "0000:3c:00.0", group=8),
            ],
        ),
        Expect(A, {"0000:3c:00.0"}),
    ),
    "iommu-two-gpus-one-group-one-counts": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
                dev(A, "0000:3b:00.1", group=7, peers=("0000:3b:00.0",)),
            ],
        ),
        Expect(A, {"0000:3b:00.0", "0000:3b:00.1"}, companions={"0000:3b:00.1"}),
    ),
    "iommu-clean-groups-are-preferred": (
        lambda: inp(
            vm(GPU),
            [
                dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
                dev(
                    A,
                    "0000:3b:00.1",
                    product="1aef",
                    cls="040300",
                    group=7,
                    peers=("0000:3b:00.0",),
                ),
                dev(A, "0000:af:00.0", group=9),
            ],
        ),
        Expect(A, {"0000:af:00.0"}),
    ),
    # --- SR-IOV -----------------------------------------------------------------------------
    "network-takes-a-vf-on-its-physnet": (
        lambda: inp(
            vm(
                networks=[
                    {"name": "net", "flavor": "vf", "physicalNetwork": "physnet3", "vlan": 120}
                ]
            ),
            [vf(A, "0000:5e:02.0", physnet="physnet2"), vf(A, "0000:5e:02.1", physnet="physnet3")],
            [nic_flavor()],
        ),
        Expect(A, {"0000:5e:02.1"}),
    ),
    "network-physnet-missing-says-which": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "physicalNetwork": "physnet9"}]),
            [vf(A, "0000:5e:02.0")],
            [nic_flavor()],
        ),
        Expect(refusal="Unschedulable", message="have no free vf VF on physnet9 (need 1)"),
    ),
    "physnet-from-device-spec-attribute": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "physicalNetwork": "physnet4"}]),
            [vf(A, "0000:5e:02.0", physnet=None, attrs={"physical_network": "physnet4"})],
            [nic_flavor()],
        ),
        Expect(A, {"0000:5e:02.0"}),
    ),
    "macvtap-needs-a-netdev": (
        lambda: inp(
            vm(networks=[{"name": "net", "flavor": "vf", "mode": "macvtap"}]),
            [vf(A, "0000:5e:02.0"), vf(A, "0000:5e:02.1", netdev="ens1f0v1")],
            [nic_flavor()],
        ),
        Expect(A, {"0000:5e:02.1"}),
    ),
    # --- optional requests --------------------------------------------------------------------
    "optional-skipped-when-none-free": (
        lambda: inp(
            vm(
                [
                    {"name": "gpu", "flavor": "a100"},
                    {"name": "extra", "flavor": "a100", "optional": True},
                ]
            ),
            [dev(A, "0000:3b:00.0")],
        ),
        Expect(A, {"0000:3b:00.0"}, skipped={"extra"}, message="have no free a100 (need 1)"),
    ),
    "optional-satisfied-when-free": (
        lambda: inp(
            vm(
                [
                    {"name": "gpu", "flavor": "a100"},
                    {"name": "extra", "flavor": "a100", "optional": True},
                ]
            ),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")],
        ),
        Expect(A, {"0000:3b:00.0", "0000:3c:00.0"}),
    ),
    "optional-prefers-the-node-that-can-satisfy-it": (
        lambda: inp(
            vm(
                [
                    {"name": "gpu", "flavor": "a100"},
                    {"name": "extra", "flavor": "a100", "optional": True},
                ]
            ),
            [dev(A, "0000:3b:00.0"), dev(B, "0000:3b:00.0"), dev(B, "0000:3c:00.0")],
        ),
        Expect(B, {"0000:3b:00.0", "0000:3c:00.0"}),
    ),
    "optional-skipped-by-namespace-limit": (
        lambda: inp(
            vm(
                [
                    {"name": "gpu", "flavor": "a100"},
                    {"name": "extra", "flavor": "a100", "optional": True},
                ]
            ),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")],
            [flavor(limits={"maxPerNamespace": 1})],
        ),
        Expect(A, {"0000:3b:00.0"}, skipped={"extra"}, message="at its a100 limit"),
    ),
    "optional-only-vm-boots-without-devices": (
        lambda: inp(
            vm([{"name": "extra", "flavor": "a100", "optional": True}]),
            [dev(A, "0000:3b:00.0", claim=other_claim())],
        ),
        Expect(A, set(), skipped={"extra"}),
    ),
    # --- scoring ----------------------------------------------------------------------------
    "best-fit-takes-the-fullest-node": (
        lambda: inp(
            vm(GPU), [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0"), dev(B, "0000:3b:00.0")]
        ),
        Expect(B, {"0000:3b:00.0"}),
    ),
    "spread-takes-the-emptiest-node": (
        lambda: inp(
            vm(GPU),
            [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0"), dev(B, "0000:3b:00.0")],
            policy="spread",
        ),
        Expect(A, {"0000:3b:00.0"}),
    ),
    "ties-broken-by-node-name": (
        lambda: inp(vm(GPU), [dev(C, "0000:3b:00.0"), dev(B, "0000:3b:00.0")]),
        Expect(B, {"0000:3b:00.0"}),
    ),
    # --- refusal text -------------------------------------------------------------------------
    "refusal-aggregates-like-kube-scheduler": (
        lambda: inp(
            vm(gpus(2, numaPolicy="required")),
            [
                dev(A, "0000:3b:00.0"),
                dev(B, "0000:3b:00.0"),
                dev(C, "0000:3b:00.0", numa=0),
                dev(C, "0000:af:00.0", numa=1),
                dev("node-d", "0000:3b:00.0"),
                dev("node-e", "0000:3b:00.0"),
            ],
            nodes=[NodeFacts("node-e", alive=False)],
        ),
        Expect(
            refusal="Unschedulable",
            message=(
                "0/5 nodes are available: 3 node(s) have only 1 free a100 (need 2); "
                "1 node(s) cannot place gpu on a single NUMA node (at most 1 free a100 on one); "
                "1 node(s) not alive."
            ),
        ),
    ),
}


@pytest.mark.parametrize(("build", "want"), list(CASES.values()), ids=list(CASES))
def test_case(build: Callable[[], SchedulingInput], want: Expect) -> None:
    got = schedule(build())
    if want.refusal is not None:
        assert isinstance(got, Refusal), got
        assert got.reason == want.refusal
        assert want.message is not None and want.message in got.message, got.message
        return
    assert isinstance(got, Placement), got
    assert got.node == want.node
    assert {a.address for a in got.assignments} == want.addresses
    assert {a.address for a in got.assignments if a.companion} == want.companions
    assert {name for name, _ in got.skipped} == want.skipped
    if want.skipped and want.message:
        assert any(want.message in why for _, why in got.skipped), got.skipped


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_refusal_lists_per_node_reasons_with_details() -> None:
    got = schedule(
        inp(
            vm(gpus(2)),
            [
                dev(A, "0000:3b:00.0"),
                dev(A, "0000:3c:00.0", claim=other_claim()),
                dev(A, "0000:3d:00.0", healthy=False),
            ],
        )
    )
    assert isinstance(got, Refusal)
    (node,) = got.nodes
    assert node.node == A and node.reasons == (
        "have only 1 free a100 (need 2): claimed by other VMs, unhealthy",
    )
    assert node.details == ("gpu (a100): 1 claimed by other VMs, 1 unhealthy",)


def test_companion_assignment_names_the_request_and_no_flavor() -> None:
    got = schedule(CASES["iommu-companion-claimed-with-the-gpu"][0]())
    assert isinstance(got, Placement)
    companion = next(a for a in got.assignments if a.companion)
    assert companion.request == "gpu" and companion.flavor is None


def test_network_assignments_are_marked() -> None:
    got = schedule(CASES["network-takes-a-vf-on-its-physnet"][0]())
    assert isinstance(got, Placement)
    assert all(a.network for a in got.assignments)


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_whatever_the_input_order(name: str) -> None:
    base = CASES[name][0]()
    devices = list(base.devices)
    results = set()
    for seed in range(5):
        random.Random(seed).shuffle(devices)
        results.add(repr(schedule(replace(base, devices=list(devices)))))
    assert len(results) == 1


# --- properties ---------------------------------------------------------------------------

NODES = ["n1", "n2", "n3"]


@st.composite
def clusters(draw: st.DrawFn) -> SchedulingInput:
    devices = []
    for node in NODES[: draw(st.integers(1, 3))]:
        n_groups = draw(st.integers(1, 6))
        for g in range(n_groups):
            size = draw(st.sampled_from([1, 1, 1, 2]))
            addrs = [f"0000:{g + 16:02x}:00.{f}" for f in range(size)]
            numa = draw(st.sampled_from([-1, 0, 1]))
            root = draw(st.sampled_from([None, "pci0000:00", "pci0000:80"]))
            for f, addr in enumerate(addrs):
                claim = draw(
                    st.sampled_from(
                        [
                            None,
                            None,
                            None,
                            other_claim(),
                            Claim("vm-uid", "tenant", "vm", "gpu", "a100"),
                        ]
                    )
                )
                devices.append(
                    dev(
                        node,
                        addr,
                        product=draw(st.sampled_from(["20b0", "20b0", "1aef"])) if f else "20b0",
                        numa=numa,
                        group=g if size > 1 else None,
                        peers=tuple(a for a in addrs if a != addr),
                        healthy=draw(st.booleans()) or draw(st.booleans()),
                        cordoned=draw(st.integers(0, 9)) == 0,
                        claim=claim,
                        root=root,
                    )
                )
    reqs = []
    for i in range(draw(st.integers(1, 3))):
        reqs.append(
            {
                "name": f"r{i}",
                "flavor": "a100",
                "count": draw(st.integers(1, 3)),
                "optional": draw(st.booleans()),
                "numaPolicy": draw(st.sampled_from(["none", "preferred", "required"])),
            }
        )
    same = draw(st.sampled_from([None, ["r0"], [r["name"] for r in reqs]]))
    same_root = draw(st.sampled_from([None, None, [r["name"] for r in reqs]]))
    selector = draw(st.sampled_from([None, {"kubernetes.io/hostname": "n1"}]))
    alive = {n: draw(st.integers(0, 5)) > 0 for n in NODES}
    return inp(
        vm(reqs, same_numa=same, same_root=same_root, node_selector=selector),
        devices,
        nodes=[NodeFacts(n, alive=alive[n]) for n in NODES],
        reserved=frozenset(d.name for d in devices if draw(st.integers(0, 15)) == 0),
        policy=draw(st.sampled_from(["best-fit", "spread"])),
    )


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_placements_keep_every_hard_constraint(case: SchedulingInput) -> None:
    got = schedule(case)
    assert repr(got) == repr(schedule(case)), "not deterministic"
    if isinstance(got, Refusal):
        assert got.message
        return
    by_name = {d.name: d for d in case.devices}
    names = [a.device for a in got.assignments]
    assert len(names) == len(set(names)), "a device was used twice"
    assert case.nodes[got.node].alive
    if case.vm.spec.node_selector:
        assert got.node == case.vm.spec.node_selector["kubernetes.io/hostname"]
    for a in got.assignments:
        d = by_name[a.device]
        assert d.node == got.node
        assert d.healthy and not d.unschedulable
        assert d.claim is None or d.claim.uid == "vm-uid"
        assert d.claim is not None or d.name not in case.reserved
        for peer in d.peers:  # whole IOMMU groups
            assert any(by_name[x].address == peer for x in names)
    skipped = {n for n, _ in got.skipped}
    for r in case.vm.spec.devices:
        counted = [a for a in got.assignments if a.request == r.name and not a.companion]
        if r.optional and r.name in skipped:
            assert not counted
            continue
        assert r.name not in skipped, "a mandatory request was skipped"
        assert len(counted) == r.count
        assert all(by_name[a.device].facts.product_id == "20b0" for a in counted)
        if r.numa_policy == "required":
            assert len({a.numa for a in counted}) == 1 and counted[0].numa >= 0
    same = case.vm.spec.placement.same_numa if case.vm.spec.placement else None
    if same:
        numas = {
            a.numa
            for a in got.assignments
            if a.request in same and not a.companion and a.request not in skipped
        }
        assert len(numas) <= 1 and all(n >= 0 for n in numas)
    same_root = case.vm.spec.placement.same_pcie_root if case.vm.spec.placement else None
    if same_root:
        roots = {
            by_name[a.device].pcie_root
            for a in got.assignments
            if a.request in same_root and not a.companion and a.request not in skipped
        }
        assert len(roots) <= 1 and None not in roots


@contextlib.contextmanager
def nodes_visited() -> Iterator[list[str]]:
    """The names of the nodes the scheduler looks at device by device, in order."""
    import controller.scheduling as sched

    visited: list[str] = []
    real = sched._place_on_node

    def spy(inp_, facts, *a, **kw):  # type: ignore[no-untyped-def]
        visited.append(facts.name)
        return real(inp_, facts, *a, **kw)

    sched._place_on_node = spy  # type: ignore[assignment]
    try:
        yield visited
    finally:
        sched._place_on_node = real  # type: ignore[assignment]


def _indexed(case: SchedulingInput) -> SchedulingInput:
    """The same input in the controller's indexed form, with exact free counts."""
    by_node: dict[str, list] = {}
    for d in case.devices:
        by_node.setdefault(d.node, []).append(d)
    free: dict[str, dict[str, int]] = {f: {} for f in case.flavors}
    for node, devs in by_node.items():
        labels = (case.nodes.get(node) or NodeFacts(node)).effective_labels()
        for f, n in free_counts(devs, case.flavors, labels, case.reserved).items():
            free[f][node] = n
    return replace(case, devices=(), by_node=by_node, free=free)


def _bucketed(case: SchedulingInput) -> SchedulingInput:
    """The indexed form plus the inverted free counts (count -> nodes) the controller keeps."""
    indexed = _indexed(case)
    assert indexed.free is not None
    buckets: dict[str, dict[int, list[str]]] = {}
    for f, by in sorted(indexed.free.items()):
        for node, n in sorted(by.items()):
            buckets.setdefault(f, {}).setdefault(n, []).append(node)
    return replace(indexed, free_nodes=buckets)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_indexed_search_finds_the_same_placement(case: SchedulingInput) -> None:
    if any(d.claim is not None and d.claim.uid == "vm-uid" for d in case.devices):
        case = replace(
            case,
            devices=[
                replace(d, claim=None) if d.claim and d.claim.uid == "vm-uid" else d
                for d in case.devices
            ],
        )
    plain = schedule(case)
    for indexed in (schedule(_indexed(case)), schedule(_bucketed(case))):
        assert type(plain) is type(indexed)
        if isinstance(plain, Placement):
            assert indexed == plain
        else:
            assert isinstance(indexed, Refusal)
            assert {n.node for n in indexed.nodes} == {n.node for n in plain.nodes}


def test_indexed_search_visits_few_nodes_in_a_big_cluster() -> None:
    devices = [
        dev(
            f"node-{n:03d}",
            f"0000:{i + 16:02x}:00.0",
            numa=i // 5,
            claim=other_claim() if (n * 10 + i) % 3 == 0 else None,
        )
        for n in range(500)
        for i in range(10)
    ]
    for case in (_indexed(inp(vm(GPU), devices)), _bucketed(inp(vm(GPU), devices))):
        with nodes_visited() as visited:
            got = schedule(case)
        assert isinstance(got, Placement)
        assert got == schedule(replace(case, free=None, free_nodes=None))
        assert len(visited) <= 3, visited


# --- the search: backtracking finds a fit whenever one exists -------------------------------


def test_numa_required_requests_are_packed_across_nodes_by_backtracking() -> None:
    # 2 free on NUMA 0, 3 on NUMA 1; requests of 1, 2 and 2 all NUMA-required: only
    # 2 | 1 + 2 fits, which placing requests one by one in name order never finds.
    devices = [dev(A, f"0000:{0x10 + i:02x}:00.0", numa=0 if i < 2 else 1) for i in range(5)]
    reqs = [
        {"name": "a", "flavor": "a100", "count": 1, "numaPolicy": "required"},
        {"name": "b", "flavor": "a100", "count": 2, "numaPolicy": "required"},
        {"name": "c", "flavor": "a100", "count": 2, "numaPolicy": "required"},
    ]
    got = schedule(inp(vm(reqs), devices))
    assert isinstance(got, Placement), got
    numa = {r: {a.numa for a in got.assignments if a.request == r} for r in "abc"}
    assert all(len(n) == 1 for n in numa.values())
    assert sorted(len([a for a in got.assignments if a.numa == n]) for n in (0, 1)) == [2, 3]


def test_device_choice_is_backtracked_when_requests_overlap() -> None:
    # "any" may take either GPU, "pinned" only 3b: the search gives "any" the other one.
    devices = [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")]
    reqs = [
        {"name": "any", "flavor": "a100"},
        {"name": "pinned", "flavor": "a100", "address": "0000:3c:00.0"},
        # "pinned" is placed first (pinned addresses are most constrained), so this also
        # holds when the order would not.
    ]
    got = schedule(inp(vm(reqs), devices))
    assert isinstance(got, Placement)
    assert {a.request: a.address for a in got.assignments} == {
        "any": "0000:3b:00.0",
        "pinned": "0000:3c:00.0",
    }


def test_requests_that_fit_alone_but_not_together_say_so() -> None:
    devices = [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:3c:00.0", numa=1)]
    reqs = [
        {"name": "a", "flavor": "a100", "numaPolicy": "required"},
        {"name": "b", "flavor": "a100", "count": 2},
        {"name": "c", "flavor": "a100", "numaPolicy": "required"},
    ]
    got = schedule(inp(vm(reqs), devices))
    assert isinstance(got, Refusal)
    assert got.nodes[0].reasons == ("have only 2 free a100 (need 4)",) or any(
        "together" in r for r in got.nodes[0].reasons
    )


# --- PF and VF never go to different VMs ----------------------------------------------------

PF = "0000:5e:00.0"
VF0, VF1 = "0000:5e:02.0", "0000:5e:02.1"


def sriov_devices(pf_claim: Claim | None = None, vf_claim: Claim | None = None) -> list:
    return [
        dev(A, PF, vendor="8086", product="1592", cls="020000", role="PF", group=1, claim=pf_claim),
        vf(A, VF0, group=2, phys_fn=PF, claim=vf_claim),
        vf(A, VF1, group=3, phys_fn=PF),
    ]


PF_FLAVOR = flavor("e810-pf", "nic", selector={"vendorIDs": ["8086"], "sriovRoles": ["PF"]})
VF_FLAVOR = flavor("e810-vf", "gpu", selector={"vendorIDs": ["8086"], "sriovRoles": ["VF"]})


def test_a_pf_is_not_given_while_another_vm_holds_one_of_its_vfs() -> None:
    got = schedule(
        inp(vm([{"name": "pf", "flavor": "e810-pf"}]), sriov_devices(vf_claim=other_claim()),
            [PF_FLAVOR])
    )  # fmt: skip
    assert isinstance(got, Refusal)
    assert got.nodes[0].reasons == (
        "have no free e810-pf (need 1): whose VF is held by another VM",
    )


def test_a_vf_is_not_given_while_another_vm_holds_its_pf() -> None:
    got = schedule(
        inp(vm([{"name": "vf", "flavor": "e810-vf", "count": 1}]),
            sriov_devices(pf_claim=other_claim()), [VF_FLAVOR])
    )  # fmt: skip
    assert isinstance(got, Refusal)
    assert "whose PF is held by another VM" in got.nodes[0].reasons[0]
    assert got.nodes[0].details == ("vf (e810-vf): 2 whose PF is held by another VM",)


def test_the_free_counts_leave_out_a_pf_whose_vf_is_held() -> None:
    counts = free_counts(
        sriov_devices(vf_claim=other_claim()),
        {"e810-pf": PF_FLAVOR, "e810-vf": VF_FLAVOR},
        {},
    )
    assert counts == {"e810-pf": 0, "e810-vf": 1}


def test_one_vm_never_gets_a_pf_and_its_vf() -> None:
    reqs = [{"name": "pf", "flavor": "e810-pf"}, {"name": "vf", "flavor": "e810-vf"}]
    got = schedule(inp(vm(reqs), sriov_devices(), [PF_FLAVOR, VF_FLAVOR]))
    assert isinstance(got, Refusal)
    assert "cannot fit pf, vf together" in got.nodes[0].reasons[0]


# --- trusted VFs ----------------------------------------------------------------------------


def test_a_trusted_network_lands_only_on_a_vf_the_admin_marked_trusted() -> None:
    devices = [
        vf(A, VF0, group=2),
        vf(A, VF1, group=3, attrs={"trusted": "true"}),
    ]
    fl = nic_flavor(networking={"allowTrusted": True})
    net = [{"name": "net", "flavor": "vf", "trusted": True}]
    got = schedule(inp(vm(networks=net), devices, [fl]))
    assert isinstance(got, Placement)
    assert [a.address for a in got.assignments] == [VF1]
    got = schedule(inp(vm(networks=net), devices[:1], [fl]))
    assert isinstance(got, Refusal)
    assert got.nodes[0].reasons == (
        "have no free vf VF on physnet2 (need 1): not marked trusted by the admin",
    ) or got.nodes[0].reasons == ("have no free vf (need 1): not marked trusted by the admin",)


# --- refusal wording ------------------------------------------------------------------------


def test_unknown_numa_is_named_in_a_numa_refusal() -> None:
    devices = [dev(A, "0000:3b:00.0", numa=-1), dev(A, "0000:3c:00.0", numa=-1)]
    got = schedule(inp(vm(gpus(2, numaPolicy="required")), devices))
    assert isinstance(got, Refusal)
    assert got.nodes[0].reasons == (
        "cannot place gpu on a single NUMA node (at most 0 free a100 on one; 2 report no NUMA node)",
    )


def test_a_group_blocked_by_a_held_peer_says_so_at_the_top() -> None:
    devices = [
        dev(A, "0000:3b:00.0", group=7, peers=("0000:3b:00.1",)),
        dev(A, "0000:3b:00.1", product="1aef", group=7, peers=("0000:3b:00.0",),
            claim=other_claim()),
    ]  # fmt: skip
    got = schedule(inp(vm(GPU), devices))
    assert isinstance(got, Refusal)
    assert got.message == (
        "0/1 nodes are available: 1 node(s) have no free a100 (need 1): "
        "blocked by their IOMMU group."
    )


# --- brute force ----------------------------------------------------------------------------


@st.composite
def one_node(draw: st.DrawFn) -> SchedulingInput:
    """A small node: up to 5 GPUs in IOMMU groups of 1-2 (one NUMA node per group, or
    unknown), some PFs with VFs among them, some held by another VM; 1-3 requests."""
    devices: list = []
    addrs = [f"0000:{0x10 + i:02x}:00.0" for i in range(draw(st.integers(1, 5)))]
    i = 0
    while i < len(addrs):
        size = min(draw(st.integers(1, 2)), len(addrs) - i)
        group = addrs[i : i + size]
        numa = draw(st.sampled_from([0, 0, 1, 1, -1]))
        for a in group:
            devices.append(
                dev(
                    A,
                    a,
                    numa=numa,
                    group=i,
                    peers=tuple(x for x in group if x != a),
                    claim=other_claim() if draw(st.integers(0, 6)) == 0 else None,
                )
            )
        i += size
    # SR-IOV: some devices are VFs of another one.
    pfs = draw(st.lists(st.sampled_from(addrs), max_size=1))
    devices = [
        replace(d, phys_fn=pfs[0]) if pfs and d.address != pfs[0] and draw(st.booleans()) else d
        for d in devices
    ]
    reqs = []
    for k in range(draw(st.integers(1, 3))):
        reqs.append(
            {
                "name": f"r{k}",
                "flavor": "a100",
                "count": draw(st.integers(1, 2)),
                "optional": draw(st.booleans()),
                "numaPolicy": draw(st.sampled_from(["none", "preferred", "required"])),
            }
        )
    same = draw(st.sampled_from([None, None, ["r0"], [r["name"] for r in reqs]]))
    return inp(vm(reqs, same_numa=same), devices)


def brute_force(case: SchedulingInput) -> tuple[int, int] | None:
    """The best (optional requests skipped, NUMA-preferred misses) over every way to give
    each request whole IOMMU groups, or None when nothing fits. Written from the rules, not
    from the search: every subset of groups for every request, every NUMA node."""
    import itertools

    devs = {d.address: d for d in case.devices}
    by_name = {d.name: d for d in case.devices}

    def held(d) -> bool:  # type: ignore[no-untyped-def]
        return d.claim is not None

    def kin(d) -> set[str]:  # type: ignore[no-untyped-def]
        out = {x.name for x in case.devices if x.phys_fn == d.address}
        if d.phys_fn in devs:
            out.add(devs[d.phys_fn].name)
        return out

    def group_ok(d) -> bool:  # type: ignore[no-untyped-def]
        members = [d] + [devs[p] for p in d.peers]
        return all(not held(m) for m in members) and not any(
            held(by_name[k]) for m in members for k in kin(m)
        )

    units = sorted(
        {
            frozenset([d.name, *(devs[p].name for p in d.peers)])
            for d in case.devices
            if group_ok(d)
        },
        key=sorted,
    )
    reqs = list(case.vm.spec.devices)
    same = set(case.vm.spec.placement.same_numa or []) if case.vm.spec.placement else set()
    numas = [0, 1]
    best: tuple[int, int] | None = None

    def options(r):  # type: ignore[no-untyped-def]
        opts: list = [None] if r.optional else []
        for size in range(1, r.count + 1):
            opts.extend(itertools.combinations(units, size))
        return opts

    for combo in itertools.product(*(options(r) for r in reqs)):
        names = [n for s in combo if s for u in s for n in u]
        if len(names) != len(set(names)):
            continue
        # A PF and its VF go to no VM together (the PF's driver takes its VFs with it),
        # unless one IOMMU group holds both.
        taken = [u for s in combo if s for u in s]
        if any(
            a in kin(by_name[b])
            for x, u in enumerate(taken)
            for v in taken[x + 1 :]
            for a in u
            for b in v
        ):
            continue
        for group_numa in numas:
            ok, misses = True, 0
            for r, s in zip(reqs, combo, strict=True):
                if s is None:
                    continue
                members = [by_name[n] for u in s for n in u]
                if r.name in same or r.numa_policy == "required":
                    want = group_numa if r.name in same else None
                    placed = False
                    for n in [want] if want is not None else numas:
                        if (
                            all(by_name[min(u)].numa == n for u in s)
                            and sum(1 for m in members if m.numa == n) >= r.count
                        ):
                            placed = True
                    ok &= placed
                else:
                    ok &= len(members) >= r.count
                    if r.numa_policy == "preferred":
                        here = {m.numa for m in members}
                        local = any(
                            all(by_name[min(u)].numa == n for u in s)
                            and sum(1 for m in members if m.numa == n) >= r.count
                            for n in numas
                        )
                        misses += 0 if local or (len(here) == 1 and min(here) >= 0) else 1
            if ok:
                score = (sum(1 for s in combo if s is None), misses)
                best = score if best is None or score < best else best
    return best


@settings(max_examples=500, deadline=None)
@given(one_node())
def test_the_search_finds_a_fit_exactly_when_brute_force_does(case: SchedulingInput) -> None:
    got = schedule(case)
    want = brute_force(case)
    if want is None:
        assert isinstance(got, Refusal), got
        return
    assert isinstance(got, Placement), (got, want)
    assert (got.score[0], got.score[2]) == want


def test_a_refused_node_answers_from_the_memo_until_it_changes() -> None:
    devices = [dev(f"n{i}", "0000:3b:00.0", claim=other_claim()) for i in range(3)]
    memo: dict = {}
    versions = {f"n{i}": 1 for i in range(3)}
    case = replace(_indexed(inp(vm(GPU), devices)), refusal_memo=memo, node_versions=versions)
    with nodes_visited() as visited:
        first = schedule(case)
        assert sorted(visited) == ["n0", "n1", "n2"] and len(memo) == 3
        visited.clear()
        again = schedule(case)
        assert visited == [] and again == first
        versions["n1"] = 2  # n1 changed: only it is looked at again
        schedule(case)
        assert visited == ["n1"]
    assert isinstance(first, Refusal)
    assert first.message == (
        "0/3 nodes are available: 3 node(s) have no free a100 (need 1): claimed by other VMs."
    )


def test_a_vfs_rate_limit_is_the_requests_or_else_its_flavors_maximum() -> None:
    flavors = [nic_flavor(networking={"maxTxRate": 1000, "allowLinkState": True})]
    for asked, want in (({}, 1000), ({"maxTxRate": 300, "linkState": "enable"}, 300)):
        case = inp(
            vm(networks=[{"name": "net", "flavor": "vf", **asked}]),
            [vf(A, "0000:5e:02.0")],
            flavors,
        )
        got = schedule(case)
        assert isinstance(got, Placement)
        (net,) = scheduled_status(case.vm, got, datetime.now(UTC))["networks"]
        assert net.get("maxTxRate") == want and "minTxRate" not in net
        assert net.get("linkState") == asked.get("linkState")


# --- ordered alternatives ---------------------------------------------------------------------

H100 = flavor("h100", selector={"vendorIDs": ["10de"], "productIDs": ["2330"]})
A100 = flavor()
ALT = [{"name": "gpu", "flavor": "h100", "alternatives": [{"flavor": "a100", "count": 2}]}]


def h100(node: str, address: str) -> Any:
    return dev(node, address, product="2330")


def test_the_first_alternative_that_fits_is_taken_and_recorded() -> None:
    # Node A has an H100; node B two A100s: the H100 wins, on A.
    case = inp(
        vm(ALT),
        [h100(A, "0000:3b:00.0"), dev(B, "0000:3b:00.0"), dev(B, "0000:3c:00.0")],
        [H100, A100],
    )
    got = schedule(case)
    assert isinstance(got, Placement) and got.node == A
    assert [a.alternative for a in got.assignments] == [None]
    # The H100 taken: two A100s, on B, recorded as alternative 1.
    case = replace(case, devices=[dev(B, "0000:3b:00.0"), dev(B, "0000:3c:00.0")])
    got = schedule(case)
    assert isinstance(got, Placement) and got.node == B
    assert [a.alternative for a in got.assignments] == [1, 1]
    (status,) = {
        d["alternative"] for d in scheduled_status(case.vm, got, datetime.now(UTC))["devices"]
    }
    assert status == 1


def test_a_refusal_explains_each_alternative() -> None:
    got = schedule(inp(vm(ALT), [dev(A, "0000:3b:00.0")], [H100, A100]))
    assert isinstance(got, Refusal)
    assert "have no free h100 (need 1)" in got.message
    assert "have only 1 free a100 (need 2)" in got.message


def test_an_alternative_the_namespace_may_not_use_is_passed_over() -> None:
    closed = flavor(
        "h100",
        selector={"vendorIDs": ["10de"], "productIDs": ["2330"]},
        access={"namespaceSelector": {"matchLabels": {"tier": "gold"}}},
    )
    got = schedule(
        inp(vm(ALT), [h100(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0"), dev(A, "0000:3d:00.0")],
            [closed, A100])
    )  # fmt: skip
    assert isinstance(got, Placement) and {a.alternative for a in got.assignments} == {1}
    only = [{"name": "gpu", "flavor": "h100", "alternatives": [{"flavor": "h100", "count": 2}]}]
    got = schedule(inp(vm(only), [h100(A, "0000:3b:00.0")], [closed]))
    assert isinstance(got, Refusal) and got.reason == "NotPermitted"


def test_an_alternative_over_a_per_vm_limit_is_passed_over() -> None:
    capped = flavor(limits={"maxPerVM": 1})
    got = schedule(inp(vm(ALT), [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")], [H100, capped]))
    assert isinstance(got, Refusal) and "have no free h100 (need 1)" in got.message
    assert "passed over alternative 1 (2 a100) of gpu: " in got.message
    assert "flavor a100 allows 1 per VM" in got.message
    only = [{"name": "gpu", "flavor": "a100", "count": 2}]
    got = schedule(inp(vm(only), [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")], [capped]))
    assert isinstance(got, Refusal) and got.reason == "LimitExceeded"


def test_admission_names_a_missing_alternative_and_lets_a_closed_one_pass() -> None:
    typo = [{"name": "gpu", "flavor": "h100", "alternatives": [{"flavor": "a1000", "count": 2}]}]
    assert request_problems(vm(typo), {"h100": H100, "a100": A100}, {}) == [
        "spec.devices[gpu].alternatives[0].flavor: flavor a1000 does not exist"
    ]
    closed = flavor(
        "h100",
        selector={"vendorIDs": ["10de"], "productIDs": ["2330"]},
        access={"namespaceSelector": {"matchLabels": {"tier": "gold"}}},
    )
    # The H100 is not for this namespace, the A100s are: admitted (the H100 is passed over).
    assert request_problems(vm(ALT), {"h100": closed, "a100": A100}, {}) == []
    only_closed = [
        {"name": "gpu", "flavor": "h100", "alternatives": [{"flavor": "h100", "count": 2}]}
    ]
    (problem,) = request_problems(vm(only_closed), {"h100": closed}, {})
    assert "may not use flavor h100" in problem
