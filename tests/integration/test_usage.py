"""Device time for charging, against the real API server: the usage ledger written at each
release (deletion, evacuation), the counters a controller serves computed from it and the open
claims, the same after a restart and from a standby replica that takes over, never shrinking;
and `kubectl pcipt usage`."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from pcipt import constants as c
from pcipt.cli import kubectl_pcipt
from pcipt.usage import LEDGER_PREFIX
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import OPERATOR_NS, ControllerProcess, LeaseKeeper, World, wait_for

pytestmark = pytest.mark.usefixtures("operator_namespace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Metered:
    """A controller serving /metrics on a port of its own."""

    def __init__(self, kube: KubeCluster, tmp: Path, *extra: str, name: str = "controller") -> None:
        self.port = free_port()
        self.proc = ControllerProcess(
            kube.kubeconfig, tmp, "--metrics-port", str(self.port), *extra, name=name
        ).start()

    def seconds(self, namespace: str, flavor: str) -> float:
        """pcipt_device_seconds_total of the namespace and flavor (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            m = re.match(r"pcipt_device_seconds_total\{(.*)\} (\S+)$", line)
            if m is None:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("namespace") == namespace and labels.get("flavor") == flavor:
                return float(m.group(2))
        return 0.0


def ledger(kube: KubeCluster, namespace: str) -> dict[str, dict[str, object]]:
    try:
        cm = client.CoreV1Api(kube.api).read_namespaced_config_map(
            f"{LEDGER_PREFIX}{namespace}", OPERATOR_NS
        )
    except client.ApiException as e:
        if e.status == 404:
            return {}
        raise
    return {k: json.loads(v) for k, v in (cm.data or {}).items()}


def test_device_time_is_recorded_at_release_and_survives_restarts_and_failover(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lease = f"pcipt-{world.test_id}"
    elect = ("--leader-elect", "--leader-elect-lease", lease, "--leader-elect-lease-duration",
             "4", "--leader-elect-renew-period", "1")  # fmt: skip
    one = Metered(kube, tmp_path, *elect, "--identity", "one", name="one")
    wait_for(lambda: "leading lease=" in one.proc.log(), what="one leads")
    two = Metered(kube, tmp_path, *elect, "--identity", "two", name="two")
    try:
        a, b = world.node("a"), world.node("b")
        client.CoreV1Api(kube.api).create_node(client.V1Node(metadata=client.V1ObjectMeta(name=a)))
        at_a = leases(a)
        leases(b)
        world.device("a", "0000:3b:00.0")
        world.device("b", "0000:3b:00.0")
        gpu = world.flavor("a100", priceClass="gpu-premium")
        world.vm("vm1", [{"name": "gpu", "flavor": gpu}])
        wait_for(lambda: world.get_vm("vm1").status.phase == "Scheduled", what="placed")
        bound = world.get_vm("vm1").status.devices[0]
        assert bound.since is not None  # the VM says since when it has the device
        ns = world.namespace
        # Both replicas count the open claim, and it grows.
        first = wait_for(lambda: one.seconds(ns, gpu) > 0 and one.seconds(ns, gpu), what="counted")
        time.sleep(1.5)
        assert two.seconds(ns, gpu) > first
        # The leader dies: the standby takes over and the count does not go back.
        before = two.seconds(ns, gpu)
        one.proc.kill()
        wait_for(lambda: "leading lease=" in two.proc.log(), timeout=30, what="two takes over")
        assert two.seconds(ns, gpu) >= before
        # Deleted: its interval goes to the ledger before the claim goes; the count stops.
        world.delete_vm("vm1")
        wait_for(lambda: not world.vms(), what="vm1 gone")
        entries = wait_for(lambda: ledger(kube, ns), what="the ledger entry")
        (entry,) = entries.values()
        assert entry["vm"] == f"{ns}/vm1" and entry["flavor"] == gpu
        assert entry["priceClass"] == "gpu-premium" and entry["reason"] == "Deleted"
        spent = float(entry["to"]) - float(entry["from"])  # type: ignore[arg-type]
        stopped = wait_for(lambda: two.seconds(ns, gpu) or None, what="the closed count")
        assert stopped == pytest.approx(spent, abs=0.01)
        time.sleep(1.0)
        assert two.seconds(ns, gpu) == stopped  # a released device adds nothing more
        # A restart computes the same from the API server.
        two.proc.restart()
        wait_for(lambda: "leading lease=" in two.proc.log(), timeout=30, what="two leads again")
        assert two.seconds(ns, gpu) == pytest.approx(stopped, abs=0.01)
        # Evacuation releases are charged up to the release too.
        world.vm(
            "vm2", [{"name": "gpu", "flavor": gpu}], nodeSelector={"kubernetes.io/hostname": a}
        )
        wait_for(lambda: world.get_vm("vm2").status.phase == "Scheduled", what="vm2 placed")
        at_a.stop()  # node a goes silent, and is declared out of service
        client.CoreV1Api(kube.api).patch_node(a, {"spec": {"taints": [
            {"key": c.TAINT_OUT_OF_SERVICE, "value": "nodeshutdown", "effect": "NoExecute"}]}})  # fmt: skip
        wait_for(
            lambda: any(e["reason"] == c.REASON_EVACUATED for e in ledger(kube, ns).values()),
            timeout=30,
            what="the evacuation's ledger entry",
        )
        # What kubectl pcipt usage says: both VMs, in device-hours, with the price class.
        argv = ["--kubeconfig", str(kube.kubeconfig), "usage", "-n", ns, "-o", "json"]
        assert kubectl_pcipt.main(argv) == 0
        shown = json.loads(capsys.readouterr().out)
        rows = {r["vm"]: r for r in shown["usage"]}
        assert set(rows) == {"vm1", "vm2"} and rows["vm1"]["priceClass"] == "gpu-premium"
        assert rows["vm1"]["deviceSeconds"] == pytest.approx(spent, abs=0.1)
        assert kubectl_pcipt.main([*argv[:-2], "--since", "1s"]) == 0
        assert "vm1" not in capsys.readouterr().out  # released before the last second
    finally:
        one.proc.stop()
        two.proc.stop()
        client.CoreV1Api(kube.api).delete_collection_namespaced_config_map(
            OPERATOR_NS, label_selector="pcipt.io/usage-ledger=true"
        )
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(kube.api).delete_node(world.node("a"))
