"""pcipt against its peer, side by side: bench/bind.py and bench/peer_dra.py (raised client
limits, and at the scheduler's defaults) run in turn, `--rounds` times, on the same machine and
sizes; prints each round's fill throughput, time to placement, writes and CPU per placement
(with the rate that CPU allows on this machine's cores), and the ratio of the medians.
Interleaving keeps a slow stretch of the machine from favouring one side.

    .venv/bin/python bench/peer_compare.py --nodes 500 --devices 10 --rounds 2 [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run(script: str, args: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [sys.executable, str(REPO / "bench" / script), *args, "--json", f.name],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return dict(json.loads(Path(f.name).read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    size = ["--nodes", str(args.nodes), "--devices", str(args.devices)]
    # bind.py's own phases after the fill are kept short: only the fill is compared.
    pcipt_args = [*size, "--steady", "1", "--rate", "2", "--no-requeue", "--r-seconds", "1"]
    sides: dict[str, list[dict[str, Any]]] = {"pcipt": [], "dra-raised": [], "dra-defaults": []}
    for i in range(args.rounds):
        for side, results in sides.items():
            if side == "pcipt":
                got = run("bind.py", pcipt_args)["fill"]
                rate, lat, n = got["binds_per_s"], got["time_to_scheduled_s"], got["vms"]
                writes = got["controller_writes_per_bind"]
            else:
                extra = ["--default-limits"] if side == "dra-defaults" else []
                got = run("peer_dra.py", [*size, *extra])["fill"]
                rate, lat, n = got["pods_per_s"], got["time_to_bound_s"], got["pods"]
                writes = got["scheduler_writes_per_placement"]
            # CPU per placement, every process of the fill (the workload's creates included):
            # on a machine this small the sum bounds the rate (cores / CPU per placement).
            cpu_ms = {k: round(v / n * 1000, 2) for k, v in got["cpu_seconds"].items()}
            total_ms = sum(cpu_ms.values())
            bound = (os.cpu_count() or 1) * 1000 / total_ms if total_ms else 0.0
            results.append(
                {
                    "per_s": rate,
                    **{f"p{k[1:]}": v for k, v in lat.items()},
                    "writes_per_placement": writes,
                    "cpu_ms_per_placement": cpu_ms,
                    "cpu_bound_per_s": round(bound, 1),
                }
            )
            print(
                f"round {i + 1} {side}: {rate}/s, p50/p99 {lat['p50']}/{lat['p99']} s; "
                f"{writes} writes per placement; CPU ms per placement {cpu_ms} = {total_ms:.1f} "
                f"ms: at most {bound:.0f}/s on {os.cpu_count()} cores",
                flush=True,
            )
    med = {k: statistics.median(r["per_s"] for r in v) for k, v in sides.items()}
    out = {
        "nodes": args.nodes,
        "devices_per_node": args.devices,
        "rounds": sides,
        "median_per_s": med,
        "pcipt_over_dra_raised": round(med["pcipt"] / med["dra-raised"], 2),
        "pcipt_over_dra_defaults": round(med["pcipt"] / med["dra-defaults"], 2),
    }
    print(
        f"median fill: pcipt {med['pcipt']:.1f}/s, kube-scheduler+DRA {med['dra-raised']:.1f}/s "
        f"(raised limits), {med['dra-defaults']:.1f}/s (defaults); pcipt / DRA = "
        f"{out['pcipt_over_dra_raised']} (raised), {out['pcipt_over_dra_defaults']} (defaults)",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
