"""The hardware lab's scenarios (`make hwlab`): each boots a lab host (pcipt/devcluster/hwlab.py:
a real kernel under QEMU with an emulated IOMMU and SR-IOV devices), runs pcipt's own code on
the kernel's /sys, and checks it against the kernel's own tools. Prints each result and ends
with `N passed, M failed`.

    .venv/bin/python tests/hwlab/run.py [SCENARIO ...] [--keep DIR]

Scenarios so far: discovery (pcipt-nodeplugin's discovery and publish step against
`lspci -Dnnvk` and /sys/class/net, with igb VFs made by the kernel); vfio (the node plugin's
Preparer binds an e1000e and an igb VF to vfio-pci and gives them back, on the real kernel);
vfcount (the node plugin's VF counts on igb: 0 -> 2, then 2 -> 3 through 0, refused while a VF
is claimed; the kernel's EBUSY and ERANGE, which the simulated kernel copies); sriov (MAC,
VLAN, trust and spoof checking set by the node plugin on igb VFs, read back from `ip -d link`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from pcipt.devcluster import hwlab  # noqa: E402

PY = REPO / ".venv" / "bin" / "python"
LSPCI_HEAD = re.compile(
    r"^(?P<addr>[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) (?P<cls_name>.*?) \[(?P<cls>[0-9a-f]{4})\]: "
    r"(?P<name>.*) \[(?P<vendor>[0-9a-f]{4}):(?P<product>[0-9a-f]{4})\]"
)


def parse_lspci(text: str) -> dict[str, dict[str, Any]]:
    """lspci -Dnnvk: per function its class, IDs, names, driver, NUMA node and IOMMU group."""
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        if m := LSPCI_HEAD.match(line):
            current = found[m["addr"]] = {
                "class": m["cls"],
                "vendor": m["vendor"],
                "product": m["product"],
                "name": re.sub(r" \(rev [0-9a-f]+\)$", "", m["name"]),
                "driver": None,
                "numa": None,
                "iommu": None,
            }
        elif current is not None:
            if d := re.match(r"^\s+Kernel driver in use: (\S+)", line):
                current["driver"] = d.group(1)
            if n := re.search(r"NUMA node (\d+)", line):
                current["numa"] = int(n.group(1))
            if g := re.search(r"IOMMU group (\d+)", line):
                current["iommu"] = int(g.group(1))
    return found


DISCOVERY = f"""
set -x
igb=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/device)" = 0x10c9 ] && basename $d; done)
echo 2 > /sys/bus/pci/devices/$igb/sriov_numvfs
for a in /sys/bus/pci/devices/*/modalias; do modprobe -q "$(cat "$a")" 2>/dev/null; done
sleep 2
{PY} {REPO}/tests/hwlab/inside.py discovery /lab
"""


def check_discovery(out: Path) -> list[str]:
    """Every field pcipt publishes, against lspci and the kernel's netdev links."""
    problems: list[str] = []
    want = parse_lspci((out / "lspci.txt").read_text())
    got = {f["address"]: f for f in json.loads((out / "discovery.json").read_text())["functions"]}
    if set(got) != set(want):
        problems.append(f"functions differ: pcipt {sorted(got)} lspci {sorted(want)}")
    multi_numa = len(json.loads((out / "discovery.json").read_text())["numa_cpus"]) > 1
    for addr, w in want.items():
        f = got.get(addr)
        if f is None:
            continue
        checks = {
            "vendor": (f["vendor_id"], w["vendor"]),
            "product": (f["product_id"], w["product"]),
            "class": (f["class_code"][:4], w["class"]),
            "driver": (f["driver"], w["driver"]),
            "iommu group": (f["iommu_group"], w["iommu"]),
            # lspci prints no NUMA node for -1; pcipt keeps -1 on a host with several nodes.
            "numa": (
                f["numa_node"],
                w["numa"] if w["numa"] is not None else (-1 if multi_numa else 0),
            ),
        }
        problems += [
            f"{addr} {k}: pcipt {a!r}, lspci {b!r}" for k, (a, b) in checks.items() if a != b
        ]
    links = json.loads((out / "netdevs.json").read_text())
    for netdev, link in links.items():
        f = got.get(link["address"])
        if f is None or netdev not in f["netdevs"]:
            problems.append(f"netdev {netdev} of {link['address']}: pcipt has {f and f['netdevs']}")
        for index, vf in link["vfs"].items():
            v = got.get(vf, {})
            if (v.get("phys_fn"), v.get("vf_index"), v.get("sriov_role")) != (
                link["address"],
                int(index),
                "VF",
            ):
                problems.append(
                    f"VF {vf} of {link['address']} #{index}: pcipt {v.get('phys_fn')} #{v.get('vf_index')}"
                )
    if not any(link["vfs"] for link in links.values()):
        problems.append("no VF was made: the igb PF took no sriov_numvfs")
    if not any(f["numa_node"] == 1 for f in got.values()):
        problems.append("no function on NUMA node 1 (the pxb-pcie's)")
    published = json.loads((out / "published.json").read_text() or "{}").get("items", [])
    by_address = {p["spec"]["address"]: p for p in published}
    endpoints = {a for a, w in want.items() if not w["class"].startswith("06")}
    if not endpoints <= set(by_address):
        problems.append(f"publish step left out {sorted(endpoints - set(by_address))}")
    for addr, p in by_address.items():
        w = want.get(addr, {})
        st = p.get("status", {})
        if st.get("vendorID") != w.get("vendor") or st.get("iommuGroup") != w.get("iommu"):
            problems.append(f"published {addr}: {st.get('vendorID')}/{st.get('iommuGroup')}")
        if w.get("name") and st.get("productName") and st["productName"] not in w["name"]:
            problems.append(
                f"published {addr} name {st['productName']!r} not in lspci's {w['name']!r}"
            )
    return problems


VFIO = DISCOVERY.replace("inside.py discovery", "inside.py vfio")


def check_vfio(out: Path) -> list[str]:
    """Bound to vfio-pci with a /dev/vfio/<group> each, then back on their own drivers."""
    r = json.loads((out / "vfio.json").read_text())
    problems = []
    if "vfio-pci driver is not loaded" not in str(r["without_module"]):
        problems.append(f"without vfio-pci loaded: {r['without_module']!r}")
    if sorted(r["moved"]) != sorted(r["targets"]):
        problems.append(f"moved {r['moved']}, not {r['targets']}")
    for a in r["targets"]:
        if r["bound"][a] != "vfio-pci":
            problems.append(f"{a} bound to {r['bound'][a]}, not vfio-pci")
        if r["groups"][a] not in r["dev_vfio"]:
            problems.append(f"{a}: no /dev/vfio/{r['groups'][a]} (have {r['dev_vfio']})")
        if r["state_file"]["moved"].get(a) != r["before"][a]:
            problems.append(f"{a}: state file says {r['state_file']['moved'].get(a)}")
        if r["after"][a] != r["before"][a]:
            problems.append(f"{a} restored to {r['after'][a]}, not {r['before'][a]}")
        if r["override_after"][a] != "(null)":
            problems.append(f"{a}: driver_override left as {r['override_after'][a]!r}")
    if sorted(r["restored"]) != sorted(r["targets"]):
        problems.append(f"restored {r['restored']}")
    return problems


VFCOUNT = f"""
set -x
for a in /sys/bus/pci/devices/*/modalias; do modprobe -q "$(cat "$a")" 2>/dev/null; done
{PY} {REPO}/tests/hwlab/inside.py vfcount /lab
"""


def check_vfcount(out: Path) -> list[str]:
    """0 -> 2 in one write, 2 -> 3 through 0; the kernel's EBUSY and ERANGE as simulated."""
    r = json.loads((out / "vfcount.json").read_text())
    problems = []
    want = {
        "first": {"writes": [2]},
        "after_first": 2,
        "ebusy_2_to_3": 16,
        "erange": 34,
        "second": {"writes": [0, 3]},
        "after_second": 3,
    }
    problems += [f"{k}: {r.get(k)!r}, expected {v!r}" for k, v in want.items() if r.get(k) != v]
    if "is claimed by t/vm1" not in str(r.get("refused")):
        problems.append(f"a claimed VF did not stop the change: {r.get('refused')!r}")
    if [i for i, _a, _g in r["vfs"]] != [0, 1, 2] or len({g for *_x, g in r["vfs"]}) != 3:
        problems.append(f"VFs after the change: {r['vfs']}")
    return problems


