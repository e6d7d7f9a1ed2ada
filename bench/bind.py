"""Bind throughput and latency of the controller against the real local control plane.

    .venv/bin/python bench/bind.py [--nodes 500] [--devices 10] [--rate 20] [--steady 30]
        [--waiting 20] [--r-seconds 4] [--prefill 0.5] [--fill N] [--no-requeue] [--json FILE]

At 50k devices (issue 14's scale): --nodes 5000 --prefill 0.1 --fill 5000 --no-requeue.

What it does, in order:
1. starts a local control plane (etcd without fsync, as Kubernetes' integration tests run it;
   `--fsync` to let etcd fsync), installs the CRDs, and publishes N nodes x D devices the way
   node plugins do (create + status), with a Lease per node;
2. measures R, the rate of conditional PATCHes (merge patch carrying resourceVersion) the API
   server takes from one client, at concurrency 1, 8 and 32, on scratch devices;
3. starts `pcipt-controller run` as its own process, creates one VM and reports when it is
   Scheduled (ready: the whole inventory listed) and the controller's memory then, and
   pre-fills --prefill of the devices with VMs;
4. fill: creates --fill VMs (default: the rest) as fast as one client can and reports binds/s,
   time-to-Scheduled p50/p95/p99, API writes per bind from the API server's
   apiserver_request_total (so every writer is counted, whoever it is), CPU per process and
   the controller's memory; then times `kubectl pcipt inventory` on the whole inventory;
5. releases 20% of the VMs (at most 1000; delete + the node plugin's DomainGone) and reports
   releases/s;
6. steady: creates VMs at --rate per second for --steady seconds and reports time-to-Scheduled;
7. requeue (unless --no-requeue): fills the cluster, adds --waiting VMs that are refused,
   then frees one device at a time and reports the time from deleting a bound VM (and its
   DomainGone, as a node plugin reports it) to a waiting VM Scheduled: the queue's reaction to
   capacity (release, re-plan, claim).

It prints figures (and writes them as JSON with --json); it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import config as k8s_config  # noqa: E402

from bench.common import FirstSeen, memory_mib, pct, scheduled  # noqa: E402
from pcipt import constants as c  # noqa: E402
from pcipt.api.v1alpha1 import pcidevice_name  # noqa: E402
from pcipt.devcluster import LocalCluster  # noqa: E402
from pcipt.devcluster.crds import apply_crds  # noqa: E402
from pcipt.kubeclient import KubeClient, crd_path, load_credentials, retry_transient  # noqa: E402

NS = "bench"
FLAVOR = "bench-gpu"
METRIC = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inventory_cli(kubeconfig: Path, *extra: str, runs: int = 3) -> dict[str, Any]:
    """`kubectl pcipt inventory` as a user runs it, timed from start to exit, `runs` times in
    a row (the first right after the fill, while the API server still settles): the median,
    every run, and who counted (past 500 nodes the controller's published counts are read;
    `--recount` counts every device)."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    cli = "import sys; from pcipt.cli.kubectl_pcipt import main; sys.exit(main())"
    took, rows, by = [], 0, set()
    for _ in range(runs):
        t0 = time.monotonic()
        got = subprocess.run(
            [sys.executable, "-c", cli, "inventory", *extra],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        took.append(round(time.monotonic() - t0, 2))
        rows = max(0, len(got.stdout.splitlines()) - 1)
        by.add("controller" if "counted by the controller" in got.stderr else "kubectl-pcipt")
    return {
        "seconds": sorted(took)[len(took) // 2],
        "runs_s": took,
        "rows": rows,
        "counted_by": ",".join(sorted(by)),
    }


async def list_timings(api: KubeClient) -> dict[str, float]:
    """One LIST of every PciDevice, as the API server answers it: from etcd (a consistent
    read, what clients ask by default), from its watch cache (resourceVersion=0), and in pages
    of 500."""
    path = crd_path(c.PLURAL_PCIDEVICE)
    out = {}
    for label, query in (("consistent", ""), ("cache", "?resourceVersion=0")):
        t0 = time.monotonic()
        await api.request("GET", path + query, parse=False)
        out[label] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    token = ""
    while True:
        got = await api.request(
            "GET", path + "?limit=500" + (f"&continue={token}" if token else "")
        )
        token = got.get("metadata", {}).get("continue", "")
        if not token:
            break
    out["pages_of_500"] = round(time.monotonic() - t0, 2)
    return out


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def gather_limited(n: int, coros: list[Any]) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def run(coro: Any) -> Any:
        async with sem:
            return await coro

    return await asyncio.gather(*(run(x) for x in coros))


async def request_counts(api: KubeClient) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total summed by (verb, resource, subresource)."""
    assert api._session is not None
    async with api._session.get(api.creds.host + "/metrics", headers=api.creds.auth_headers()) as r:
        text = await r.text()
    out: Counter[tuple[str, str, str]] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'(\w+="[^"]*")', m.group(1)))
        labels = {k: v.strip('"') for k, v in labels.items()}
        out[
            (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        ] += int(float(m.group(2)))
    return out


async def settled_counts(
    api: KubeClient, before: Counter[tuple[str, str, str]], quiet: float = 0.5, limit: float = 10
) -> Counter[tuple[str, str, str]]:
    """The counts once no write has landed for `quiet` seconds: Events and a flavor's status are
    written behind the binds, so the last bind's Event can trail the moment it is seen scheduled."""
    deadline = time.monotonic() + limit
    last = await request_counts(api)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = await request_counts(api)
        if diff(now, before) == diff(last, before):
            return now
        last = now
    return last


def diff(
    after: Counter[tuple[str, str, str]], before: Counter[tuple[str, str, str]]
) -> dict[str, int]:
    out = {}
    for k, v in after.items():
        d = v - before.get(k, 0)
        if d and k[0] in ("PATCH", "POST", "PUT", "DELETE", "CREATE", "APPLY", "UPDATE"):
            out["/".join(x for x in k if x)] = d
    return dict(sorted(out.items()))


async def publish(api: KubeClient, nodes: int, per_node: int) -> None:
    async def one(node: str, i: int) -> None:
        addr = f"0000:{0x10 + i:02x}:00.0"
        name = pcidevice_name(node, addr)
        body = {
            "apiVersion": c.API_VERSION,
            "kind": "PciDevice",
            "metadata": {"name": name, "labels": {c.LABEL_NODE: node}},
            "spec": {"nodeName": node, "address": addr},
        }
        await api.create(crd_path(c.PLURAL_PCIDEVICE), body)
        status = {
            "vendorID": "10de",
            "productID": "20b0",
            "classCode": "030200",
            "driver": "vfio-pci",
            "numaNode": i * 2 // per_node,
            "health": "Healthy",
            "sriov": {"role": "None"},
        }
        await api.patch(
            crd_path(c.PLURAL_PCIDEVICE, name, subresource="status"), {"status": status}
        )

    async def lease(node: str) -> None:
        await api.create(
            f"/apis/coordination.k8s.io/v1/namespaces/{c.DEFAULT_NAMESPACE}/leases",
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": f"{c.NODE_LEASE_PREFIX}{node}"},
                "spec": {
                    "holderIdentity": node,
                    "leaseDurationSeconds": 3600,
                    "renewTime": now_iso(),
                },
            },
        )

    names = [f"node-{n:04d}" for n in range(nodes)]
    await gather_limited(32, [lease(n) for n in names])
    await gather_limited(32, [one(n, i) for n in names for i in range(per_node)])


async def measure_r(api: KubeClient, seconds: float = 4.0) -> dict[int, float]:
    """Conditional PATCHes per second from one client, at several concurrencies."""
    scratch = []
    for i in range(32):
        node = "scratch"
        addr = f"0000:{0x80 + i:02x}:00.0"
        name = pcidevice_name(node, addr)
        got = await api.create(
            crd_path(c.PLURAL_PCIDEVICE),
            {
                "apiVersion": c.API_VERSION,
                "kind": "PciDevice",
                "metadata": {"name": name},
                "spec": {"nodeName": node, "address": addr, "unschedulable": True},
            },
        )
        scratch.append((name, got["metadata"]["resourceVersion"]))
    rates = {}
    for conc in (1, 8, 32):
        done = 0
        stop = time.monotonic() + seconds

        async def worker(idx: int, stop: float) -> None:
            nonlocal done
            name, rv = scratch[idx]
            flip = False
            while time.monotonic() < stop:
                flip = not flip
                got = await api.patch(
                    crd_path(c.PLURAL_PCIDEVICE, name),
                    {
                        "metadata": {
                            "resourceVersion": rv,
                            "annotations": {"bench": str(flip).lower()},
                        }
                    },
                )
                rv = got["metadata"]["resourceVersion"]
                done += 1
            scratch[idx] = (name, rv)

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i, stop) for i in range(conc)))
        rates[conc] = done / (time.monotonic() - t0)
    for name, _ in scratch:
        await api.delete(crd_path(c.PLURAL_PCIDEVICE, name))
    return rates


