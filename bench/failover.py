"""How much of the time a controller replica leads while replicas are killed and restarted.

    .venv/bin/python bench/failover.py [--replicas 3] [--seconds 60] [--every 3]
        [--identity stable|fresh] [--json FILE]

Starts a local control plane and N `pcipt-controller run --leader-elect` processes, then for
--seconds kills one replica at random with SIGKILL every --every seconds and starts it again at
once, as a kubelet restarts a container: with --identity stable the new process has the old
one's identity (a pod's name), with `fresh` a new one each start (what kopf peering did).
Every 0.1 s it samples whether some live replica leads (its last word was `leading lease=`
and it holds the Lease). It prints the share of samples with a leader, the leaderless gaps,
and how many kills hit the leader. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
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

from pcipt.devcluster import LocalCluster  # noqa: E402
from pcipt.devcluster.crds import apply_crds  # noqa: E402

NS = "pcipt-system"
LEASE = "pcipt-controller"


class Replica:
    def __init__(self, index: int, kubeconfig: Path, logs: Path, fresh: bool) -> None:
        self.index = index
        self.kubeconfig = kubeconfig
        self.logs = logs
        self.fresh = fresh
        self.starts = 0
        self.identity = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = logs / f"replica-{index}.log"

    def start(self) -> None:
        self.starts += 1
        self.identity = f"replica-{self.index}" + (f"-{self.starts}" if self.fresh else "")
        with open(self.log, "ab") as fh:
            fh.write(f"=== start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller",
                    "run",
                    "--leader-elect",
                    f"--identity={self.identity}",
                    f"--namespace={NS}",
                    "--metrics-port=0",
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1"),
                cwd=REPO,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def leads(self) -> bool:
        """Alive, and its last word since its latest start is `leading`."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        text = self.log.read_text(errors="replace").rsplit("=== start", 1)[-1]
        lead, stand = text.rfind("leading lease="), text.rfind("standing by lease=")
        return lead > stand


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pcipt-failover-"))
    cluster = LocalCluster(work / "cp")
    cluster.up()
    replicas: list[Replica] = []
    try:
        api = k8s_config.new_client_from_config(str(cluster.kubeconfig))
        apply_crds(api)
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=NS))
        )
        coord = client.CoordinationV1Api(api)
        replicas = [
            Replica(i, cluster.kubeconfig, work, args.identity == "fresh")
            for i in range(args.replicas)
        ]
        for r in replicas:
            r.start()
        deadline = time.monotonic() + 60
        while not any(r.leads() for r in replicas):
            if time.monotonic() > deadline:
                raise RuntimeError("no replica led within 60 s of start")
            time.sleep(0.1)
        rng = random.Random(args.seed)
        samples: list[bool] = []
        gaps: list[float] = []
        gap_started: float | None = None
        kills = leader_kills = 0
        start = time.monotonic()
        next_kill = start + args.every
        while time.monotonic() - start < args.seconds:
            now = time.monotonic()
            if now >= next_kill:
                victim = rng.choice(replicas)
                leader_kills += victim.leads()
                victim.kill()
                victim.start()
                kills += 1
                next_kill += args.every
            holder = coord.read_namespaced_lease(LEASE, NS).spec.holder_identity or ""
            led = any(r.leads() and r.identity == holder for r in replicas)
            samples.append(led)
            if not led and gap_started is None:
                gap_started = now
            if led and gap_started is not None:
                gaps.append(now - gap_started)
                gap_started = None
            time.sleep(0.1)
        if gap_started is not None:
            gaps.append(time.monotonic() - gap_started)
        return {
            "replicas": args.replicas,
            "identity": args.identity,
            "seconds": args.seconds,
            "kill_every_s": args.every,
            "kills": kills,
            "leader_kills": leader_kills,
            "samples": len(samples),
            "leader_share": round(sum(samples) / max(1, len(samples)), 3),
            "gaps": len(gaps),
            "gap_mean_s": round(statistics.mean(gaps), 2) if gaps else 0.0,
            "gap_max_s": round(max(gaps), 2) if gaps else 0.0,
        }
    finally:
        for r in replicas:
            r.kill()
        cluster.down()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--every", type=float, default=3, help="seconds between kills")
    p.add_argument("--identity", choices=["stable", "fresh"], default="stable")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out = run(args)
    for k, v in out.items():
        print(f"{k:>14}: {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
