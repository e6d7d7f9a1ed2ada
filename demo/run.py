"""`make demo`: pcipt end to end on this machine, in about half a minute.

Starts a real Kubernetes control plane on loopback, the pcipt controller, and two simulated
virtualization hosts (demo/hardware.yaml) each with a node plugin and libvirt's test driver;
applies the examples a user would; and shows what pcipt did: the device inventory, the flavors,
the VMs (one that cannot fit, and why) and a domain as libvirt holds it.

    python demo/run.py            # run, show, tear down
    python demo/run.py --keep     # leave it running to explore (prints how)
    python demo/run.py --stop     # stop what --keep left running
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pcipt.devcluster import KUBERNETES_VERSION  # noqa: E402
from pcipt.devcluster.binaries import cache_root  # noqa: E402
from pcipt.devcluster.cluster import LocalCluster  # noqa: E402
from pcipt.devcluster.lab import Lab  # noqa: E402

WORKDIR = cache_root() / "demo"
EX = REPO / "examples"
NS = "gpu-tenants"
TOO_BIG = (EX / "vm-too-big.yaml").read_text()


def say(text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}==> {text}{plain}", flush=True)


def show(lab: Lab, *args: str) -> None:
    print(f"$ kubectl {' '.join(args)}")
    print(lab.kubectl(*args).stdout.rstrip())


def stop_kept() -> int:
    pids = WORKDIR / "pids.json"
    if not pids.exists():
        print("nothing to stop")
        return 0
    for pid in json.loads(pids.read_text()).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    LocalCluster(WORKDIR / "control-plane").down()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    print("stopped the demo")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="leave everything running")
    p.add_argument("--stop", action="store_true", help="stop what --keep left running")
    args = p.parse_args()
    if args.stop:
        return stop_kept()
    if (WORKDIR / "pids.json").exists():
        stop_kept()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    started = time.monotonic()
    lab = Lab(
        WORKDIR,
        REPO / "demo" / "hardware.yaml",
        REPO / "demo" / "node-config.yaml",
        plugin_args=["--rescan-interval", "5", "--lease-interval", "5", "--resync-interval", "2"],
    )
    say(
        f"Starting a Kubernetes {KUBERNETES_VERSION} control plane on loopback, the pcipt "
        "controller, and two simulated hosts (node-a, node-b from demo/hardware.yaml)"
    )
    lab.start()
    try:
        for f in ("namespace-gpu-tenant.yaml", "flavor-gpu-a100.yaml", "flavor-nic-vf.yaml"):
            lab.kubectl("apply", "-f", str(EX / f))
        lab.wait_for("{.status.total}", "4", "pciflavor", "a100", timeout=60)
        lab.wait_for("{.status.total}", "8", "pciflavor", "e810-vf-physnet2", timeout=60)

        say("What the hosts offer: one PciDevice per function their device specs allow")
        show(lab, "get", "pcidev")
        show(lab, "get", "pciflavor")

        say("A tenant applies two VMs: two NUMA-local A100s, and an SR-IOV VF on VLAN 120")
        for f in ("vm-2gpu.yaml", "vm-sriov-vlan.yaml"):
            print(f"$ kubectl apply -n {NS} -f examples/{f}")
            lab.kubectl("apply", "-n", NS, "-f", str(EX / f))
        lab.wait_for("{.status.phase}", "Running", "ptvm", "trainer", "-n", NS, timeout=60)
        lab.wait_for("{.status.phase}", "Running", "ptvm", "router", "-n", NS, timeout=60)
        show(lab, "get", "ptvm", "-n", NS, "-o", "wide")
        lab.wait_for("{.status.free}", "2", "pciflavor", "a100", timeout=10)
        lab.wait_for("{.status.free}", "7", "pciflavor", "e810-vf-physnet2", timeout=10)
        show(lab, "get", "pciflavor")

        say("And one that cannot fit: three A100s on one NUMA node")
        lab.kubectl("apply", "-n", NS, "-f", "-", input=TOO_BIG)
        lab.wait_for("{.status.phase}", "Pending", "ptvm", "too-big", "-n", NS, timeout=30)
        time.sleep(0.5)
        show(lab, "get", "ptvm", "too-big", "-n", NS, "-o", "jsonpath={.status.scheduling.message}")

        say(
            f"The domain node-a's libvirt runs for {NS}/trainer "
            "(vCPUs and memory pinned to NUMA node 0)"
        )
        print((lab.state_dir("node-a") / "domains" / f"{NS}_trainer.xml").read_text().rstrip())

        say(f"Done in {time.monotonic() - started:.0f}s")
        if args.keep:
            (WORKDIR / "pids.json").write_text(json.dumps({n: p.pid for n, p in lab.procs.items()}))
            assert lab.cluster is not None
            print(
                f"Still running. Explore with:\n  export KUBECONFIG={lab.kubeconfig}\n"
                f"  {lab.kubectl_path} get pcipt -A\n"
                f"Logs in {WORKDIR / 'logs'}. Stop with: make demo-stop"
            )
            return 0
    except Exception as e:
        print(f"\ndemo failed: {e}\nlogs: {WORKDIR / 'logs'}", file=sys.stderr)
        lab.stop()
        return 1
    lab.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
