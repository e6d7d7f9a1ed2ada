"""The hardware lab's scenarios (`make hwlab`): each boots a lab host (pcipt/devcluster/hwlab.py:
a real kernel under QEMU with an emulated IOMMU and SR-IOV devices), runs pcipt's own code on
the kernel's /sys, and checks it against the kernel's own tools. Prints each result and ends
with `N passed, M failed`.

    .venv/bin/python tests/hwlab/run.py [SCENARIO ...] [--keep DIR]

Scenarios: discovery, vfio, vfiofail, vfcount, sriov (each a check_<name> below says what it
asserts) and e2e (run_e2e: the controller here, the node plugin in the lab host, nested guests
that show their devices). docs/nodeplugin.md has the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from pcipt import constants as c  # noqa: E402
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
    # The pxb-pcie (bus_nr=128) is a root complex of its own: what samePCIeRoot tells apart.
    roots = {a: f.get("pcie_root") for a, f in got.items()}
    for a in got:
        want_root = "pci0000:80" if int(a[5:7], 16) >= 0x80 else "pci0000:00"
        if roots[a] != want_root:
            problems.append(f"{a} is under PCIe root {roots[a]}, not {want_root}")
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
    """igb: 0 -> 2 in one write, 2 -> 3 through 0; the kernel's EBUSY and ERANGE as simulated.
    NVMe: 0 -> 2 with the controller's flexible resources handed out and its VFs online."""
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
    # NVMe: two VFs, each its own IOMMU group, each secondary controller online with 2 queues
    # and 1 interrupt (the flexible resources the node plugin handed out).
    if r["nvme_writes"] != [2] or r["nvme_numvfs"] != 2 or len(r["nvme_vfs"]) != 2:
        problems.append(f"NVMe VFs: writes {r['nvme_writes']}, now {r['nvme_vfs']}")
    if len({g for *_x, g in r["nvme_vfs"]}) != 2:
        problems.append(f"NVMe VFs share an IOMMU group: {r['nvme_vfs']}")
    states = [
        (s["secondary-controller-state"], s["num-virtual-queues"], s["num-virtual-interrupts"])
        for s in r["nvme_secondaries"]
    ]
    if states != [(1, 2, 1), (1, 2, 1)]:
        problems.append(f"NVMe secondary controllers (online, queues, interrupts): {states}")
    return problems


SRIOV = VFCOUNT.replace("inside.py vfcount", "inside.py sriov")
VFIOFAIL = VFCOUNT.replace("inside.py vfcount", "inside.py vfiofail")


def check_vfiofail(out: Path) -> list[str]:
    """vfio-pci refuses a bridge: the kernel's EINVAL is reported and the port is left on its
    own driver with no override; a held group is DeviceBusy (no blocking unbind), then goes
    back once let go."""
    r = json.loads((out / "vfiofail.json").read_text())
    problems = []
    err = r["port_error"] or {}
    if err.get("reason") != "BindRefused" or "(EINVAL)" not in err.get("message", ""):
        problems.append(f"binding the root port {r['port']}: {err or 'no error'}")
    if r["port_driver_after"] != r["port_driver_before"] or r["port_override_after"] != "(null)":
        problems.append(
            f"root port left on {r['port_driver_after']!r}, override {r['port_override_after']!r}"
        )
    if r["moved_after_refusal"]:
        problems.append(f"a refused device is still recorded as moved: {r['moved_after_refusal']}")
    busy = r["busy_error"] or {}
    if busy.get("reason") != "DeviceBusy" or "sleep" not in busy.get("message", ""):
        problems.append(f"restoring a held device: {busy or 'no error'} (holders {r['holders']})")
    if r["driver_while_held"] != "vfio-pci" or r["busy_seconds"] > 5:
        problems.append(f"while held: {r['driver_while_held']} after {r['busy_seconds']:.1f} s")
    if r["driver_after"] != "e1000e":
        problems.append(f"after the holder let go: {r['driver_after']!r}, not e1000e")
    return problems


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