SRIOV = VFCOUNT.replace("inside.py vfcount", "inside.py sriov")


def check_sriov(out: Path) -> list[str]:
    """Each VF's line of the PF's `ip -d link show` says what configure_vf set."""
    text = (out / "sriov.txt").read_text()
    lines = {m.group(1): m.group(0) for m in re.finditer(r"vf (\d+) .*", text)}
    want = {
        "0": ["spoof checking on", "trust off"],
        "1": ["52:54:00:aa:bb:01", "vlan 100", "spoof checking off", "trust on"],
    }
    problems = []
    for vf, parts in want.items():
        line = lines.get(vf, "")
        problems += [f"vf {vf}: no {p!r} in {line!r}" for p in parts if p not in line]
    if "vlan" in lines.get("0", ""):
        problems.append(f"vf 0 has a VLAN: {lines['0']!r}")
    return problems


SCENARIOS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "discovery": (DISCOVERY, check_discovery),
    "vfio": (VFIO, check_vfio),
    "vfcount": (VFCOUNT, check_vfcount),
    "sriov": (SRIOV, check_sriov),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    p.add_argument("--keep", type=Path, help="keep each scenario's files under this folder")
    args = p.parse_args()
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="pcipt-hwlab-") as tmp:
        base = args.keep or Path(tmp)
        for name in args.scenarios:
            script, check = SCENARIOS[name]
            out = base / name
            host = hwlab.LabHost(name=name, devices=hwlab.default_devices())
            boot = hwlab.boot(host, script, out, log=lambda m: print(m, flush=True))
            problems = (
                check(out)
                if boot.exit_code == 0
                else [
                    f"scenario exited {boot.exit_code}:\n{boot.log[-2000:]}\n{boot.console[-1500:]}"
                ]
            )
            if problems:
                failed += 1
                print(f"FAIL {name} ({boot.seconds:.0f} s)")
                for line in problems:
                    print(f"  - {line}")
            else:
                passed += 1
                print(f"PASS {name} ({boot.seconds:.0f} s)")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
