"""The peer: the same fill as bench/bind.py, done by Kubernetes itself — kube-scheduler
allocating DRA ResourceClaims (resource.k8s.io/v1) to pods.

Same local control plane and flags as bench/bind.py (etcd without fsync unless --fsync); N
Node objects (no kubelet: the scheduler only needs their capacity), one ResourceSlice per node
with D devices of one driver, a DeviceClass whose CEL selector picks that driver, and per
"VM" one ResourceClaim asking for one device of the class plus one pod using it. Half the
devices are filled first, then the other half is measured: pods per second until every pod
is bound, time from a pod's creation to its nodeName (p50/p95/p99), API writes per placement
from apiserver_request_total (the client's own POSTs of pods and claims left out), and CPU
seconds per process. kube-scheduler runs with its client limits raised (--qps/--burst) or at
its defaults (--default-limits: 50 QPS, burst 100).

    .venv/bin/python bench/peer_dra.py --nodes 500 --devices 10 [--default-limits] [--json F]
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

from bench.bind import cpu_seconds, diff, gather_limited, request_counts, settled_counts  # noqa: E402
from bench.common import FirstSeen, pct  # noqa: E402
from pcipt.devcluster import LocalCluster, binaries  # noqa: E402
from pcipt.kubeclient import KubeClient, load_credentials  # noqa: E402

NS = "bench"
DRIVER = "gpu.bench.pcipt.io"
CLASS = "bench-gpu"
RESOURCE = "/apis/resource.k8s.io/v1"


def node_body(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
            "labels": {"kubernetes.io/hostname": name}}}  # fmt: skip


def node_status(name: str) -> dict[str, Any]:
    capacity = {"cpu": "64", "memory": "256Gi", "pods": "110"}
    return {
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Bench",
                    "message": "no kubelet: Node objects only",
                }
            ],
        }
    }


def slice_body(node: str, devices: int) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-gpus"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {"name": f"gpu-{i}", "attributes": {"index": {"int": i}}} for i in range(devices)
            ],
        },
    }


def claim_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": CLASS}}]}},
    }


def pod_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "vm", "image": "pause", "resources": {"claims": [{"name": "gpu"}]}}
            ],
        },
    }


async def create_vms(api: KubeClient, names: list[str]) -> dict[str, float]:
    """A claim, then its pod, for each; the pod's creation time noted."""
    created: dict[str, float] = {}

    async def one(name: str) -> None:
        await api.create(f"{RESOURCE}/namespaces/{NS}/resourceclaims", claim_body(name))
        created[name] = time.monotonic()
        await api.create(f"/api/v1/namespaces/{NS}/pods", pod_body(name))

    await gather_limited(16, [one(n) for n in names])
    return created


def bound(pod: dict[str, Any]) -> bool:
    return bool((pod.get("spec") or {}).get("nodeName"))


