"""Time from `kubectl apply` to Running, end to end: the real control plane, the controller,
and node plugins on simulated hosts with libvirt's test driver, each its own process.

    .venv/bin/python bench/e2e.py [--hosts 2] [--gpus 64] [--vms 100] [--rate 5]

Two runs of --vms single-GPU VMs:
- burst: one `kubectl apply -f` of all of them; each VM's time is from the start of that
  command to the watch seeing it Running;
- paced: one `kubectl apply` per VM at --rate per second; each VM's time is from the start of
  its own command.
The simulated hosts bind devices and define domains for real (fake sysfs, libvirt's test
driver), but boot no guest: a real host adds VFIO and guest boot time on top. It prints
figures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import FirstSeen, pct, running  # noqa: E402
from pcipt import constants as c  # noqa: E402
from pcipt.devcluster.lab import Lab  # noqa: E402
from pcipt.kubeclient import KubeClient, crd_path, load_credentials  # noqa: E402

NS = "bench"


def write_profile(path: Path, hosts: int, gpus: int) -> None:
    doc: dict[str, Any] = {"hosts": {}}
    for h in range(hosts):
        devices = []
        for i in range(gpus):
            devices.append(
                {
                    "address": f"0000:{0x10 + i:02x}:00.0",
                    "vendor": "10de",
                    "device": "20b0",
                    "class": "030200",
                    "numa": i * 2 // gpus,
                    "driver": "nvidia",
                    "iommuGroup": i + 1,
                }
            )
        doc["hosts"][f"host-{h}"] = {"numa": {0: "0-31", 1: "32-63"}, "devices": devices}
    path.write_text(yaml.safe_dump(doc))


def vm(name: str) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": "PassthroughVM",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"memory": "1Gi", "devices": [{"name": "gpu", "flavor": "gpu"}]},
    }


async def kubectl(lab: Lab, *args: str, stdin: str | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        lab.kubectl_path,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, KUBECONFIG=str(lab.kubeconfig)),
    )
    _, err = await proc.communicate(stdin.encode() if stdin else None)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {err.decode()}")


async def run(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    async with KubeClient(load_credentials(str(lab.kubeconfig))) as api:
        await api.create("/api/v1/namespaces", {"metadata": {"name": NS}})
        await api.create(
            crd_path(c.PLURAL_PCIFLAVOR),
            {
                "apiVersion": c.API_VERSION,
                "kind": "PciFlavor",
                "metadata": {"name": "gpu"},
                "spec": {"deviceType": "gpu", "selector": {"vendorIDs": ["10de"]}},
            },
        )
        total = args.hosts * args.gpus
        while True:
            got = await api.get(crd_path(c.PLURAL_PCIFLAVOR, "gpu"))
            if (got.get("status") or {}).get("free") == total:
                break
            await asyncio.sleep(0.2)
        watcher = FirstSeen(api, NS, running)
        await watcher.start()
        out: dict[str, Any] = {}

        burst = [f"burst-{i:03d}" for i in range(args.vms)]
        t0 = time.monotonic()
        await kubectl(lab, "apply", "-f", "-", stdin=yaml.safe_dump_all([vm(n) for n in burst]))
        await watcher.wait(burst, 300)
        lat = [watcher.at[n] - t0 for n in burst]
        out["burst"] = {
            "vms": len(burst),
            "p50_s": round(pct(lat, 50), 3),
            "p99_s": round(pct(lat, 99), 3),
            "all_running_s": round(max(lat), 3),
        }
        print(
            f"burst: {len(burst)} VMs in one kubectl apply: "
            f"apply->Running p50 {out['burst']['p50_s']} s, "
            f"p99 {out['burst']['p99_s']} s",
            flush=True,
        )

        await kubectl(lab, "delete", "ptvm", "-n", NS, "--all", "--wait=true", "--timeout=300s")
        while True:
            got = await api.get(crd_path(c.PLURAL_PCIFLAVOR, "gpu"))
            if (got.get("status") or {}).get("free") == total:
                break
            await asyncio.sleep(0.2)

        paced = [f"paced-{i:03d}" for i in range(args.vms)]
        starts: dict[str, float] = {}

        async def one(name: str) -> None:
            starts[name] = time.monotonic()
            await kubectl(lab, "apply", "-f", "-", stdin=yaml.safe_dump(vm(name)))

        t0 = time.monotonic()
        tasks = []
        for i, name in enumerate(paced):
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
            tasks.append(asyncio.get_running_loop().create_task(one(name)))
        await asyncio.gather(*tasks)
        await watcher.wait(paced, 300)
        lat = [watcher.at[n] - starts[n] for n in paced]
        out["paced"] = {
            "vms": len(paced),
            "rate_per_s": args.rate,
            "p50_s": round(pct(lat, 50), 3),
            "p99_s": round(pct(lat, 99), 3),
        }
        print(
            f"paced: {len(paced)} VMs at {args.rate}/s, one kubectl apply each: apply->Running "
            f"p50 {out['paced']['p50_s']} s, p99 {out['paced']['p99_s']} s",
            flush=True,
        )
        watcher.stop()
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--gpus", type=int, default=64, help="GPUs per host")
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--rate", type=float, default=5.0, help="VMs per second in the paced run")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcipt-e2e-bench-"))
    write_profile(work / "hardware.yaml", args.hosts, args.gpus)
    (work / "config.yaml").write_text("devices: [{name: gpu, match: {vendorID: '10de'}}]\n")
    lab = Lab(
        work,
        work / "hardware.yaml",
        work / "config.yaml",
        plugin_args=["--rescan-interval", "30", "--resync-interval", "5", "--log-level", "WARNING"],
        controller_args=["--log-level", "WARNING"],
    )
    lab.start()
    try:
        out = asyncio.run(run(lab, args))
    finally:
        lab.stop()
    out.update({"hosts": args.hosts, "gpus_per_host": args.gpus})
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
