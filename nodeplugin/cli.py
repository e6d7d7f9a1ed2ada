"""The pcipt-nodeplugin command line: run (the agent), discover (what would be published,
without a cluster) and simulate-host (build a fake sysfs tree from a hardware profile).

Every setting is declared once below with its environment twin (PCIPT_<NAME>); the flag wins
over the twin (pcipt.settings).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path

import yaml

from nodeplugin import pciids
from nodeplugin.agent import AgentSettings, NodeAgent
from nodeplugin.devicespec import DeviceSpecError, decide, load_specs
from nodeplugin.discovery import discover
from nodeplugin.publish import desired_devices
from nodeplugin.simulate import SimulatedKernel, build_host, load_profile
from nodeplugin.sriov import RecordingRunner
from pcipt import constants as c
from pcipt import logs, metrics
from pcipt.cpulist import parse_cpulist
from pcipt.kubeclient import KubeClient, load_credentials
from pcipt.logs import setup_logging
from pcipt.settings import (
    KUBECONFIG,
    Setting,
    add_settings,
    default_of,
    optional_path,
    parse_args,
)


def D(name: str) -> object:  # noqa: N802 - reads as a column of the table below
    """AgentSettings' default for a field."""
    return default_of(AgentSettings, name)


# Every setting once, with its PCIPT_<NAME> twin (pcipt.settings); the flag wins over the twin.
COMMON_SETTINGS: tuple[Setting, ...] = (
    Setting("--node-name", socket.gethostname, "this node's name (default: the host name)"),
    Setting("--sysfs-root", D("sysfs_root"), "sysfs to read", Path),
    Setting(
        "--config",
        None,
        "the node's device specs (YAML or JSON)",
        optional_path,
        env="DEVICE_CONFIG",
    ),
    Setting(
        "--nova-conf",
        None,
        "a nova.conf whose [pci] device_spec / passthrough_whitelist to honour",
        optional_path,
    ),
    Setting(
        "--pci-ids",
        None,
        "pci.ids database (default: /usr/share/misc/pci.ids or /usr/share/hwdata/pci.ids)",
        optional_path,
    ),
)
RUN_SETTINGS: tuple[Setting, ...] = (
    KUBECONFIG,
    Setting("--libvirt-uri", D("libvirt_uri"), "libvirt connection URI"),
    Setting(
        "--migration-uri",
        "",
        "the libvirt URI other nodes' libvirt migrates running domains to this node at "
        "(qemu+tls://HOST/system); '' takes part in no live migration",
    ),
    Setting("--namespace", D("namespace"), "where the node Lease lives"),
    Setting("--state-dir", D("state_dir"), "the agent's state folder", Path),
    Setting("--rescan-interval", D("rescan_interval"), "seconds between sysfs rescans", float),
    Setting("--lease-interval", D("lease_interval"), "seconds between node Lease renewals", float),
    Setting("--lease-duration", D("lease_duration"), "the node Lease's duration in seconds", int),
    Setting(
        "--resync-interval", D("resync_interval"), "seconds between domain reconciliations", float
    ),
    Setting(
        "--restore-drivers",
        D("restore_drivers"),
        "give devices back to their original driver after their VM goes",
        kind="flag",
        negatable=True,
    ),
    Setting(
        "--scrub",
        D("scrub"),
        "reset released devices and return them to their own driver before they are offered "
        "again (the controller waits for it)",
        kind="flag",
        negatable=True,
    ),
    Setting(
        "--aer-hold-down",
        D("aer_hold_down"),
        "seconds a device stays Unhealthy after its fatal PCIe error count last rose",
        float,
    ),
    Setting(
        "--stop-grace",
        D("stop_grace"),
        "seconds a guest gets to shut down before its domain is destroyed",
        float,
    ),
    Setting("--domain-type", D("domain_type"), "libvirt domain type (kvm; qemu without KVM)"),
    Setting("--machine", "q35", "guest machine type ('' for none)"),
    Setting(
        "--console-log-dir",
        "",
        "copy each guest's serial console to <dir>/<domain>.log on the host ('' for none)",
    ),
    Setting(
        "--reserved-cpus",
        "",
        "host CPUs kept for the host (cpulist, e.g. 0-1,32-33): no VM runs on them; dedicated "
        "VMs' emulator threads do",
    ),
    Setting(
        "--reserved-memory-mib",
        D("reserved_memory_mib"),
        "memory kept for the host on each NUMA node, MiB",
        int,
    ),
    Setting(
        "--simulate",
        False,
        "the sysfs root is a simulated host: answer driver binds as a kernel would",
        kind="flag",
    ),
    *metrics.SETTINGS,
    *logs.SETTINGS,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcipt-nodeplugin", description="The pcipt node agent.")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run the agent")
    add_settings(run, (*COMMON_SETTINGS, *RUN_SETTINGS))

    disc = sub.add_parser("discover", help="print what this node would publish, without a cluster")
    add_settings(disc, COMMON_SETTINGS)
    disc.add_argument(
        "--node-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of this node, for entries limited by nodeSelector (repeatable)",
    )
    disc.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    disc.add_argument(
        "--all", action="store_true", help="table: list functions that are not offered too"
    )

    sim = sub.add_parser("simulate-host", help="build a fake sysfs tree from a hardware profile")
    sim.add_argument("--profile", type=Path, required=True)
    sim.add_argument("--host", required=True, help="which host of the profile")
    sim.add_argument("--root", type=Path, required=True, help="empty folder to build the tree in")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        build_parser(),
        {"run": (*COMMON_SETTINGS, *RUN_SETTINGS), "discover": COMMON_SETTINGS},
        argv,
    )
    if args.cmd == "discover":
        return cmd_discover(args)
    if args.cmd == "simulate-host":
        hosts = {h.name: h for h in load_profile(args.profile.read_text())}
        if args.host not in hosts:
            print(
                f"pcipt-nodeplugin: {args.profile} has no host {args.host!r} "
                f"(it has {sorted(hosts)})",
                file=sys.stderr,
            )
            return 1
        build_host(args.root, hosts[args.host])
        print(f"built {args.root} for {args.host}")
        return 0
    return cmd_run(args)


