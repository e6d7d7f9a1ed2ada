"""The local node whose pods really run, and the chart on it.

    .venv/bin/python bench/node.py [--runs 3] [--json FILE]

Per run: the node's start (control plane and node in private namespaces, until the node is
Ready and the pause image imported), `helm install --wait` of the chart as the real-pod tier
installs it until every pod is Ready through its probes, `helm uninstall`, and the teardown.
Once: building pcipt's image from the tree; every run imports it into its fresh node. Also the
resident memory of the node's processes with the chart running. It prints figures; it asserts
nothing about speed. Needs root and what hack/install-system-deps.sh installs.
"""

from __future__ import annotations

import argparse
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

from pcipt.devcluster import binaries  # noqa: E402
from pcipt.devcluster.node import LocalNode, cgroup_pids  # noqa: E402

VALUES = [
    REPO / "examples" / "helm" / "values-demo.yaml",
    REPO / "examples" / "helm" / "values-local-node.yaml",
]
NS = "pcipt-system"


def run(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()}")
    return proc.stdout


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def one_run(work: Path, image: bool, chart: bool) -> dict[str, Any]:
    node = LocalNode(work / "node", node_name="node-a", log=lambda _m: None)
    figures: dict[str, Any] = {}
    t = time.monotonic()
    st = node.up()
    figures["node_ready_s"] = time.monotonic() - t
    try:
        if not chart:
            figures["rss_mib_node_only"] = rss_mib(cgroup_pids(st.cgroup))
            return figures
        # The first run builds the image from the tree; every run imports it into its node.
        t = time.monotonic()
        node.load_pcipt_image()
        figures["image_build_and_import_s" if image else "image_import_s"] = time.monotonic() - t
        host = work / "host"
        subprocess.run(
            [sys.executable, "-m", "nodeplugin", "simulate-host", "--profile",
             str(REPO / "demo" / "hardware.yaml"), "--host", "node-a", "--root", str(host / "sys")],
            check=True, capture_output=True, cwd=REPO,
        )  # fmt: skip
        (host / "vfio").mkdir(exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": st.kubeconfig,
            "HELM_CACHE_HOME": str(work / "helm"),
            "HELM_CONFIG_HOME": str(work / "helm"),
            "HELM_DATA_HOME": str(work / "helm"),
        }
        kubectl, helm = str(binaries.ensure().kubectl), str(binaries.ensure_helm())
        run([kubectl, "label", "node", "node-a", "pcipt.io/passthrough=true"], env)
        values = [a for v in VALUES for a in ("-f", str(v))]
        t = time.monotonic()
        paths = ["--set", f"nodePlugin.sysfsPath={host / 'sys'}"]
        paths += ["--set", f"nodePlugin.vfioPath={host / 'vfio'}"]
        chart = [str(REPO / "charts" / "pcipt"), "-n", NS, "--create-namespace", *values, *paths]
        run([helm, "install", "pcipt", *chart, "--wait", "--timeout", "5m"], env)
        run([kubectl, "rollout", "status", "ds/pcipt-node-plugin", "-n", NS, "--timeout=300s"], env)
        figures["helm_install_to_all_ready_s"] = time.monotonic() - t
        figures["rss_mib_with_chart"] = rss_mib(cgroup_pids(st.cgroup))
        t = time.monotonic()
        run([helm, "uninstall", "pcipt", "-n", NS, "--wait", "--timeout", "3m"], env)
        figures["helm_uninstall_s"] = time.monotonic() - t
    finally:
        t = time.monotonic()
        node.down()
        figures["teardown_s"] = time.monotonic() - t
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--no-chart", action="store_true", help="only start and tear down the node (no image)"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/node.py needs root (namespaces, mounts, cgroups)", file=sys.stderr)
        return 2
    binaries.ensure_node()
    if not args.no_chart:
        binaries.ensure_helm()
    runs = []
    with tempfile.TemporaryDirectory(prefix="pcipt-bench-node-") as tmp:
        for i in range(args.runs):
            runs.append(one_run(Path(tmp) / f"run{i}", image=i == 0, chart=not args.no_chart))
            print(
                f"run {i + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in runs[-1].items()),
                flush=True,
            )
    keys = [k for k in runs[-1] if k != "image_build_and_import_s"]
    figures: dict[str, Any] = {
        "runs": len(runs),
        **(
            {"image_build_and_import_s": runs[0]["image_build_and_import_s"]}
            if not args.no_chart
            else {}
        ),
        **{f"{k}_median": statistics.median(r[k] for r in runs if k in r) for k in keys},
        **{f"{k}_max": max(r[k] for r in runs if k in r) for k in keys},
    }
    print()
    for k, v in figures.items():
        print(f"{k:40s} {v:.1f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