def start_scheduler(
    state: Path, kubeconfig: Path, qps: float | None, burst: int | None
) -> subprocess.Popen[bytes]:
    exe = binaries.ensure_node()["kube-scheduler"]
    conn = f"  kubeconfig: {kubeconfig}\n"
    if qps is not None:
        conn += f"  qps: {qps}\n  burst: {burst}\n"
    cfg = state / "scheduler.yaml"
    cfg.write_text(
        "apiVersion: kubescheduler.config.k8s.io/v1\n"
        "kind: KubeSchedulerConfiguration\n"
        f"clientConnection:\n{conn}"
        "leaderElection:\n  leaderElect: false\n"
    )
    log = open(state / "scheduler.log", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [str(exe), f"--config={cfg}", "--secure-port=0", "--v=1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    qps, burst = (None, None) if args.default_limits else (args.qps, args.burst)
    out: dict[str, Any] = {
        "peer": "kube-scheduler + DRA (resource.k8s.io/v1)",
        "nodes": args.nodes,
        "devices_per_node": args.devices,
        "scheduler_client": "defaults (50 QPS, burst 100)"
        if qps is None
        else f"{qps} QPS, burst {burst}",
        "etcd_fsync": args.fsync,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    state = Path(tempfile.mkdtemp(prefix="pcipt-peer-"))
    cluster = LocalCluster(state, fsync=args.fsync)
    print(f"control plane: starting in {state}", flush=True)
    cluster.up()
    sched: subprocess.Popen[bytes] | None = None
    try:
        api = KubeClient(load_credentials(str(cluster.kubeconfig)), pool=64)
        await api.open()
        await api.create("/api/v1/namespaces", {"metadata": {"name": NS}})
        # No kube-controller-manager makes it; pods' service-account admission wants it.
        await api.create(
            f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": "default"}}
        )
        await api.create(
            f"{RESOURCE}/deviceclasses",
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": CLASS},
                "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{DRIVER}"'}}]},
            },
        )
        names = [f"node-{i:04d}" for i in range(args.nodes)]

        async def node(name: str) -> None:
            await api.create("/api/v1/nodes", node_body(name))
            await api.patch(f"/api/v1/nodes/{name}/status", node_status(name))
            # The API server taints a new Node not-ready until its kubelet says otherwise;
            # with no kubelet (nor node lifecycle controller), the bench says it is ready.
            await api.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}})
            await api.create(f"{RESOURCE}/resourceslices", slice_body(name, args.devices))

        t0 = time.monotonic()
        await gather_limited(32, [node(n) for n in names])
        out["publish_s"] = round(time.monotonic() - t0, 1)
        total = args.nodes * args.devices
        print(f"published {args.nodes} nodes, {total} devices in {out['publish_s']}s", flush=True)

        sched = start_scheduler(state, cluster.kubeconfig, qps, burst)
        watcher = FirstSeen(api, NS, bound, path=f"/api/v1/namespaces/{NS}/pods")
        await watcher.start()

        def alive() -> None:
            if sched is not None and sched.poll() is not None:
                tail = (state / "scheduler.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kube-scheduler exited {sched.returncode}:\n{tail}")

        half = total // 2
        prefill = [f"pre-{i:05d}" for i in range(half)]
        t0 = time.monotonic()
        await create_vms(api, prefill)
        await watcher.wait(prefill, timeout=900, check=alive)
        out["scheduler_start_and_prefill_s"] = round(time.monotonic() - t0, 1)
        print(f"pre-filled {half} pods in {out['scheduler_start_and_prefill_s']}s", flush=True)

        fill = [f"fill-{i:05d}" for i in range(total - half)]
        before = await request_counts(api)
        st = cluster.state()
        assert st is not None
        pids = {"kube-scheduler": sched.pid, "kube-apiserver": st.apiserver_pid,
                "etcd": st.etcd_pid, "bench-client": os.getpid()}  # fmt: skip
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        t0 = time.monotonic()
        created = await create_vms(api, fill)
        await watcher.wait(fill, timeout=900, check=alive)
        took = max(watcher.at[n] for n in fill) - t0
        after = await settled_counts(api, before)
        cpu = {k: round(cpu_seconds(v) - cpu0[k], 2) for k, v in pids.items()}
        writes = diff(after, before)
        peer_writes = sum(
            v for k, v in writes.items() if k not in ("POST/pods", "POST/resourceclaims")
        )
        lat = [watcher.at[n] - created[n] for n in fill]
        per_s = len(fill) / took
        out["fill"] = {
            "pods": len(fill),
            "seconds": round(took, 2),
            "pods_per_s": round(per_s, 1),
            "time_to_bound_s": {
                "p50": round(pct(lat, 50), 3),
                "p95": round(pct(lat, 95), 3),
                "p99": round(pct(lat, 99), 3),
            },
            "writes_by_kind": writes,
            "scheduler_writes_per_placement": round(peer_writes / len(fill), 2),
            "cpu_seconds": cpu,
            "scheduler_cpu_ms_per_placement": round(cpu["kube-scheduler"] / len(fill) * 1000, 2),
        }
        print(
            f"fill {len(fill)} pods ({half}->{total} devices): {per_s:.1f} pods/s; "
            f"time-to-bound p50/p95/p99 {pct(lat, 50):.3f}/{pct(lat, 95):.3f}/{pct(lat, 99):.3f}s; "
            f"{peer_writes / len(fill):.2f} scheduler writes per placement {writes}; "
            f"CPU seconds {cpu}",
            flush=True,
        )
        watcher.stop()
        await api.close()
    finally:
        if sched is not None:
            sched.terminate()
            sched.wait(timeout=20)
        cluster.down()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--devices", type=int, default=10, help="devices per node")
    p.add_argument("--qps", type=float, default=5000.0, help="kube-scheduler's client QPS")
    p.add_argument("--burst", type=int, default=10000, help="kube-scheduler's client burst")
    p.add_argument("--default-limits", action="store_true", help="kube-scheduler's own limits")
    p.add_argument("--fsync", action="store_true", help="let etcd fsync (slower, like production)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