def cmd_discover(args: argparse.Namespace) -> int:
    try:
        specs = load_specs(
            args.config.read_text() if args.config else None,
            nova_conf=args.nova_conf.read_text() if args.nova_conf else None,
        )
        host = discover(args.sysfs_root)
        labels = {"kubernetes.io/hostname": args.node_name}
        labels.update(dict(kv.split("=", 1) for kv in args.node_label))
        decisions = decide(specs, host, labels)
    except (DeviceSpecError, OSError) as e:
        print(f"pcipt-nodeplugin discover: {e}", file=sys.stderr)
        return 1
    ids = pciids.load(args.pci_ids)
    desired = desired_devices(args.node_name, host, decisions, ids)
    if args.output in ("yaml", "json"):
        objs = [
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_PCIDEVICE,
                "metadata": {"name": d.name, "labels": d.labels},
                "spec": d.spec,
                "status": d.status,
            }
            for d in desired.values()
        ]
        if args.output == "json":
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=2))
        else:
            print(yaml.safe_dump_all(objs, sort_keys=False), end="")
        return 0
    by_addr = {d.address: d for d in decisions}
    rows = [
        (
            "ADDRESS",
            "VENDOR:PRODUCT",
            "CLASS",
            "DRIVER",
            "NUMA",
            "IOMMU",
            "SR-IOV",
            "NETDEV",
            "OFFERED",
            "BY",
            "PHYSNET",
            "NAME",
        )
    ]
    for f in host.functions:
        d = by_addr[f.address]
        if not d.publish and not args.all:
            continue
        sriov = f.sriov_role if f.sriov_role != "VF" else f"VF{f.vf_index} of {f.phys_fn}"
        rows.append(
            (
                f.address,
                f"{f.vendor_id}:{f.product_id}",
                f.class_code,
                f.driver or "-",
                str(f.numa_node),
                str(f.iommu_group) if f.iommu_group is not None else "-",
                sriov if sriov != "None" else "-",
                f.netdev or "-",
                "yes" if d.publish else "no",
                d.entry or "-",
                d.physical_network or "-",
                ids.device(f.vendor_id, f.product_id) or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if len(rows) == 1:
        print(
            "(nothing offered: no device spec entry matches; --all lists every function)",
            file=sys.stderr,
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    settings = AgentSettings(
        node=args.node_name,
        sysfs_root=args.sysfs_root,
        config=args.config,
        nova_conf=args.nova_conf,
        libvirt_uri=args.libvirt_uri,
        migration_uri=args.migration_uri or None,
        namespace=args.namespace,
        state_dir=args.state_dir,
        pci_ids=args.pci_ids,
        rescan_interval=args.rescan_interval,
        lease_interval=args.lease_interval,
        lease_duration=args.lease_duration,
        resync_interval=args.resync_interval,
        restore_drivers=args.restore_drivers,
        scrub=args.scrub,
        aer_hold_down=args.aer_hold_down,
        domain_type=args.domain_type,
        machine=args.machine or None,
        console_log_dir=args.console_log_dir or None,
        reserved_cpus=parse_cpulist(args.reserved_cpus),
        reserved_memory_mib=args.reserved_memory_mib,
        stop_grace=args.stop_grace,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )

    async def main_async() -> None:
        async with KubeClient(
            load_credentials(args.kubeconfig), user_agent="pcipt-nodeplugin"
        ) as api:
            if args.simulate:  # a fake sysfs tree answered as a kernel would; `ip` recorded
                agent = NodeAgent(
                    api,
                    settings,
                    writer=SimulatedKernel(settings.sysfs_root),
                    runner=RecordingRunner(),
                )
            else:
                agent = NodeAgent(api, settings)
            await agent.run_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async())
    return 0