# libvirt's qemu driver inside a lab host: root runs QEMU (no users, no namespaces, no
# cgroups, no SELinux/AppArmor there), logs go to files (no virtlogd). libvirt resolves its
# default user before it reads qemu.conf, so that user must exist.
LIBVIRTD = r"""
echo "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin" >> /etc/passwd
printf 'kvm:x:64056:\nlibvirt-qemu:x:64055:\n' >> /etc/group
mkdir -p /etc/libvirt /var/lib/libvirt /var/log/libvirt/qemu /run/libvirt
cat > /etc/libvirt/qemu.conf <<EOC
user = "root"
group = "root"
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
remember_owner = 0
EOC
# Reachable over TCP on loopback: live migrations arrive this way (no TLS inside a lab host).
cat > /etc/libvirt/libvirtd.conf <<EOC
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
auth_tcp = "none"
host_uuid = "7a0b0000-0000-4000-8000-00000000000a"
EOC
libvirtd --listen > /lab/libvirtd.log 2>&1 &
for i in $(seq 1 120); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.5; done
"""

# A second "host" inside the lab host, for live migration: its own libvirtd (its own state,
# sockets and host UUID, in a mount namespace, on another TCP port) and its own node plugin,
# node lab-b, offering one igb VF. The same kernel and devices underneath: what differs
# between two hosts for libvirt's migration is what is separate here.
LIBVIRTD_B = r"""
B=/srv/lab-b
mkdir -p $B/run $B/lib $B/etc $B/log/qemu
cp /etc/libvirt/qemu.conf $B/etc/qemu.conf
cat > $B/etc/libvirtd.conf <<EOC
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "16510"
auth_tcp = "none"
host_uuid = "7a0b0000-0000-4000-8000-00000000000b"
EOC
cat > $B/start.sh <<EOS
mount --bind $B/run /run/libvirt
mount --bind $B/lib /var/lib/libvirt
mount --bind $B/etc /etc/libvirt
mount --bind $B/log /var/log/libvirt
libvirtd --listen --pid-file $B/libvirtd.pid > /lab/libvirtd-b.log 2>&1 &
for i in \$(seq 1 120); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.5; done
exec "\$@"
EOS
"""

E2E = f"""
set -x
for a in /sys/bus/pci/devices/*/modalias; do modprobe -q "$(cat "$a")" 2>/dev/null; done
modprobe vfio-pci
modprobe virtio_net  # the management NIC: a virtio device, whose modalias is not a PCI one
sleep 1
{LIBVIRTD}
mgmt=$(for n in /sys/class/net/*; do [ "$(cat $n/address)" = {hwlab.MGMT_MAC} ] && basename $n; done)
[ -n "$mgmt" ] || {{ echo "no management NIC"; exit 3; }}
ip link set lo up
ip addr add {hwlab.MGMT_GUEST_IP} dev $mgmt && ip link set $mgmt up
drivers() {{ for d in /sys/bus/pci/devices/*; do echo "$(basename $d) $(basename "$(readlink $d/driver)")"; done; }}
drivers > /lab/drivers-before.txt
mkdir -p /lab/consoles
igb=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/device)" = 0x10c9 ] && ls $d/net; done)
sed "s/@IGB@/$igb/g" /lab/devices.yaml.in > /lab/devices.yaml
sed "s/@IGB@/$igb/g" /lab/devices-b.yaml.in > /lab/devices-b.yaml
{PY} -m nodeplugin run --node-name lab --kubeconfig /lab/kubeconfig --config /lab/devices.yaml \
  --libvirt-uri qemu:///system --migration-uri qemu+tcp://127.0.0.1/system \
  --domain-type qemu --state-dir /var/lib/pcipt \
  --console-log-dir /lab/consoles --stop-grace 1 --rescan-interval 15 --resync-interval 5 \
  --lease-interval 10 > /lab/agent.log 2>&1 &
agent=$!
{LIBVIRTD_B}
unshare -m sh $B/start.sh {PY} -m nodeplugin run --node-name lab-b --kubeconfig /lab/kubeconfig \
  --config /lab/devices-b.yaml --libvirt-uri qemu:///system \
  --migration-uri qemu+tcp://127.0.0.1:16510/system --domain-type qemu \
  --state-dir /var/lib/pcipt-b --console-log-dir /lab/consoles --stop-grace 1 \
  --rescan-interval 15 --resync-interval 5 --lease-interval 10 --metrics-port 8081 \
  > /lab/agent-b.log 2>&1 &
agentb=$!
# The outer side says when the guests have shown their devices, and when the VMs are gone.
for i in $(seq 1 1100); do [ -e /lab/guests-seen ] && break; sleep 1; done
ip -d link show dev $igb > /lab/iplink.txt
drivers > /lab/drivers-running.txt
virsh -c qemu:///system list --all > /lab/virsh-running.txt
touch /lab/inside-read
for i in $(seq 1 600); do [ -e /lab/vms-gone ] && break; sleep 1; done
sleep 3
drivers > /lab/drivers-after.txt
virsh -c qemu:///system list --all > /lab/virsh-after.txt
virsh -c qemu+tcp://127.0.0.1:16510/system list --all >> /lab/virsh-after.txt
ps -eo comm > /lab/ps-after.txt
kill $agent $agentb 2>/dev/null; exit 0
"""

