"""How fast the controller evacuates a node declared down, against the real local control plane.

    .venv/bin/python bench/lifecycle.py [--vms 200] [--json FILE]

What it does:
1. starts a local control plane and `pcipt-controller run` (--node-dead-after 2), publishes
   --vms devices on node-a and as many on node-b the way node plugins do, with Leases kept
   renewed, and places --vms VMs on node-a (node-b's devices appear only afterwards);
2. node-a stops renewing its Lease (its plugin is gone) and, once the controller has marked
   its VMs NodeAlive=False, the Node is tainted node.kubernetes.io/out-of-service;
3. reports, from the taint: the time until each VM is placed again on node-b (p50, p99, max)
   and until all are, the API writes per evacuated VM from apiserver_request_total, and the
   controller's CPU per VM.

It prints figures (and writes them as JSON with --json); it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import config as k8s_config  # noqa: E402

from bench.bind import (  # noqa: E402
    cpu_seconds,
    create_vms,
    diff,
    gather_limited,
    now_iso,
    request_counts,
    settled_counts,
)
from bench.common import FirstSeen, pct  # noqa: E402
from pcipt import constants as c  # noqa: E402
from pcipt.api.v1alpha1 import pcidevice_name  # noqa: E402
from pcipt.devcluster import LocalCluster  # noqa: E402
from pcipt.devcluster.crds import apply_crds  # noqa: E402
from pcipt.kubeclient import KubeClient, crd_path, load_credentials  # noqa: E402

NS = "bench"
FLAVOR = "bench-gpu"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{c.DEFAULT_NAMESPACE}/leases"


async def device(api: KubeClient, node: str, i: int) -> None:
    addr = f"0000:{0x10 + i // 32:02x}:{i % 32:02x}.0"
    name = pcidevice_name(node, addr)
    await api.create(
        crd_path(c.PLURAL_PCIDEVICE),
        {
            "apiVersion": c.API_VERSION,
            "kind": "PciDevice",
            "metadata": {"name": name, "labels": {c.LABEL_NODE: node}},
            "spec": {"nodeName": node, "address": addr},
        },
    )
    status = {
        "vendorID": "10de",
        "productID": "20b0",
        "classCode": "030200",
        "driver": "vfio-pci",
        "numaNode": 0,
        "health": "Healthy",
        "sriov": {"role": "None"},
    }
    await api.patch(crd_path(c.PLURAL_PCIDEVICE, name, subresource="status"), {"status": status})


async def renew(api: KubeClient, node: str) -> None:
    await api.patch(
        f"{LEASES}/{c.NODE_LEASE_PREFIX}{node}",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": f"{c.NODE_LEASE_PREFIX}{node}"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 2, "renewTime": now_iso()},
        },
        patch_type="apply",
        field_manager="bench-node",
        force=True,
    )


async def keep_renewing(api: KubeClient, nodes: set[str]) -> None:
    while True:
        for n in sorted(nodes):
            await renew(api, n)
        await asyncio.sleep(0.5)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vms": args.vms,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
    }
    state = Path(tempfile.mkdtemp(prefix="pcipt-bench-"))
    cluster = LocalCluster(state)
    print(f"control plane: starting in {state}", flush=True)
    cluster.up()
    ctl: subprocess.Popen[bytes] | None = None
    renewing = {"node-a", "node-b"}
    renewer: asyncio.Task[None] | None = None
    try:
        apply_crds(k8s_config.new_client_from_config(str(cluster.kubeconfig)))
        api = KubeClient(load_credentials(str(cluster.kubeconfig)), pool=64)
        await api.open()
        for ns in (c.DEFAULT_NAMESPACE, NS):
            await api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        for node in ("node-a", "node-b"):
            await api.create("/api/v1/nodes", {"metadata": {"name": node}})
        await api.create(
            crd_path(c.PLURAL_PCIFLAVOR),
            {
                "apiVersion": c.API_VERSION,
                "kind": "PciFlavor",
                "metadata": {"name": FLAVOR},
                "spec": {"deviceType": "gpu", "selector": {"vendorIDs": ["10de"]}},
            },
        )
        renewer = asyncio.get_running_loop().create_task(keep_renewing(api, renewing))
        await gather_limited(32, [device(api, "node-a", i) for i in range(args.vms)])
        log = open(state / "controller.log", "wb")  # noqa: SIM115
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), PYTHONUNBUFFERED="1")
        ctl = subprocess.Popen(
            [sys.executable, "-m", "controller", "run", "--node-dead-after", "2",
             "--audit-interval", "600", "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip

        def controller_alive() -> None:
            if ctl is not None and ctl.poll() is not None:
                tail = (state / "controller.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the controller exited {ctl.returncode}:\n{tail}")

        names = [f"vm-{i:05d}" for i in range(args.vms)]
        on_a = FirstSeen(api, NS, lambda v: (v.get("status") or {}).get("nodeName") == "node-a")
        await on_a.start()
        await create_vms(api, names)
        await on_a.wait(names, timeout=600, check=controller_alive)
        on_a.stop()
        await gather_limited(32, [device(api, "node-b", i) for i in range(args.vms)])
        print(f"{args.vms} VMs on node-a; node-b has {args.vms} free devices", flush=True)

        renewing.discard("node-a")  # node-a's plugin is gone
        await asyncio.sleep(3.5)  # past --node-dead-after: the controller marks it not alive
        on_b = FirstSeen(api, NS, lambda v: (v.get("status") or {}).get("nodeName") == "node-b")
        await on_b.start()
        before = await request_counts(api)
        cpu0 = cpu_seconds(ctl.pid)
        tainted = time.monotonic()
        await api.patch(
            "/api/v1/nodes/node-a",
            {"spec": {"taints": [{"key": c.TAINT_OUT_OF_SERVICE, "value": "nodeshutdown",
                                  "effect": "NoExecute"}]}},
        )  # fmt: skip
        await on_b.wait(names, timeout=600, check=controller_alive)
        done = time.monotonic() - tainted
        lat = [on_b.at[n] - tainted for n in names]
        after = await settled_counts(api, before)
        cpu = cpu_seconds(ctl.pid) - cpu0
        writes = diff(after, before)
        writes.pop("PATCH/nodes", None)  # the taint
        writes.pop("APPLY/leases", None)
        writes.pop("PATCH/leases", None)
        total_writes = sum(writes.values())
        out["evacuation"] = {
            "all_placed_again_s": round(done, 2),
            "vms_per_s": round(args.vms / done, 1),
            "taint_to_placed_s": {
                "p50": round(pct(lat, 50), 3),
                "p99": round(pct(lat, 99), 3),
                "max": round(max(lat), 3),
            },
            "writes_by_kind": writes,
            "writes_per_vm": round(total_writes / args.vms, 2),
            "controller_cpu_ms_per_vm": round(cpu / args.vms * 1000, 2),
        }
        print(
            f"evacuated {args.vms} VMs in {done:.2f}s ({args.vms / done:.1f}/s); taint to placed "
            f"p50 {pct(lat, 50):.3f}s p99 {pct(lat, 99):.3f}s; {total_writes / args.vms:.2f} "
            f"writes per VM {writes}; controller CPU {cpu / args.vms * 1000:.2f} ms per VM",
            flush=True,
        )
        on_b.stop()
        await api.close()
    finally:
        if renewer is not None:
            renewer.cancel()
        if ctl is not None:
            ctl.terminate()
            try:
                ctl.wait(timeout=15)
            except subprocess.TimeoutExpired:
                ctl.kill()
        cluster.down()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=200)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
