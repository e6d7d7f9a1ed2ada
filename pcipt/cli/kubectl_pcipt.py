"""`kubectl pcipt`: what the cluster's passthrough devices are doing, in words.

    kubectl pcipt inventory [-o table|yaml|json]   devices per node and flavor: total, free, ...
    kubectl pcipt explain VM [-n NS]              where a VM is and why (or why not)
    kubectl pcipt cordon|uncordon DEVICE          stop (or resume) giving a device to new VMs
    kubectl pcipt describe node NODE              what a host offers, and to whom
    kubectl pcipt migrate VM [--to NODE] [-n NS]  stop a VM, place it elsewhere, start it there
    kubectl pcipt migrate VM --live [--to NODE]   move a running VM (SR-IOV networks only)
    kubectl pcipt images [-o table|yaml|json]     which images support which flavors' devices
    kubectl pcipt usage [-n NS] [--since 24h]     device time per VM, flavor and price class

It finds the cluster as kubectl does (--kubeconfig, --context, $KUBECONFIG, ~/.kube/config).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import yaml
from kubernetes import client, config

from pcipt import clock
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice, PciFlavor
from pcipt.compute import describe
from pcipt.images import CATALOG_KEY, CATALOG_LABEL, ImageCatalog, supported_flavors
from pcipt.invsummary import INDEX, NO_FLAVOR, STATES, Rows, Unusable, device_state
from pcipt.invsummary import LABEL as SUMMARY_LABEL
from pcipt.invsummary import decode as decode_summary
from pcipt.kubeclient import ApiError, KubeClient, NotFound, crd_path, load_credentials
from pcipt.release import held_back
from pcipt.selectors import DeviceFacts, device_selector_matches
from pcipt.usage import LEDGER_LABEL as USAGE_LABEL
from pcipt.usage import LEDGER_PREFIX as USAGE_PREFIX
from pcipt.usage import Interval, parse_ledger
from pcipt.usage import totals as usage_totals

NOT_INSTALLED = (
    "pcipt is not installed in this cluster (the API server serves no {what}.pcipt.io): "
    "install it with `helm install pcipt charts/pcipt`, or `kubectl apply -f crds/`"
)


class PluginError(Exception):
    """Something the user can act on; printed without a traceback."""


def _api(args: argparse.Namespace) -> client.ApiClient:
    try:
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=args.kubeconfig, context=args.context
        )
        return api
    except config.ConfigException as e:
        raise PluginError(f"no usable kubeconfig: {e}") from e


def _list(api: client.ApiClient, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
    custom = client.CustomObjectsApi(api)
    try:
        if namespace is None:
            got = custom.list_cluster_custom_object(c.GROUP, c.VERSION, plural)
        else:
            got = custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, plural)
    except client.ApiException as e:
        if e.status == 404:
            raise PluginError(NOT_INSTALLED.format(what=plural)) from e
        raise PluginError(f"listing {plural} failed: {e.status} {e.reason}") from e
    items: list[dict[str, Any]] = dict(got).get("items", [])  # type: ignore[call-overload]
    return items


def _alive_nodes(api: client.ApiClient, namespace: str, dead_after: float) -> dict[str, bool]:
    try:
        leases = client.CoordinationV1Api(api).list_namespaced_lease(namespace).items
    except client.ApiException:
        return {}
    now = datetime.now(UTC)
    out = {}
    for lease in leases:
        name = (lease.metadata.name if lease.metadata else None) or ""
        if name.startswith(c.NODE_LEASE_PREFIX) and lease.spec and lease.spec.renew_time:
            out[name[len(c.NODE_LEASE_PREFIX) :]] = (
                now - lease.spec.renew_time
            ).total_seconds() <= dead_after
    return out


def _node_labels(api: client.ApiClient) -> dict[str, dict[str, str]]:
    try:
        nodes = client.CoreV1Api(api).list_node().items
        return {
            str(n.metadata.name): dict(n.metadata.labels or {})
            for n in nodes
            if n.metadata is not None
        }
    except client.ApiException:
        return {}


def _state(d: PciDevice, alive: bool) -> str:
    return device_state(
        d.spec.claim_ref is not None,
        d.status.health,
        d.spec.unschedulable,
        d.spec.reserved is not None,
        held_back(d, time.time()),
        alive,
    )


def _list_all(args: argparse.Namespace, paths: Sequence[tuple[str, bool]]) -> list[list[Any]]:
    """Items of each path, all asked at once through pcipt's asyncio client (it reads a listing
    of tens of thousands several times faster than the generated client and hands back the
    JSON as it is); an optional path one may not read counts as empty."""

    async def fetch() -> list[dict[str, Any]]:
        creds = load_credentials(args.kubeconfig, args.context)
        async with KubeClient(creds) as kube:

            async def one(path: str, optional: bool) -> dict[str, Any]:
                try:
                    return await kube.list(path)
                except ApiError:
                    if optional:
                        return {}
                    raise

            return list(await asyncio.gather(*(one(p, o) for p, o in paths)))

    try:
        got = asyncio.run(fetch())
    except NotFound as e:
        raise PluginError(NOT_INSTALLED.format(what=c.PLURAL_PCIDEVICE)) from e
    except ApiError as e:
        raise PluginError(f"listing failed: {e.status} {e.reason}") from e
    return [list(g.get("items") or []) for g in got]


LABEL_VALUE: Final = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
SHARD_ABOVE: Final = 500
"""Nodes (Leases) past which the device listing is split between processes."""
SUMMARY_ABOVE: Final = 500
"""Nodes (Leases) past which inventory reads the controller's counts (pcipt.invsummary)
unless told to --recount."""
_MAX_SELECTOR: Final = 512 * 1024


def _shard_selectors(nodes: Sequence[str], shards: int) -> list[str] | None:
    """Label selectors that split every PciDevice between `shards` listings by node: the
    first shards-1 take a share of the nodes with Leases each, the last every other device
    (the nodes without a Lease, and devices without the node label, included). None when the
    names cannot be label values or the selectors would be unreasonably long."""
    if any(len(n) > 63 or not LABEL_VALUE.match(n) for n in nodes):
        return None
    per = len(nodes) // shards
    parts = [sorted(nodes)[i * per : (i + 1) * per] for i in range(shards - 1)]
    sels = [f"{c.LABEL_NODE} in ({','.join(p)})" for p in parts]
    sels.append(f"{c.LABEL_NODE} notin ({','.join(n for p in parts for n in p)})")
    if max(len(x) for x in sels) > _MAX_SELECTOR:
        return None
    return sels


def _alive_of(leases: list[dict[str, Any]], dead_after: float) -> dict[str, bool]:
    """_alive_nodes from Leases as listed."""
    now = datetime.now(UTC)
    out = {}
    for lease in leases:
        name = (lease.get("metadata") or {}).get("name", "")
        renewed = (lease.get("spec") or {}).get("renewTime")
        if name.startswith(c.NODE_LEASE_PREFIX) and renewed:
            age = (now - clock.parse(renewed)).total_seconds()
            out[name[len(c.NODE_LEASE_PREFIX) :]] = age <= dead_after
    return out


def _raw_state(obj: dict[str, Any], alive: bool) -> str:
    """_state from the object as listed; a device with a release record (scrub, quarantine)
    is read into its model for that."""
    spec, st = obj.get("spec") or {}, obj.get("status") or {}
    if spec.get("release") is not None:
        return _state(PciDevice.model_validate(obj), alive)
    return device_state(
        spec.get("claimRef") is not None,
        st.get("health", "Healthy"),
        bool(spec.get("unschedulable")),
        spec.get("reserved") is not None,
        None,
        alive,
    )


@dataclass
class _Counting:
    """What counting a device needs besides the device."""

    flavors: list[PciFlavor]
    alive: dict[str, bool]
    labels: dict[str, dict[str, str]]


def _count(devices: list[dict[str, Any]], ctx: _Counting) -> Rows:
    rows: Rows = defaultdict(Counter)
    node_labels: dict[str, dict[str, str]] = {}
    for d in devices:
        node = (d.get("spec") or {}).get("nodeName", "")
        if node not in node_labels:
            node_labels[node] = {"kubernetes.io/hostname": node, **ctx.labels.get(node, {})}
        facts = DeviceFacts.of_object(d)
        member_of = [
            f.metadata.name
            for f in ctx.flavors
            if device_selector_matches(f.spec.selector, facts, node_labels[node])
        ] or [NO_FLAVOR]
        state = _raw_state(d, ctx.alive.get(node, False))
        for flavor in member_of:
            row = rows[(node, flavor)]
            row["total"] += 1
            row[state] += 1
    return rows


_SHARD: list[Any] = []
"""(args, _Counting) for the shard processes, which inherit it by fork."""


def _count_shard(selector: str) -> Rows:
    """In a forked process: list one shard of the devices, decode and count it there."""
    args, ctx = _SHARD
    gc.disable()  # millions of objects decoded, none of them cyclic: no collector passes

    async def fetch() -> list[dict[str, Any]]:
        async with KubeClient(load_credentials(args.kubeconfig, args.context)) as kube:
            got = await kube.list(crd_path(c.PLURAL_PCIDEVICE), label_selector=selector)
            return list(got.get("items") or [])

    return _count(asyncio.run(fetch()), ctx)


def _count_devices(args: argparse.Namespace, ctx: _Counting) -> Rows:
    """Every device counted. On a large cluster (past SHARD_ABOVE nodes, on Linux) the
    listing is split by node between processes, each decoding and counting its share: at
    50 000 devices one listing is 60 MB of JSON, and decoding it in one process took longer
    than the API server took to send it."""
    if args.node:
        # One node's devices: selected by the API server (the node plugin labels them).
        path = crd_path(c.PLURAL_PCIDEVICE)
        if len(args.node) <= 63 and LABEL_VALUE.match(args.node):
            path += "?labelSelector=" + quote(f"{c.LABEL_NODE}={args.node}")
        (devices,) = _list_all(args, [(path, False)])
        devices = [d for d in devices if (d.get("spec") or {}).get("nodeName") == args.node]
        return _count(devices, ctx)
    selectors = None
    if len(ctx.alive) > SHARD_ABOVE and sys.platform == "linux":
        shards = min(4, max(2, (os.cpu_count() or 1) // 2))
        selectors = _shard_selectors(list(ctx.alive), shards)
    if selectors is None:
        (devices,) = _list_all(args, [(crd_path(c.PLURAL_PCIDEVICE), False)])
        return _count(devices, ctx)
    _SHARD[:] = [args, ctx]
    try:
        with multiprocessing.get_context("fork").Pool(len(selectors)) as pool:
            parts = pool.map(_count_shard, selectors)
    except ApiError as e:
        raise PluginError(f"listing failed: {e.status} {e.reason}") from e
    finally:
        _SHARD.clear()
    rows: Rows = defaultdict(Counter)
    for part in parts:
        for key, counts in part.items():
            rows[key].update(counts)
    return rows


def inventory(args: argparse.Namespace) -> int:
    # Tens of thousands of devices: read as listed, not a model each (see _raw_state).
    ns = args.operator_namespace
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    summary = f"/api/v1/namespaces/{ns}/configmaps?labelSelector={quote(SUMMARY_LABEL)}%3Dtrue"
    flavor_objs, lease_objs, nodes, summary_objs = _list_all(
        args,
        [
            (crd_path(c.PLURAL_PCIFLAVOR), False),
            (leases, True),
            ("/api/v1/nodes", True),
            (summary, True),
        ],
    )
    ctx = _Counting(
        flavors=[PciFlavor.model_validate(o) for o in flavor_objs],
        alive=_alive_of(lease_objs, args.dead_after),
        labels={
            str(n["metadata"]["name"]): dict(n["metadata"].get("labels") or {})
            for n in nodes
            if n.get("metadata")
        },
    )
    counted_by, counted_at = "kubectl-pcipt", clock.now()
    rows: Rows | None = None
    alive = ctx.alive
    if not args.node and not args.recount and len(ctx.alive) > SUMMARY_ABOVE:
        try:
            got = decode_summary(
                summary_objs,
                {f.metadata.name: f.metadata.generation for f in ctx.flavors},
                clock.now(),
                args.max_age,
            )
        except Unusable as e:
            print(f"counting every device: {e}", file=sys.stderr)
        else:
            rows, alive, counted_by, counted_at = got.rows, got.alive, "controller", got.counted_at
            checked = (clock.now() - got.checked_at).total_seconds()
            print(
                f"as counted by the controller, current {checked:.0f}s ago (configmap "
                f"{ns}/{INDEX}); --recount counts every device now",
                file=sys.stderr,
            )
    if rows is None:
        gc.disable()  # (as in _count_shard) a short-lived command that decodes a large listing
        rows = _count_devices(args, ctx)
    if args.node:
        rows = {k: v for k, v in rows.items() if k[0] == args.node}
    if args.flavor:
        rows = {k: v for k, v in rows.items() if k[1] == args.flavor}
    cols = ("total", *STATES)
    records: list[dict[str, Any]] = [
        {
            "node": node,
            "flavor": flavor,
            "alive": alive.get(node, False),
            **{k: row[k] for k in cols},
        }
        for (node, flavor), row in sorted(rows.items())
    ]
    if args.output in ("yaml", "json"):
        _dump(
            {"countedBy": counted_by, "countedAt": clock.timestamp(counted_at), "items": records},
            args.output,
        )
        return 0
    table = [
        (
            "NODE",
            "FLAVOR",
            "TOTAL",
            "FREE",
            "ALLOCATED",
            "UNHEALTHY",
            "CORDONED",
            "RESERVED",
            "SCRUBBING",
            "QUARANTINED",
            "ALIVE",
        )
    ]
    for r in records:
        table.append(
            (
                r["node"],
                r["flavor"],
                str(r["total"]),
                str(r["free"]),
                str(r["allocated"]),
                str(r["unhealthy"]),
                str(r["cordoned"]),
                str(r["reserved"]),
                str(r["scrubbing"]),
                str(r["quarantined"]),
                "yes" if r["alive"] else "no",
            )
        )
    _print_table(table)
    if not records:
        print(
            "no PciDevices published yet: are node plugins running, with device specs that "
            "offer something?",
            file=sys.stderr,
        )
    return 0


def explain(args: argparse.Namespace) -> int:
    api = _api(args)
    ns = args.namespace or _current_namespace(args)
    try:
        raw = client.CustomObjectsApi(api).get_namespaced_custom_object(
            c.GROUP, c.VERSION, ns, c.PLURAL_PASSTHROUGHVM, args.vm
        )
    except client.ApiException as e:
        if e.status == 404:
            _list(
                api, c.PLURAL_PASSTHROUGHVM, ns
            )  # distinguishes "not installed" from "no such VM"
            raise PluginError(f"passthroughvm {ns}/{args.vm} not found") from e
        raise
    vm = PassthroughVM.model_validate(raw)
    st = vm.status
    out: list[str] = [
        f"VM {ns}/{vm.metadata.name}: {st.phase}" + (f" on {st.node_name}" if st.node_name else "")
    ]
    ready = next((x for x in st.conditions if x.type == c.COND_READY), None)
    if ready is not None:
        out.append(f"  ready: {ready.status} ({ready.reason}): {ready.message}")
    if st.migration is not None:
        mg = st.migration
        out.append(
            f"  {'live ' if mg.live else ''}migration {mg.id}: {mg.phase}, from {mg.from_node} "
            f"to {mg.to_node or 'any node'}" + (f": {mg.message}" if mg.message else "")
        )
    if st.evacuation is not None:
        ev = st.evacuation
        when = ev.time.strftime("%Y-%m-%dT%H:%M:%SZ") if ev.time else "?"
        out.append(
            f"  evacuated from {ev.from_node} at {when}: {ev.reason}; released "
            f"{', '.join(ev.devices) or 'no devices'}"
        )
    if st.node_name:
        if st.compute is not None:
            out.append(f"  CPUs and memory: {describe(st.compute)}")
        elif st.numa_node is not None:
            out.append(f"  vCPUs pinned to NUMA node {st.numa_node}")
        for b in st.devices:
            out.append(
                f"  device  {b.request:<12} {b.address}  NUMA {b.numa_node}  {b.pci_device}"
                + ("  (IOMMU companion)" if b.companion else "")
            )
        for n in st.networks:
            out.append(
                f"  network {n.name:<12} {n.address}  NUMA {n.numa_node}  {n.pci_device}"
                f"  mac {n.mac or '-'}  vlan {n.vlan or '-'}"
            )
        for s in st.skipped:
            out.append(f"  skipped {s.request}: {s.reason}")
        if st.domain is not None:
            through = ", ".join(st.domain.devices) or "nothing"
            out.append(f"  domain  {st.domain.name} ({st.domain.state}), passing through {through}")
            bound = sorted({b.address for b in st.devices} | {n.address for n in st.networks})
            if st.domain.devices and sorted(st.domain.devices) != bound:
                out.append(
                    f"  WARNING: the domain's devices {sorted(st.domain.devices)} differ from "
                    f"the bound ones {bound}"
                )
    elif st.scheduling is not None:
        out.append(f"  why not placed: {st.scheduling.message}")
        for refusal in st.scheduling.nodes:
            out.append(f"    {refusal.node_name}: {'; '.join(refusal.reasons)}")
        if st.scheduling.truncated:
            out.append("    (more nodes were refused than are listed)")
    else:
        sched = next((x for x in st.conditions if x.type == c.COND_SCHEDULED), None)
        out.append(
            f"  {sched.message}"
            if sched
            else "  not looked at yet: is the pcipt controller running?"
        )
    for cond in st.conditions:
        if cond.type != c.COND_READY:
            out.append(
                f"  condition {cond.type}={cond.status} ({cond.reason}) {cond.message}".rstrip()
            )
    print("\n".join(out))
    return 0


def cordon(args: argparse.Namespace, unschedulable: bool) -> int:
    api = _api(args)
    custom = client.CustomObjectsApi(api)
    names: list[str] = list(args.devices)
    if args.node:
        names += [
            o["metadata"]["name"]
            for o in _list(api, c.PLURAL_PCIDEVICE)
            if o["spec"]["nodeName"] == args.node
        ]
    if not names:
        raise PluginError("name a PciDevice (or --node NODE for all of a node's)")
    for name in names:
        try:
            custom.patch_cluster_custom_object(
                c.GROUP,
                c.VERSION,
                c.PLURAL_PCIDEVICE,
                name,
                # Uncordoning also frees a one-time-use device its last VM left reserved, and
                # ends the hold of its last release (the admin vouches for it: scrubbed or not).
                {"spec": {"unschedulable": unschedulable}}
                if unschedulable
                else {"spec": {"unschedulable": False, "reserved": None, "release": None}},
            )
        except client.ApiException as e:
            if e.status == 404:
                _list(api, c.PLURAL_PCIDEVICE)
                raise PluginError(f"pcidevice {name} not found") from e
            raise
        print(f"pcidevice.pcipt.io/{name} {'cordoned' if unschedulable else 'uncordoned'}")
    return 0


def migrate(args: argparse.Namespace) -> int:
    """Ask for a cold (or live) migration: the pcipt.io/migrate annotation, with a new ID; the
    controller answers in status.migration (`kubectl pcipt explain` shows it)."""
    api = _api(args)
    ns = args.namespace or _current_namespace(args)
    request: dict[str, Any] = {"id": uuid.uuid4().hex[:12]}
    if args.to:
        request["to"] = args.to
    if args.live:
        request["live"] = True
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            c.GROUP,
            c.VERSION,
            ns,
            c.PLURAL_PASSTHROUGHVM,
            args.vm,
            {"metadata": {"annotations": {c.ANNOTATION_MIGRATE: json.dumps(request)}}},
        )
    except client.ApiException as e:
        if e.status == 404:
            _list(api, c.PLURAL_PASSTHROUGHVM, ns)
            raise PluginError(f"passthroughvm {ns}/{args.vm} not found") from e
        raise
    print(
        f"passthroughvm.pcipt.io/{args.vm} {'live ' if args.live else ''}migration "
        f"{request['id']} requested"
        + (f" to {args.to}" if args.to else "")
        + f" (follow it with: kubectl pcipt explain {args.vm} -n {ns})"
    )
    return 0


def describe_node(args: argparse.Namespace) -> int:
    api = _api(args)
    devices = sorted(
        (
            PciDevice.model_validate(o)
            for o in _list(api, c.PLURAL_PCIDEVICE)
            if o["spec"]["nodeName"] == args.name
        ),
        key=lambda d: d.spec.address,
    )
    flavors = [PciFlavor.model_validate(o) for o in _list(api, c.PLURAL_PCIFLAVOR)]
    alive = _alive_nodes(api, args.operator_namespace, args.dead_after)
    node_labels = {"kubernetes.io/hostname": args.name, **_node_labels(api).get(args.name, {})}
    print(
        f"Node {args.name}: "
        f"{'alive' if alive.get(args.name) else 'NOT ALIVE (no recent Lease renewal)'}; "
        f"{len(devices)} published device(s)"
    )
    if not devices:
        print(
            "  nothing published: is its node plugin running, with device specs that offer "
            "something?"
        )
        return 0
    table = [
        (
            "ADDRESS",
            "VENDOR:PRODUCT",
            "NAME",
            "NUMA",
            "IOMMU",
            "DRIVER",
            "FLAVORS",
            "STATE",
            "HELD-BY",
        )
    ]
    for d in devices:
        st = d.status
        member_of = [
            f.metadata.name
            for f in flavors
            if device_selector_matches(f.spec.selector, DeviceFacts.of(d), node_labels)
        ]
        ref = d.spec.claim_ref
        held = (
            f"{ref.namespace}/{ref.name}" + (" (companion)" if ref.companion else "")
            if ref
            else "-"
        )
        table.append(
            (
                d.spec.address,
                f"{st.vendor_id}:{st.product_id}",
                (st.product_name or "")[:40],
                str(st.numa_node),
                str(st.iommu_group) if st.iommu_group is not None else "-",
                st.driver or "-",
                ",".join(member_of) or NO_FLAVOR,
                _state(d, alive.get(args.name, False)),
                held,
            )
        )
    _print_table(table)
    return 0


def images(args: argparse.Namespace) -> int:
    """The image catalog: each entry, the ConfigMap it comes from, and the flavors whose
    devices its images support."""
    api = _api(args)
    got = api.sanitize_for_serialization(  # type: ignore[no-untyped-call]
        client.CoreV1Api(api).list_namespaced_config_map(
            args.operator_namespace, label_selector=f"{CATALOG_LABEL}=true"
        )
    )
    flavors = {
        f.metadata.name: f
        for f in (PciFlavor.model_validate(o) for o in _list(api, c.PLURAL_PCIFLAVOR))
    }
    required = sorted(n for n, f in flavors.items() if f.spec.image_support == "Required")
    entries: list[dict[str, Any]] = []
    for cm in sorted(got.get("items") or [], key=lambda x: str(x["metadata"]["name"])):
        name = cm["metadata"]["name"]
        try:
            catalog = ImageCatalog.parse((cm.get("data") or {}).get(CATALOG_KEY, ""))
        except ValueError as err:
            print(f"warning: configmap {name} is not used: {err}", file=sys.stderr)
            continue
        for e in catalog.images:
            entries.append(
                {
                    "match": e.match,
                    "configMap": name,
                    "deviceTypes": e.device_types,
                    "vendorIDs": e.vendor_ids,
                    "guestDrivers": e.guest_drivers,
                    "flavors": supported_flavors(e, flavors),
                }
            )
    if args.output != "table":
        _dump({"images": entries, "flavorsRequiringMarkedImages": required}, args.output)
        return 0
    if not entries:
        print(f"no image catalog entries in {args.operator_namespace}")
    else:
        rows = [("MATCH", "DEVICE-TYPES", "VENDORS", "GUEST-DRIVERS", "FLAVORS", "CONFIGMAP")]
        for x in entries:
            rows.append(
                (
                    x["match"],
                    ",".join(x["deviceTypes"] or ["*"]),
                    ",".join(x["vendorIDs"] or ["*"]),
                    ",".join(x["guestDrivers"]) or "-",
                    ",".join(x["flavors"]) or "-",
                    x["configMap"],
                )
            )
        _print_table(rows)
    if required:
        print(f"flavors that need a marked image: {', '.join(required)}")
    return 0


def _since(text: str | None) -> float | None:
    """--since: a duration back from now (90m, 24h, 30d) or an RFC 3339 time."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        return clock.parse(text).timestamp()
    except ValueError as e:
        raise PluginError(f"--since {text!r}: use a duration (90m, 24h, 7d) or a time") from e


