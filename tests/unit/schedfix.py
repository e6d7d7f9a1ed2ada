"""Compact builders of scheduler inputs for tests and benchmarks: devices, flavors, VMs."""

from __future__ import annotations

from typing import Any

from controller.scheduling import Claim, Device, NodeFacts, SchedulingInput
from pcipt.api.v1alpha1 import PassthroughVM, PciFlavor, pcidevice_name
from pcipt.selectors import DeviceFacts


def dev(
    node: str,
    address: str,
    *,
    vendor: str = "10de",
    product: str = "20b0",
    cls: str = "030200",
    driver: str | None = "vfio-pci",
    numa: int = 0,
    group: int | None = None,
    peers: tuple[str, ...] = (),
    role: str = "None",
    physnet: str | None = None,
    netdev: str | None = None,
    healthy: bool = True,
    cordoned: bool = False,
    claim: Claim | None = None,
    attrs: dict[str, str] | None = None,
    phys_fn: str | None = None,
    root: str | None = None,
) -> Device:
    return Device(
        name=pcidevice_name(node, address),
        node=node,
        facts=DeviceFacts(
            address=address,
            vendor_id=vendor,
            product_id=product,
            class_code=cls,
            driver=driver,
            sriov_role=role,
            physical_network=physnet,
            attributes=attrs or {},
        ),
        numa=numa,
        iommu_group=group,
        peers=peers,
        netdev=netdev,
        healthy=healthy,
        unschedulable=cordoned,
        claim=claim,
        resource_version="1",
        phys_fn=phys_fn,
        pcie_root=root,
    )


def other_claim(uid: str = "other") -> Claim:
    return Claim(uid=uid, namespace="x", name="x", request="r", flavor="a100")


def flavor(name: str = "a100", device_type: str = "gpu", **spec: Any) -> PciFlavor:
    spec.setdefault("selector", {"vendorIDs": ["10de"], "productIDs": ["20b0"]})
    return PciFlavor.model_validate(
        {"metadata": {"name": name}, "spec": {"deviceType": device_type, **spec}}
    )


def nic_flavor(name: str = "vf", **spec: Any) -> PciFlavor:
    spec.setdefault("selector", {"vendorIDs": ["8086"], "sriovRoles": ["VF"]})
    return flavor(name, "nic", **spec)


def vf(node: str, address: str, physnet: str = "physnet2", **kw: Any) -> Device:
    kw.setdefault("cls", "020000")
    return dev(node, address, vendor="8086", product="1889", role="VF", physnet=physnet, **kw)


def vm(
    devices: list[dict[str, Any]] | None = None,
    networks: list[dict[str, Any]] | None = None,
    *,
    same_numa: list[str] | None = None,
    same_root: list[str] | None = None,
    node_selector: dict[str, str] | None = None,
    namespace: str = "tenant",
    uid: str = "vm-uid",
    name: str = "vm",
) -> PassthroughVM:
    spec: dict[str, Any] = {"memory": "1Gi", "devices": devices or [], "networks": networks or []}
    if same_numa or same_root:
        spec["placement"] = {
            **({"sameNUMA": same_numa} if same_numa else {}),
            **({"samePCIeRoot": same_root} if same_root else {}),
        }
    if node_selector:
        spec["nodeSelector"] = node_selector
    return PassthroughVM.model_validate(
        {"metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec}
    )


def inp(
    the_vm: PassthroughVM,
    devices: list[Device],
    flavors: list[PciFlavor] | None = None,
    *,
    nodes: list[NodeFacts] | None = None,
    ns_labels: dict[str, str] | None = None,
    usage: dict[str, int] | None = None,
    reserved: frozenset[str] = frozenset(),
    policy: str = "best-fit",
) -> SchedulingInput:
    return SchedulingInput(
        vm=the_vm,
        flavors={f.metadata.name: f for f in (flavors or [flavor()])},
        devices=devices,
        nodes={n.name: n for n in nodes or []},
        namespace_labels=ns_labels or {},
        namespace_usage=usage or {},
        reserved=reserved,
        policy=policy,  # type: ignore[arg-type]
    )
