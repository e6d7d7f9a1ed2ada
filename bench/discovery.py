"""Discovery and publishing cost on a big SR-IOV host.

    .venv/bin/python bench/discovery.py [--pfs 8] [--vfs 64] [--rounds 20]

Builds a simulated host with --pfs PFs of --vfs VFs each (plus their PFs: 8 x 64 = 520
functions), then reports:
- discovery time (reading the sysfs tree), device-spec decision time, publish-plan time;
- against the real local control plane, the node plugin's first rescan (publishes every VF)
  and a quiet rescan after it: API writes each, and wall time;
- `pcipt-nodeplugin run` as its own process on the same host: resident memory once it has
  published every device, and after two more rescans.
It prints figures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402

from bench.common import memory_mib  # noqa: E402
from nodeplugin.agent import AgentSettings, NodeAgent  # noqa: E402
from nodeplugin.devicespec import decide, load_specs  # noqa: E402
from nodeplugin.discovery import discover  # noqa: E402
from nodeplugin.pciids import load  # noqa: E402
from nodeplugin.publish import desired_devices, plan  # noqa: E402
from nodeplugin.simulate import (  # noqa: E402
    DeviceSpec,
    HostProfile,
    SimulatedKernel,
    SriovSpec,
    build_host,
)
from nodeplugin.sriov import RecordingRunner  # noqa: E402
from pcipt import constants as c  # noqa: E402
from pcipt.devcluster import LocalCluster  # noqa: E402
from pcipt.devcluster.crds import apply_crds  # noqa: E402
from pcipt.kubeclient import KubeClient, load_credentials, retry_transient  # noqa: E402

CONFIG = (
    "devices: [{name: vfs, match: {vendorID: '8086', productID: '1889'}, "
    "physicalNetwork: physnet2}]"
)


def profile(pfs: int, vfs: int) -> HostProfile:
    devices = [
        DeviceSpec(
            f"0000:{0x18 + i:02x}:00.0",
            "8086",
            "1592",
            "020000",
            numa=i % 2,
            driver="ice",
            iommu_group=i + 1,
            netdev=f"ens{i}f0",
            sriov=SriovSpec(vfs, vfs, "1889", "iavf", f"ens{i}f0v"),
        )
        for i in range(pfs)
    ]
    return HostProfile("big", {0: "0-31", 1: "32-63"}, devices)


def timed(fn: Any, rounds: int) -> tuple[float, Any]:
    samples, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), out


async def rescans(root: Path, kubeconfig: Path, state: Path, config: Path) -> dict[str, Any]:
    async with KubeClient(load_credentials(str(kubeconfig))) as api:
        agent = NodeAgent(
            api,
            AgentSettings(
                node="big",
                sysfs_root=root,
                config=config,
                libvirt_uri="test:///default",
                state_dir=state,
                rescan_interval=3600,
            ),
            writer=SimulatedKernel(root),
            runner=RecordingRunner(),
        )
        await retry_transient(agent.devices.relist)
        t = time.perf_counter()
        first = await agent.rescan()
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        quiet = await agent.rescan()
        quiet_s = time.perf_counter() - t
        return {
            "first_rescan": {
                "writes": first.writes,
                "seconds": round(first_s, 2),
                "devices": len(first.apply_spec),
            },
            "quiet_rescan": {"writes": quiet.writes, "seconds": round(quiet_s, 3)},
        }


def plugin_memory(
    root: Path, kubeconfig: Path, work: Path, config: Path, expect: int
) -> dict[str, Any]:
    """`pcipt-nodeplugin run` as its own process on the simulated host: its resident memory
    (now and peak, MiB) once it has published every device, and a rescan later."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    log = open(work / "nodeplugin.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "nodeplugin", "run", "--simulate",
            "--node-name", "mem", "--sysfs-root", str(root), "--config", str(config),
            "--libvirt-uri", "test:///default", "--state-dir", str(work / "mem-state"),
            "--rescan-interval", "2", "--metrics-port", "0", "--log-level", "WARNING",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        custom = client.CustomObjectsApi(k8s_config.new_client_from_config(str(kubeconfig)))
        deadline = time.monotonic() + 300
        while True:
            got = custom.list_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, label_selector=f"{c.LABEL_NODE}=mem"
            )
            if len(got["items"]) >= expect:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (work / "nodeplugin.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the node plugin did not publish {expect} devices:\n{tail}")
            time.sleep(0.5)
        published = memory_mib(proc.pid)
        time.sleep(5)  # two rescans more
        return {"published": published, "after_rescans": memory_mib(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pfs", type=int, default=8)
    p.add_argument("--vfs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcipt-discovery-"))
    root = work / "sys"
    build_host(root, profile(args.pfs, args.vfs))
    ids = load()
    specs = load_specs(CONFIG)
    t_disc, host = timed(lambda: discover(root), args.rounds)
    t_decide, decisions = timed(lambda: decide(specs, host, {}), args.rounds)
    t_desired, desired = timed(lambda: desired_devices("big", host, decisions, ids), args.rounds)
    out: dict[str, Any] = {
        "functions": len(host.functions),
        "offered": sum(d.publish for d in decisions),
        "discovery_ms": round(t_disc * 1000, 1),
        "decide_ms": round(t_decide * 1000, 1),
        "desired_ms": round(t_desired * 1000, 1),
    }
    stored = {
        name: {
            "metadata": {"name": name, "labels": d.labels, "resourceVersion": "1"},
            "spec": d.spec,
            "status": d.status,
        }
        for name, d in desired.items()
    }
    t_plan, quiet = timed(lambda: plan(desired, stored, set(desired)), args.rounds)
    out["quiet_plan_ms"] = round(t_plan * 1000, 1)
    out["quiet_plan_writes"] = quiet.writes
    print(
        f"{out['functions']} functions ({args.pfs} PFs x {args.vfs} VFs): "
        f"discovery {out['discovery_ms']} ms, "
        f"device specs {out['decide_ms']} ms, desired objects {out['desired_ms']} ms, "
        f"quiet plan {out['quiet_plan_ms']} ms ({quiet.writes} writes)",
        flush=True,
    )

    cluster = LocalCluster(work / "cp")
    cluster.up()
    try:
        api = k8s_config.new_client_from_config(str(cluster.kubeconfig))
        apply_crds(api)
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=c.DEFAULT_NAMESPACE))
        )
        (work / "config.yaml").write_text(CONFIG)
        out.update(
            asyncio.run(rescans(root, cluster.kubeconfig, work / "state", work / "config.yaml"))
        )
        out["nodeplugin_memory_mib"] = plugin_memory(
            root, cluster.kubeconfig, work, work / "config.yaml", out["offered"]
        )
    finally:
        cluster.down()
    print(
        f"first rescan against the API server: {out['first_rescan']['writes']} writes for "
        f"{out['first_rescan']['devices']} devices in {out['first_rescan']['seconds']} s; "
        f"quiet rescan: {out['quiet_rescan']['writes']} writes "
        f"in {out['quiet_rescan']['seconds']} s; the node plugin's own process with "
        f"{out['functions']} functions: memory {out['nodeplugin_memory_mib']} MiB",
        flush=True,
    )
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