E2E_DEVICES = """
vfs:
  - name: igb
    match: {vendorID: "8086", productID: "10c9"}
    count: 3
  - name: nvme
    match: {vendorID: "1b36", productID: "0010", address: "0000:01:00.0"}
    count: 1
devices:
  - name: e1000e
    match: {vendorID: "8086", productID: "10d3", address: "0000:03:00.0"}
  - name: nvme-vf
    match: {vendorID: "1b36", productID: "0010", address: "0000:01:00.1"}
  - name: igb-vf
    match: {netdev: "@IGB@#0-1"}
    physicalNetwork: labnet
"""
# Node lab-b (the second libvirtd): the igb's third VF, on the same physical network.
E2E_DEVICES_B = """
devices:
  - name: igb-vf
    match: {netdev: "@IGB@#2"}
    physicalNetwork: labnet
"""


def _e2e_objects(kernel: str) -> str:
    boot = {
        "kernel": f"file://{kernel}",
        "initrd": "file:///lab/guest.cpio",
        "cmdline": "console=ttyS0 quiet panic=-1",
    }
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}},
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciFlavor",
            "metadata": {"name": "lab-e1000e"},
            "spec": {"deviceType": "nic", "selector": {"productIDs": ["10d3"]}},
        },
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciFlavor",
            "metadata": {"name": "lab-nvme-vf"},
            "spec": {
                "deviceType": "nvme",
                "selector": {"productIDs": ["0010"], "sriovRoles": ["VF"]},
            },
        },
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciFlavor",
            "metadata": {"name": "lab-igb-vf"},
            "spec": {
                "deviceType": "nic",
                "selector": {"productIDs": ["10ca"], "physicalNetworks": ["labnet"]},
                "networking": {"vlanRanges": ["100-199"]},
            },
        },
    ]
    for name, extra in (
        # Two passthrough devices in one guest: a plain function and an NVMe VF the plugin made.
        (
            "plain",
            {
                "devices": [
                    {"name": "nic", "flavor": "lab-e1000e"},
                    {"name": "disk", "flavor": "lab-nvme-vf"},
                ]
            },
        ),
        (
            "vf",
            {
                "networks": [
                    {
                        "name": "uplink",
                        "flavor": "lab-igb-vf",
                        "physicalNetwork": "labnet",
                        "vlan": 100,
                        "mac": "52:54:00:aa:00:01",
                        "mode": "hostdev",
                        "maxTxRate": 100,  # igb (82576) limits a VF's rate; shown in iplink
                    }
                ]
            },
        ),
    ):
        docs.append(
            {
                "apiVersion": "pcipt.io/v1alpha1",
                "kind": "PassthroughVM",
                "metadata": {"name": name, "namespace": "lab"},
                "spec": {
                    "cpu": {"cores": 1, "pinning": "none"},
                    "memory": "256Mi",
                    "kernelBoot": boot,
                    **extra,
                },
            }
        )
    return "\n---\n".join(json.dumps(d) for d in docs)