def usage(args: argparse.Namespace) -> int:
    """Device time per VM, flavor and price class, from the usage ledgers and open claims."""
    api = _api(args)
    got = api.sanitize_for_serialization(  # type: ignore[no-untyped-call]
        client.CoreV1Api(api).list_namespaced_config_map(
            args.operator_namespace, label_selector=f"{USAGE_LABEL}=true"
        )
    )
    now = time.time()
    since = _since(args.since)
    intervals: list[Interval] = []
    rolled: dict[Any, float] = {}
    folded_after: float | None = None
    for cm in got.get("items") or []:
        name = cm["metadata"]["name"]
        if not name.startswith(USAGE_PREFIX):
            continue
        got_intervals, got_rolled, before = parse_ledger(name[len(USAGE_PREFIX) :], cm.get("data"))
        intervals += got_intervals
        rolled.update(got_rolled)
        if before is not None:
            folded_after = max(folded_after or 0.0, before)
    closed = {(i.namespace, i.vm, i.flavor, int(i.start)) for i in intervals}
    flavors = {
        f.metadata.name: f
        for f in (PciFlavor.model_validate(o) for o in _list(api, c.PLURAL_PCIFLAVOR))
    }
    for o in _list(api, c.PLURAL_PCIDEVICE):
        ref = (o.get("spec") or {}).get("claimRef") or {}
        if not ref.get("flavor") or ref.get("companion") or not ref.get("claimedAt"):
            continue
        start = clock.parse(ref["claimedAt"]).timestamp()
        if (ref["namespace"], ref["name"], ref["flavor"], int(start)) in closed:
            continue
        f = flavors.get(ref["flavor"])
        price = (f.spec.price_class if f else None) or ""
        intervals.append(Interval(ref["namespace"], ref["name"], ref["flavor"], price, start, None))
    if since is not None and folded_after is not None and since < folded_after:
        print(
            "note: intervals before "
            + clock.timestamp(datetime.fromtimestamp(folded_after, UTC))
            + " are kept as totals only, counted whole",
            file=sys.stderr,
        )
    whole = rolled if since is None or since < (folded_after or 0) else {}
    per_vm = usage_totals(intervals, whole, now=now, since=since)
    if args.namespace:
        per_vm = {k: v for k, v in per_vm.items() if k[0] == args.namespace}
    rows_out = [
        {"namespace": ns, "vm": vm, "flavor": f, "priceClass": p, "deviceSeconds": round(v, 1)}
        for (ns, vm, f, p), v in sorted(per_vm.items())
    ]
    if args.output != "table":
        _dump({"since": since, "until": now, "usage": rows_out}, args.output)
        return 0
    if not rows_out:
        print("no device time recorded" + (f" in {args.namespace}" if args.namespace else ""))
        return 0
    rows = [("NAMESPACE", "VM", "FLAVOR", "PRICE-CLASS", "DEVICE-HOURS")]
    rows += [
        (ns, vm, f, p or "-", f"{v / 3600:.3f}") for (ns, vm, f, p), v in sorted(per_vm.items())
    ]
    _print_table(rows)
    return 0


