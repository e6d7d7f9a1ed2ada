"""`pcipt-controller plan`: the scheduler without a cluster, from manifests in the same form as
the custom resources (lists, multi-document YAML or JSON). For capacity planning, bare-metal
provisioning and CI checks of manifests.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from controller.scheduling import (
    Device,
    NodeFacts,
    Placement,
    Refusal,
    SchedulingInput,
    ScoringPolicy,
    schedule,
)
from pcipt import constants as c
from pcipt.api.v1alpha1 import ComputeStatus, PassthroughVM, PciDevice, PciFlavor
from pcipt.compute import ANNOTATION, NodeCompute, describe


class PlanError(ValueError):
    """A manifest could not be read; the message names the file and the object."""


def load_objects(path: Path) -> list[dict[str, Any]]:
    """Every object in a YAML/JSON file: documents, `kind: List` items, or top-level lists."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: {e}") from e
    out: list[dict[str, Any]] = []

    def walk(doc: Any) -> None:
        if doc is None:
            return
        if isinstance(doc, list):
            for d in doc:
                walk(d)
        elif isinstance(doc, dict) and isinstance(doc.get("items"), list):
            for d in doc["items"]:
                walk(d)
        elif isinstance(doc, dict):
            out.append(doc)
        else:
            raise PlanError(f"{path}: expected objects, found {type(doc).__name__}")

    for d in docs:
        walk(d)
    return out


def _parse(cls: Any, objs: Iterable[dict[str, Any]], path: Path, kind: str) -> list[Any]:
    out = []
    for o in objs:
        if o.get("kind", kind) != kind:
            continue
        try:
            out.append(cls.model_validate(o))
        except ValueError as e:
            name = o.get("metadata", {}).get("name", "?")
            raise PlanError(f"{path}: {kind} {name}: {e}") from e
    return out


def build_input(
    devices: Path,
    flavors: Path,
    vm: Path,
    *,
    nodes: Path | None = None,
    placed: Path | None = None,
    namespace_labels: Path | None = None,
    namespace: str | None = None,
    policy: ScoringPolicy = "best-fit",
) -> SchedulingInput:
    devs = [
        Device.from_model(d) for d in _parse(PciDevice, load_objects(devices), devices, "PciDevice")
    ]
    flvs = _parse(PciFlavor, load_objects(flavors), flavors, "PciFlavor")
    vms = _parse(PassthroughVM, load_objects(vm), vm, "PassthroughVM")
    if len(vms) != 1:
        raise PlanError(f"{vm}: expected exactly one PassthroughVM, found {len(vms)}")
    the_vm = vms[0]
    the_vm.metadata.namespace = namespace or the_vm.metadata.namespace or "default"
    if not the_vm.metadata.uid:
        the_vm.metadata.uid = f"plan-{the_vm.metadata.namespace}-{the_vm.metadata.name}"
    node_facts: dict[str, NodeFacts] = {}
    computes: dict[str, NodeCompute] = {}
    if nodes is not None:
        for n in load_objects(nodes):
            meta = n.get("metadata", {})
            if n.get("kind") == "Lease":
                name = str(meta.get("name", ""))
                topo = NodeCompute.from_json((meta.get("annotations") or {}).get(ANNOTATION))
                if name.startswith(c.NODE_LEASE_PREFIX) and topo is not None:
                    computes[name[len(c.NODE_LEASE_PREFIX) :]] = topo
                continue
            conds = {
                x.get("type"): x.get("status")
                for x in (n.get("status") or {}).get("conditions", [])
            }
            alive = conds.get("Ready", "True") != "False"
            node_facts[meta["name"]] = NodeFacts(meta["name"], meta.get("labels") or {}, alive)
    for name, topo in computes.items():
        f = node_facts.get(name) or NodeFacts(name)
        node_facts[name] = NodeFacts(f.name, f.labels, f.alive, topo)
    taken: dict[str, list[ComputeStatus]] = {}
    if placed is not None:
        for other in _parse(PassthroughVM, load_objects(placed), placed, "PassthroughVM"):
            st = other.status
            if st.node_name and st.compute is not None:
                taken.setdefault(st.node_name, []).append(st.compute)
    ns_labels: dict[str, str] = {}
    if namespace_labels is not None:
        for o in load_objects(namespace_labels):
            if o.get("kind") == "Namespace" and o["metadata"]["name"] == the_vm.metadata.namespace:
                ns_labels = o["metadata"].get("labels") or {}
            elif (
                o.get("kind") != "Namespace" and the_vm.metadata.namespace in o
            ):  # a plain map: {namespace: {labels}}
                ns_labels = o[the_vm.metadata.namespace] or {}
    usage: Counter[str] = Counter()
    for d in devs:
        if (
            d.claim
            and d.claim.namespace == the_vm.metadata.namespace
            and d.claim.flavor
            and not d.claim.companion
            and d.claim.uid != the_vm.metadata.uid
        ):
            usage[d.claim.flavor] += 1
    return SchedulingInput(
        vm=the_vm,
        flavors={f.metadata.name: f for f in flvs},
        devices=devs,
        nodes=node_facts,
        namespace_labels=ns_labels,
        namespace_usage=dict(usage),
        policy=policy,
        compute_taken=taken,
    )


def render(result: Placement | Refusal, vm: PassthroughVM, fmt: str) -> str:
    if isinstance(result, Placement):
        doc: dict[str, Any] = {
            "vm": f"{vm.metadata.namespace}/{vm.metadata.name}",
            "result": "Placed",
            "node": result.node,
            "devices": [
                {
                    "request": a.request,
                    "pciDevice": a.device,
                    "address": a.address,
                    "numaNode": a.numa,
                    **({"companion": True} if a.companion else {}),
                }
                for a in result.assignments
                if not a.network or a.companion
            ],
            "networks": [
                {"name": a.request, "pciDevice": a.device, "address": a.address, "numaNode": a.numa}
                for a in result.assignments
                if a.network and not a.companion
            ],
            "skipped": [{"request": r, "reason": why} for r, why in result.skipped],
            "numaNode": result.numa_node,
            "cpusAndMemory": describe(result.compute),
        }
        if result.compute is not None:
            doc["compute"] = result.compute.to_dict()
    else:
        doc = {
            "vm": f"{vm.metadata.namespace}/{vm.metadata.name}",
            "result": "Refused",
            "reason": result.reason,
            "message": result.message,
            "nodes": [
                {"nodeName": n.node, "reasons": [*n.reasons, *n.details]} for n in result.nodes
            ],
        }
    if fmt == "json":
        return json.dumps(doc, indent=2)
    return yaml.safe_dump(doc, sort_keys=False)


def run_plan(
    devices: Path,
    flavors: Path,
    vm: Path,
    *,
    nodes: Path | None,
    placed: Path | None = None,
    namespace_labels: Path | None,
    namespace: str | None = None,
    output: str,
    policy: ScoringPolicy,
) -> tuple[int, str]:
    """(exit code, output): 0 when placed, 2 when refused."""
    inp = build_input(
        devices,
        flavors,
        vm,
        nodes=nodes,
        placed=placed,
        namespace_labels=namespace_labels,
        namespace=namespace,
        policy=policy,
    )
    result = schedule(inp)
    return (0 if isinstance(result, Placement) else 2), render(result, inp.vm, output)
