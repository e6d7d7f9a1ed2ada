"""Runs inside a lab host (tests/hwlab/run.py boots it): what pcipt sees on the real kernel's
/sys, written as JSON next to what the kernel's own tools say, for the outside to compare.

    python tests/hwlab/inside.py discovery OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from nodeplugin.discovery import discover  # noqa: E402

SYS = Path("/sys")


def discovery(out: Path) -> None:
    host = discover(SYS)
    (out / "discovery.json").write_text(
        json.dumps(
            {
                "functions": [dataclasses.asdict(f) for f in host.functions],
                "numa_cpus": {str(k): list(v) for k, v in host.numa_cpus.items()},
            },
            indent=2,
        )
    )
    lspci = subprocess.run(["lspci", "-Dnnvk"], capture_output=True, text=True, check=True)
    (out / "lspci.txt").write_text(lspci.stdout)
    # The kernel's other view of SR-IOV and netdevs: /sys/class/net, not the device folders.
    links = {}
    for net in sorted((SYS / "class" / "net").iterdir()):
        dev = net / "device"
        if not dev.exists():
            continue
        entry = {"address": dev.resolve().name, "vfs": {}}
        for vf in sorted(dev.glob("virtfn*")):
            entry["vfs"][vf.name.removeprefix("virtfn")] = vf.resolve().name
        links[net.name] = entry
    (out / "netdevs.json").write_text(json.dumps(links, indent=2))
    # The publish step: every function offered by a catch-all device spec, as PciDevices.
    spec = out / "all.yaml"
    spec.write_text("devices:\n  - name: everything\n    match: {}\n")
    published = subprocess.run(
        [sys.executable, "-m", "nodeplugin", "discover", "--node-name", "lab",
         "--config", str(spec), "-o", "json"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    (out / "published.json").write_text(published.stdout)
    (out / "published.err").write_text(published.stderr)


if __name__ == "__main__":
    {"discovery": discovery}[sys.argv[1]](Path(sys.argv[2]))