def _current_namespace(args: argparse.Namespace) -> str:
    try:
        _, ctx = config.list_kube_config_contexts(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
        if args.context:
            contexts, _ = config.list_kube_config_contexts(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
            ctx = next((x for x in contexts if x["name"] == args.context), ctx)
        return str(ctx.get("context", {}).get("namespace") or "default")
    except (config.ConfigException, TypeError):
        return "default"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _dump(doc: Any, fmt: str) -> None:
    print(
        json.dumps(doc, indent=2) if fmt == "json" else yaml.safe_dump(doc, sort_keys=False),
        end="\n" if fmt == "json" else "",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubectl pcipt", description="What pcipt's passthrough devices are doing."
    )
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument(
        "--operator-namespace", default=c.DEFAULT_NAMESPACE, help="where node Leases live"
    )
    p.add_argument(
        "--dead-after",
        type=float,
        default=40.0,
        help="seconds without a Lease renewal before a node counts as not alive",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    inv = sub.add_parser(
        "inventory", help="devices per node and flavor: total, free, allocated, unhealthy, cordoned"
    )
    inv.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    inv.add_argument("--node")
    inv.add_argument("--flavor")
    inv.add_argument(
        "--recount",
        action="store_true",
        help=f"count every device now, also past {SUMMARY_ABOVE} nodes (where the controller's "
        "counts, at most a few seconds old, are read instead)",
    )
    inv.add_argument(
        "--max-age",
        type=float,
        default=45.0,
        help="seconds since the controller last checked its counts past which they are not used",
    )
    ex = sub.add_parser("explain", help="where a VM is and why, or why it is not placed")
    ex.add_argument("vm")
    ex.add_argument("-n", "--namespace")
    for verb in ("cordon", "uncordon"):
        cp = sub.add_parser(verb, help=f"{verb} PciDevices (no new VM gets a cordoned device)")
        cp.add_argument("devices", nargs="*", metavar="DEVICE")
        cp.add_argument("--node", help="every device of this node")
    mi = sub.add_parser(
        "migrate",
        help="cold-migrate a VM: stop it, release its devices, start it elsewhere; --live: "
        "move it while it runs",
    )
    mi.add_argument("vm")
    mi.add_argument("-n", "--namespace")
    mi.add_argument("--to", help="the node to move it to (default: any other node)")
    mi.add_argument(
        "--live",
        action="store_true",
        help="keep the guest running (VMs whose only passthrough devices are SR-IOV networks)",
    )
    us = sub.add_parser("usage", help="device time per VM, flavor and price class (for charging)")
    us.add_argument("-n", "--namespace", help="only this namespace (default: all)")
    us.add_argument("--since", help="from this long ago (90m, 24h, 7d) or this time (RFC 3339)")
    us.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    im = sub.add_parser(
        "images", help="the image catalog: which images support which flavors' devices"
    )
    im.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    de = sub.add_parser("describe", help="describe node NAME: what a host offers, and to whom")
    de.add_argument("what", choices=["node"])
    de.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "inventory":
            return inventory(args)
        if args.cmd == "explain":
            return explain(args)
        if args.cmd in ("cordon", "uncordon"):
            return cordon(args, args.cmd == "cordon")
        if args.cmd == "migrate":
            return migrate(args)
        if args.cmd == "images":
            return images(args)
        if args.cmd == "usage":
            return usage(args)
        return describe_node(args)
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except client.ApiException as e:
        print(f"error: the API server answered {e.status} {e.reason}", file=sys.stderr)
        return 1