async def create_vms(api: KubeClient, names: list[str], concurrency: int = 16) -> dict[str, float]:
    created: dict[str, float] = {}

    await gather_limited(concurrency, [_create_one(api, n, created) for n in names])
    return created


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nodes": args.nodes,
        "devices_per_node": args.devices,
        "etcd_fsync": args.fsync,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
    }
    state = Path(tempfile.mkdtemp(prefix="pcipt-bench-"))
    cluster = LocalCluster(state, fsync=args.fsync)
    print(f"control plane: starting in {state}", flush=True)
    cluster.up()
    ctl: subprocess.Popen[bytes] | None = None
    try:
        apply_crds(k8s_config.new_client_from_config(str(cluster.kubeconfig)))
        api = KubeClient(load_credentials(str(cluster.kubeconfig)), pool=64)
        await api.open()
        for ns in (c.DEFAULT_NAMESPACE, NS):
            await api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
        await api.create(
            crd_path(c.PLURAL_PCIFLAVOR),
            {
                "apiVersion": c.API_VERSION,
                "kind": "PciFlavor",
                "metadata": {"name": FLAVOR},
                "spec": {"deviceType": "gpu", "selector": {"vendorIDs": ["10de"]}},
            },
        )
        total = args.nodes * args.devices
        t0 = time.monotonic()
        await publish(api, args.nodes, args.devices)
        out["publish_s"] = round(time.monotonic() - t0, 1)
        print(f"published {total} devices on {args.nodes} nodes in {out['publish_s']}s", flush=True)

        rates = await measure_r(api, args.r_seconds)
        out["R_conditional_patches_per_s"] = {str(k): round(v) for k, v in rates.items()}
        r_best = max(rates.values())
        print(
            "R (conditional PATCH/s from one client): "
            + ", ".join(f"c={k}: {v:.0f}" for k, v in rates.items()),
            flush=True,
        )

        log = open(state / "controller.log", "wb")  # noqa: SIM115
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        ctl = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller",
                "run",
                "--node-dead-after",
                "36000",
                "--audit-interval",
                "600",
                "--bind-concurrency",
                str(args.bind_concurrency),
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        watcher = FirstSeen(api, NS, scheduled)
        await watcher.start()

        def controller_alive() -> None:
            if ctl is not None and ctl.poll() is not None:
                tail = (state / "controller.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the controller exited {ctl.returncode}:\n{tail}")

        half = int(total * args.prefill)
        prefill = [f"pre-{i:05d}" for i in range(half)]
        await create_vms(api, prefill[:1])
        await watcher.wait(prefill[:1], timeout=900, check=controller_alive)
        # Ready: it has listed the whole inventory and placed a VM.
        out["controller_ready_s"] = round(watcher.at[prefill[0]] - t0, 2)
        out["controller_memory_ready_mib"] = memory_mib(ctl.pid)
        await create_vms(api, prefill[1:])
        await watcher.wait(prefill, timeout=1800, check=controller_alive)
        out["controller_start_and_prefill_s"] = round(time.monotonic() - t0, 1)
        print(
            f"controller ready (inventory listed, first VM placed) {out['controller_ready_s']}s "
            f"after start, memory {out['controller_memory_ready_mib']} MiB; "
            f"pre-filled {half} VMs in {out['controller_start_and_prefill_s']}s "
            "(controller start included)",
            flush=True,
        )

        n_fill = args.fill or total - half
        if half + n_fill > total:
            raise SystemExit(f"--fill {n_fill} past the {total - half} devices left")
        fill = [f"fill-{i:05d}" for i in range(n_fill)]
        before = await request_counts(api)
        st = cluster.state()
        assert st is not None
        pids = {
            "controller": ctl.pid,
            "kube-apiserver": st.apiserver_pid,
            "etcd": st.etcd_pid,
            "bench-client": os.getpid(),
        }
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        t0 = time.monotonic()
        created = await create_vms(api, fill)
        await watcher.wait(fill, timeout=900, check=controller_alive)
        took = max(watcher.at[n] for n in fill) - t0
        after = await settled_counts(api, before)
        cpu = {k: round(cpu_seconds(v) - cpu0[k], 2) for k, v in pids.items()}
        writes = diff(after, before)
        lat = [watcher.at[n] - created[n] for n in fill]
        controller_writes = sum(
            v for k, v in writes.items() if not k.startswith("POST/passthroughvms")
        )
        w = controller_writes / len(fill)
        binds_per_s = len(fill) / took
        out["fill"] = {
            "vms": len(fill),
            "seconds": round(took, 2),
            "binds_per_s": round(binds_per_s, 1),
            "time_to_scheduled_s": {
                "p50": round(pct(lat, 50), 3),
                "p95": round(pct(lat, 95), 3),
                "p99": round(pct(lat, 99), 3),
            },
            "writes_by_kind": writes,
            "controller_writes_per_bind": round(w, 2),
            "fraction_of_R_over_w": round(binds_per_s / (r_best / w), 2),
            "cpu_seconds": cpu,
            "controller_cpu_ms_per_bind": round(cpu["controller"] / len(fill) * 1000, 2),
            "controller_memory_mib": memory_mib(ctl.pid),
        }
        print(
            f"fill {len(fill)} VMs ({half}->{total} devices): {binds_per_s:.1f} binds/s; "
            f"time-to-Scheduled p50/p95/p99 "
            f"{pct(lat, 50):.3f}/{pct(lat, 95):.3f}/{pct(lat, 99):.3f}s; "
            f"{w:.2f} controller writes per bind {writes}; "
            f"binds/s = {binds_per_s / (r_best / w):.2f} x R/w; "
            f"CPU seconds {cpu}",
            flush=True,
        )

        out["inventory_cli"] = inventory_cli(cluster.kubeconfig)
        out["inventory_cli_recount"] = inventory_cli(cluster.kubeconfig, "--recount")
        out["list_devices_s"] = await list_timings(api)
        inv, rec = out["inventory_cli"], out["inventory_cli_recount"]
        print(
            f"kubectl pcipt inventory on {total} devices: median {inv['seconds']}s of "
            f"{inv['runs_s']} ({inv['rows']} rows, counted by {inv['counted_by']}); --recount "
            f"(every device listed): median {rec['seconds']}s of {rec['runs_s']}; one LIST of "
            f"every device, without decoding (s): {out['list_devices_s']}",
            flush=True,
        )

        # Release 20% (at most 1000): delete, and report the domain gone as a node plugin would.
        n_steady = int(args.rate * args.steady)
        victims = prefill[: min(half, max(min(total // 5, 1000), n_steady))]
        t0 = time.monotonic()

        async def release(name: str) -> None:
            await api.delete(crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=NS))
            await api.patch(
                crd_path(c.PLURAL_PASSTHROUGHVM, name, namespace=NS, subresource="status"),
                {
                    "status": {
                        "conditions": [
                            {
                                "type": c.COND_DOMAIN_GONE,
                                "status": "True",
                                "reason": "DomainRemoved",
                                "message": "bench",
                                "lastTransitionTime": now_iso()[:19] + "Z",
                            }
                        ]
                    }
                },
            )

        await gather_limited(16, [release(n) for n in victims])
        while True:
            got = await api.list(crd_path(c.PLURAL_PASSTHROUGHVM, namespace=NS))
            if not any(i["metadata"]["name"] in set(victims) for i in got["items"]):
                break
            await asyncio.sleep(0.2)
        rel = time.monotonic() - t0
        out["release"] = {
            "vms": len(victims),
            "seconds": round(rel, 2),
            "releases_per_s": round(len(victims) / rel, 1),
        }
        print(
            f"released {len(victims)} VMs (delete + DomainGone + release + finalizer) "
            f"in {rel:.1f}s: {len(victims) / rel:.1f}/s",
            flush=True,
        )

        # Steady arrivals at --rate per second.
        n = n_steady
        steady = [f"steady-{i:05d}" for i in range(n)]
        created = {}
        t0 = time.monotonic()
        for i, name in enumerate(steady):
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
            asyncio.get_running_loop().create_task(_create_one(api, name, created))
        await watcher.wait(steady, timeout=300, check=controller_alive)
        lat = [watcher.at[x] - created[x] for x in steady]
        out["steady"] = {
            "rate_per_s": args.rate,
            "vms": n,
            "time_to_scheduled_s": {
                "p50": round(pct(lat, 50), 3),
                "p95": round(pct(lat, 95), 3),
                "p99": round(pct(lat, 99), 3),
            },
        }
        print(
            f"steady {args.rate}/s for {args.steady}s: time-to-Scheduled p50/p95/p99 "
            f"{pct(lat, 50):.3f}/{pct(lat, 95):.3f}/{pct(lat, 99):.3f}s",
            flush=True,
        )
        out["controller_memory_end_mib"] = memory_mib(ctl.pid)
        if args.requeue:
            out["requeue"] = await requeue(api, watcher, steady, args.waiting, release)
        watcher.stop()
        await api.close()
    finally:
        if ctl is not None:
            ctl.terminate()
            ctl.wait(timeout=20)
        cluster.down()
    return out


async def requeue(
    api: KubeClient,
    watcher: FirstSeen,
    bound: list[str],
    waiting: int,
    release: Any,
) -> dict[str, Any]:
    """Free one device at a time under a full cluster; time until a refused VM is Scheduled."""
    devices = await api.list(crd_path(c.PLURAL_PCIDEVICE))
    free = sum(1 for d in devices["items"] if not (d.get("spec") or {}).get("claimRef"))
    top = [f"top-{i:05d}" for i in range(free)]
    await create_vms(api, top)
    await watcher.wait(top, timeout=300)
    names = [f"wait-{i:03d}" for i in range(waiting)]
    await create_vms(api, names)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = await api.list(crd_path(c.PLURAL_PASSTHROUGHVM, namespace=NS))
        refused = {
            i["metadata"]["name"]
            for i in got["items"]
            if (i.get("status") or {}).get("scheduling") and not i["status"].get("nodeName")
        }
        if refused.issuperset(names):
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError("the waiting VMs were not all refused")
    lat: list[float] = []
    for victim in bound[:waiting]:
        before = watcher.count(names)
        t0 = time.monotonic()
        await release(victim)
        deadline = t0 + 30
        while watcher.count(names) == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no waiting VM bound within 30s of releasing {victim}")
            await asyncio.sleep(0.002)
        lat.append(time.monotonic() - t0)
    res = {
        "waiting": waiting,
        "release_to_scheduled_s": {
            "p50": round(pct(lat, 50), 3),
            "max": round(max(lat), 3),
        },
    }
    print(
        f"requeue: {waiting} refused VMs on a full cluster, one device freed at a time: "
        f"delete + DomainGone -> a waiting VM Scheduled p50/max {pct(lat, 50):.3f}/{max(lat):.3f}s",
        flush=True,
    )
    return res


async def _create_one(api: KubeClient, name: str, created: dict[str, float]) -> None:
    """Create one single-GPU VM and note when the API server accepted it."""
    await retry_transient(
        api.create,
        crd_path(c.PLURAL_PASSTHROUGHVM, namespace=NS),
        {
            "apiVersion": c.API_VERSION,
            "kind": "PassthroughVM",
            "metadata": {"name": name},
            "spec": {"memory": "1Gi", "devices": [{"name": "gpu", "flavor": FLAVOR}]},
        },
    )
    created[name] = time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--devices", type=int, default=10, help="devices per node")
    p.add_argument("--rate", type=float, default=20.0, help="VMs per second in the steady phase")
    p.add_argument("--steady", type=float, default=30.0, help="seconds of steady arrivals")
    p.add_argument("--bind-concurrency", type=int, default=16)
    p.add_argument("--r-seconds", type=float, default=4.0, help="seconds per concurrency for R")
    p.add_argument(
        "--waiting", type=int, default=20, help="refused VMs in the requeue phase (<= steady VMs)"
    )
    p.add_argument(
        "--prefill", type=float, default=0.5, help="fraction of the devices bound before the fill"
    )
    p.add_argument("--fill", type=int, default=0, help="VMs in the fill (default: the rest)")
    p.add_argument(
        "--requeue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the requeue phase (it first fills every device left)",
    )
    p.add_argument("--fsync", action="store_true", help="let etcd fsync (slower, like production)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    out = asyncio.run(main_async(args))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