def _guest_lspci(console: str) -> list[str]:
    if "PCIPT-GUEST-LSPCI-END" not in console:
        return []
    body = console.split("PCIPT-GUEST-LSPCI-BEGIN", 1)[1].split("PCIPT-GUEST-LSPCI-END", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def _guest_lspci_last(console: str) -> list[str]:
    """The guest's latest listing (it prints one again whenever its devices change)."""
    if "PCIPT-GUEST-LSPCI-END" not in console:
        return []
    body = console.rsplit("PCIPT-GUEST-LSPCI-END", 1)[0].rsplit("PCIPT-GUEST-LSPCI-BEGIN", 1)[1]
    return [line.strip() for line in body.splitlines() if line.strip()]


def _hotplug(out: Path, lab: Any, running: hwlab.Running, log: Callable[[str], None]) -> list[str]:
    """Add a second igb VF network to the running `vf` VM, see the guest get it, remove it,
    see the guest lose it and the VF released."""
    problems: list[str] = []
    console = out / "consoles" / "lab_vf.log"

    def vfs_in_guest() -> int:
        lines = _guest_lspci_last(console.read_text(errors="replace"))
        return sum("[8086:10ca]" in line for line in lines)

    def networks(extra: list[dict[str, Any]]) -> None:
        base = {"name": "uplink", "flavor": "lab-igb-vf", "physicalNetwork": "labnet",
                "vlan": 100, "mac": "52:54:00:aa:00:01", "mode": "hostdev",
                "maxTxRate": 100}  # fmt: skip
        lab.kubectl(
            "patch", "passthroughvm", "vf", "-n", "lab", "--type", "merge",
            "-p", json.dumps({"spec": {"networks": [base, *extra]}}),
        )  # fmt: skip

    def wait(pred: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and running.alive():
            if pred():
                return True
            time.sleep(2)
        return False

    started = time.monotonic()
    networks([{"name": "second", "flavor": "lab-igb-vf", "physicalNetwork": "labnet",
               "vlan": 101, "mac": "52:54:00:aa:00:02", "mode": "hostdev"}])  # fmt: skip
    if wait(lambda: vfs_in_guest() == 2, 240):
        log(f"hwlab: the guest sees the hot-plugged VF ({time.monotonic() - started:.0f} s)")
    else:
        problems.append(
            f"the guest never saw a second igb VF: {_guest_lspci_last(console.read_text(errors='replace'))}"
        )
    vm = json.loads(lab.kubectl("get", "passthroughvm", "vf", "-n", "lab", "-o", "json").stdout)
    (out / "hotplug-vm.json").write_text(json.dumps(vm, indent=1))
    added = next((n for n in vm["status"].get("networks", []) if n["name"] == "second"), None)
    conds = {x["type"]: x for x in vm["status"].get("conditions", [])}
    attached = conds.get("DevicesAttached", {})
    if added is None or attached.get("status") != "True":
        problems.append(f"hot-plug not reported: networks {vm['status'].get('networks')}, "
                        f"DevicesAttached {attached}")  # fmt: skip
    started = time.monotonic()
    networks([])
    if wait(lambda: vfs_in_guest() == 1, 240):
        log(f"hwlab: the guest lost the unplugged VF ({time.monotonic() - started:.0f} s)")
    else:
        problems.append("the guest still has two igb VFs after the unplug")
    if added is not None:

        def released() -> bool:
            dev = json.loads(
                lab.kubectl("get", "pcidev", added["pciDevice"], "-o", "json").stdout or "{}"
            )
            rel = (dev.get("spec") or {}).get("release") or {}
            return not (dev.get("spec") or {}).get("claimRef") and rel.get("reason") == "Detached"

        if not wait(released, 120):
            problems.append(f"{added['pciDevice']} was not released after the unplug")
    return problems


def _alive(console: str) -> tuple[str, float] | None:
    """The guest's boot ID and uptime, from the last line it said them in."""
    found = re.findall(r"PCIPT-GUEST-ALIVE boot=(\S+) up=([\d.]+)", console)
    return (found[-1][0], float(found[-1][1])) if found else None


def _live_migration(
    out: Path, cluster: Any, lab: Any, running: hwlab.Running, log: Callable[[str], None]
) -> list[str]:
    """`kubectl pcipt migrate vf --live --to lab-b`: libvirt moves the running guest to the
    second libvirtd; its igb VF is unplugged before and a VF of lab-b plugged in after. The
    guest must say the same boot ID with a longer uptime, and list an igb VF again; the old VF
    must be released (reason Migrated) and scrubbed."""
    from pcipt.cli import kubectl_pcipt

    problems: list[str] = []
    console = out / "consoles" / "lab_vf.log"
    before = _alive(console.read_text(errors="replace"))
    vm = json.loads(lab.kubectl("get", "passthroughvm", "vf", "-n", "lab", "-o", "json").stdout)
    old_vf = vm["status"]["networks"][0]["pciDevice"]
    started = time.monotonic()
    argv = ["--kubeconfig", str(cluster.kubeconfig), "migrate", "vf", "-n", "lab", "--live",
            "--to", "lab-b"]  # fmt: skip
    if kubectl_pcipt.main(argv) != 0:
        return ["kubectl pcipt migrate --live failed"]
    deadline = time.monotonic() + 300
    mig: dict[str, Any] = {}
    while time.monotonic() < deadline and running.alive():
        vm = json.loads(lab.kubectl("get", "passthroughvm", "vf", "-n", "lab", "-o", "json").stdout)
        mig = vm["status"].get("migration") or {}
        if mig.get("phase") in ("Completed", "Failed"):
            break
        time.sleep(1)
    (out / "live-migration-vm.json").write_text(json.dumps(vm, indent=1))
    moved = time.monotonic() - started
    if mig.get("phase") != "Completed" or vm["status"].get("nodeName") != "lab-b":
        return [f"the live migration did not complete: {mig}"]
    log(f"hwlab: live migration completed ({moved:.0f} s): {mig.get('message')}")

    def replugged() -> bool:
        text = console.read_text(errors="replace")
        after = _alive(text)
        vfs = sum("[8086:10ca]" in line for line in _guest_lspci_last(text))
        return after is not None and after != before and vfs == 1

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and running.alive() and not replugged():
        time.sleep(2)
    after = _alive(console.read_text(errors="replace"))
    (out / "live-migration.txt").write_text(f"before={before} after={after} seconds={moved:.1f}\n")
    if not replugged():
        problems.append(
            f"after the live migration the guest said {after} (before: {before}) and listed "
            f"{_guest_lspci_last(console.read_text(errors='replace'))}"
        )
    elif before is None or after is None or after[0] != before[0] or after[1] <= before[1]:
        problems.append(f"the guest restarted instead of moving: before {before}, after {after}")
    else:
        log(f"hwlab: the guest kept running (boot {after[0][:8]}, up {before[1]:.0f} -> "
            f"{after[1]:.0f} s) and has a VF of lab-b ({time.monotonic() - started:.0f} s)")  # fmt: skip
    vm = json.loads(lab.kubectl("get", "passthroughvm", "vf", "-n", "lab", "-o", "json").stdout)
    new_vf = vm["status"]["networks"][0]["pciDevice"]
    if not new_vf.startswith("lab-b."):
        problems.append(f"the VM's VF after the migration is {new_vf}, not one of lab-b")
    deadline = time.monotonic() + 120
    dev: dict[str, Any] = {}
    while time.monotonic() < deadline:
        dev = json.loads(lab.kubectl("get", "pcidev", old_vf, "-o", "json").stdout or "{}")
        rel = (dev.get("spec") or {}).get("release") or {}
        scrub = (dev.get("status") or {}).get("scrub") or {}
        if rel.get("reason") == "Migrated" and scrub.get("releaseID") == rel.get("id"):
            break
        time.sleep(2)
    else:
        problems.append(f"{old_vf} was not released and scrubbed after the migration: {dev}")
    return problems


def run_e2e(out: Path, log: Callable[[str], None]) -> list[str]:
    """The outer side: a real API server and the controller here, the node plugin in the lab
    host (through guestfwd); two PassthroughVMs; the guests' lspci read from their consoles."""
    from pcipt.devcluster.cluster import LocalCluster
    from pcipt.devcluster.lab import Lab

    out.mkdir(parents=True, exist_ok=True)
    (out / "no-hosts.yaml").write_text("hosts: {}\n")
    cluster = LocalCluster(out / "control-plane", extra_names=[hwlab.MGMT_ADDRESS])
    lab = Lab(
        out / "outer",
        out / "no-hosts.yaml",
        out / "no-hosts.yaml",
        controller_args=["--node-dead-after", "60"],
    )
    problems: list[str] = []
    running = None
    try:
        lab.start(cluster)
        state = cluster.state()
        assert state is not None
        port = int(state.server.rsplit(":", 1)[1])
        kubeconfig = cluster.kubeconfig.read_text().replace(
            state.server, f"https://{hwlab.MGMT_ADDRESS}:6443"
        )
        (out / "kubeconfig").write_text(kubeconfig)
        (out / "devices.yaml.in").write_text(E2E_DEVICES)
        (out / "devices-b.yaml.in").write_text(E2E_DEVICES_B)
        hwlab.build_guest_initramfs(out / "guest.cpio")
        lab.kubectl("create", "namespace", c.DEFAULT_NAMESPACE, check=False)
        host = hwlab.LabHost(
            name="e2e",
            devices=hwlab.default_devices(),
            timeout=1200,
            forwards={
                6443: [sys.executable, str(REPO / "tests/hwlab/relay.py"), "127.0.0.1", str(port)]
            },
        )
        running = hwlab.start(host, E2E, out, log=log)
        lab.kubectl("apply", "-f", "-", input=_e2e_objects(str(hwlab.kernel()[0])))
        seen: dict[str, list[str]] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and running.alive() and len(seen) < 2:
            for name in ("plain", "vf"):
                f = out / "consoles" / f"lab_{name}.log"
                if name not in seen and f.exists():
                    lines = _guest_lspci(f.read_text(errors="replace"))
                    if lines:
                        seen[name] = lines
                        log(
                            f"hwlab: guest {name} is up ({time.monotonic() - running.started:.0f} s)"
                        )
            got = lab.kubectl("get", "passthroughvms", "-n", "lab", "-o", "json", check=False)
            vms = json.loads(got.stdout or '{"items": []}')
            failed = [v for v in vms["items"] if (v.get("status") or {}).get("phase") == "Failed"]
            if failed:
                problems += [
                    f"VM {v['metadata']['name']} failed: {v['status'].get('conditions')}"
                    for v in failed
                ]
                break
            time.sleep(2)
        phases = lab.kubectl(
            "get",
            "passthroughvms",
            "-n",
            "lab",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.phase} {end}",
            check=False,
        ).stdout
        (out / "phases.txt").write_text(phases)
        (out / "pcidevices.json").write_text(
            lab.kubectl("get", "pcidev", "-o", "json", check=False).stdout
        )
        (out / "vms.json").write_text(
            lab.kubectl("get", "passthroughvms", "-A", "-o", "json", check=False).stdout
        )
        if not problems and len(seen) == 2:
            problems += _hotplug(out, lab, running, log)
        if not problems and len(seen) == 2:
            problems += _live_migration(out, cluster, lab, running, log)
        (out / "guests-seen").touch()
        wait_file(out / "inside-read", running, 120)
        started = time.monotonic()
        lab.kubectl(
            "delete",
            "passthroughvms",
            "-n",
            "lab",
            "--all",
            "--wait=true",
            "--timeout=180s",
            check=False,
        )
        (out / "delete-seconds.txt").write_text(f"{time.monotonic() - started:.1f}")
        left = lab.kubectl(
            "get", "passthroughvms", "-n", "lab", "-o", "name", check=False
        ).stdout.strip()
        if left:
            problems.append(f"VMs still there after delete: {left}")
        # Released devices come back to their drivers through their scrub (reset on the real
        # kernel, then the driver they had): wait for every release to be answered.
        scrubs = _wait_scrubs(lab, 180)
        (out / "scrubs.json").write_text(json.dumps(scrubs, indent=1))
        (out / "vms-gone").touch()
        boot = running.finish()
        running = None
        if boot.exit_code != 0:
            problems.append(
                f"lab scenario exited {boot.exit_code}:\n{boot.log[-2500:]}\n{boot.console[-1500:]}"
            )
        problems += check_e2e(out, seen, phases)
    finally:
        if running is not None:
            (out / "guests-seen").touch()
            (out / "vms-gone").touch()
            running.finish()
        lab.stop()
        cluster.down()
    return problems


def _wait_scrubs(lab: Any, timeout: float) -> dict[str, Any]:
    """address -> (release, scrub) of every released device, once each release that asks for a
    scrub is answered (or the time is up)."""
    deadline = time.monotonic() + timeout
    got: dict[str, Any] = {}
    while True:
        raw = lab.kubectl("get", "pcidev", "-o", "json", check=False).stdout
        got = {}
        for d in json.loads(raw or '{"items": []}')["items"]:
            rel = (d.get("spec") or {}).get("release")
            if rel:
                got[d["spec"]["address"]] = {
                    "release": rel,
                    "scrub": (d.get("status") or {}).get("scrub"),
                    "health": (d.get("status") or {}).get("health"),
                }
        answered = all(
            (v["scrub"] or {}).get("releaseID") == v["release"]["id"]
            for v in got.values()
            if v["release"].get("scrub")
        )
        if (got and answered) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def wait_file(path: Path, running: hwlab.Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and running.alive() and time.monotonic() < deadline:
        time.sleep(1)


def _text(path: Path) -> str:
    """A file the lab host may not have written (it failed early): empty then."""
    return path.read_text(errors="replace") if path.exists() else ""


def check_e2e(out: Path, seen: dict[str, list[str]], phases: str) -> list[str]:
    problems = []
    agent_log = _text(out / "agent.log")
    if "plain=Running" not in phases or "vf=Running" not in phases:
        problems.append(f"VM phases: {phases!r}")
        # Say why, so a failure far away (CI) can be read without the lab's files.
        vms = json.loads(_text(out / "vms.json") or '{"items": []}')
        for v in vms["items"]:
            for cond in (v.get("status") or {}).get("conditions") or []:
                problems.append(
                    f"  {v['metadata']['name']} {cond.get('type')}={cond.get('status')} "
                    f"{cond.get('reason')}: {cond.get('message')}"
                )
        problems += [f"  agent: {line}" for line in agent_log.splitlines()[-25:]]
    plain = seen.get("plain", [])
    if not any("[8086:10d3]" in line for line in plain):
        problems.append(f"the plain guest's lspci shows no e1000e: {plain}")
    if not any("[1b36:0010]" in line for line in plain):
        problems.append(f"the plain guest's lspci shows no NVMe VF: {plain}")
    vf = seen.get("vf", [])
    if not any("[8086:10ca]" in line for line in vf):
        problems.append(f"the VF guest's lspci shows no igb VF: {vf}")
    text = _text(out / "iplink.txt")
    if not re.search(r"vf \d+ .*52:54:00:aa:00:01.*vlan 100", text):
        problems.append(f"no VF with the VM's MAC and VLAN in the PF's ip -d link: {text!r}")
    # The VM's maxTxRate, set on the VF it has now (lab-b's, after the live migration).
    line = next(
        (x for x in text.split("vf ")[1:] if "52:54:00:aa:00:01" in x and "vlan 100" in x), ""
    )
    if "max_tx_rate 100Mbps" not in line:
        problems.append(f"the VM's VF has no max_tx_rate 100Mbps in ip -d link: {line!r}")

    def drivers(name: str) -> dict[str, str]:
        rows = [line.split() for line in _text(out / name).splitlines()]
        return {r[0]: (r[1] if len(r) > 1 else "") for r in rows}

    during, after = drivers("drivers-running.txt"), drivers("drivers-after.txt")
    vfio_during = sorted(a for a, d in during.items() if d == "vfio-pci")
    if len(vfio_during) != 3:
        problems.append(f"bound to vfio-pci while the guests ran: {vfio_during}")
    # What each device had before the agent bound it (a VF it made has no driver here: no udev).
    was = dict(
        re.findall(
            r"bound device=(\S+) driver=vfio-pci \(was (\S+)\)",
            agent_log + _text(out / "agent-b.log"),
        )
    )
    for a in vfio_during:
        want = "" if was.get(a, "none") == "none" else was[a]
        if after.get(a, "") != want:
            problems.append(f"{a} after the VM went: {after.get(a)!r}, not {want!r} as before")
    scrubs = json.loads(_text(out / "scrubs.json") or "{}")
    for a in vfio_during:
        entry = scrubs.get(a)
        scrub = (entry or {}).get("scrub") or {}
        if entry is None or not entry["release"].get("scrub"):
            problems.append(f"{a} was released without a scrub asked for: {entry}")
        elif scrub.get("releaseID") != entry["release"]["id"] or scrub.get("phase") != "Done":
            problems.append(f"{a}'s scrub did not answer its release: {entry}")
        elif scrub.get("reset") in (None, "none"):
            problems.append(f"{a} was scrubbed without a reset on the real kernel: {scrub}")
    virsh_after = _text(out / "virsh-after.txt")
    if "lab_" in virsh_after:
        problems.append(f"domains left after delete: {virsh_after!r}")
    ps_after = _text(out / "ps-after.txt")
    if "qemu-system" in ps_after:
        problems.append("a nested QEMU still runs after the VMs were deleted")
    return problems


SCENARIOS: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "discovery": (DISCOVERY, check_discovery),
    "vfio": (VFIO, check_vfio),
    "vfcount": (VFCOUNT, check_vfcount),
    "sriov": (SRIOV, check_sriov),
    "vfiofail": (VFIOFAIL, check_vfiofail),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", default=[*SCENARIOS, "e2e"])
    p.add_argument("--keep", type=Path, help="keep each scenario's files under this folder")
    args = p.parse_args()
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="pcipt-hwlab-") as tmp:
        base = args.keep or Path(tmp)
        for name in args.scenarios:
            out = base / name
            if name == "e2e":
                started = time.monotonic()
                problems = run_e2e(out, lambda m: print(m, flush=True))
                seconds = time.monotonic() - started
            else:
                script, check = SCENARIOS[name]
                host = hwlab.LabHost(name=name, devices=hwlab.default_devices())
                boot = hwlab.boot(host, script, out, log=lambda m: print(m, flush=True))
                seconds = boot.seconds
                problems = (
                    check(out)
                    if boot.exit_code == 0
                    else [
                        f"scenario exited {boot.exit_code}:\n{boot.log[-2000:]}\n"
                        f"{boot.console[-1500:]}"
                    ]
                )
            print(f"{'FAIL' if problems else 'PASS'} {name} ({seconds:.0f} s)")
            for line in problems:
                print(f"  - {line}")
            failed += bool(problems)
            passed += not problems
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
