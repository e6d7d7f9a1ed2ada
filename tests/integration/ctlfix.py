"""Helpers for tests that run the real controller against the real API server: a controller
process, node Leases kept fresh the way node plugins keep them, devices published the way a
node plugin publishes them, and the invariant checker (no double claim, no leak)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from controller.vmstatus import listed_devices
from pcipt import constants as c
from pcipt.api.v1alpha1 import PassthroughVM, PciDevice, pcidevice_name
from tests.conftest import REPO_ROOT

OPERATOR_NS = "pcipt-system"
TEST_LABEL = "pcipt.io/test"


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wait_for(
    pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}: last={last!r}")


def consistently(pred: Callable[[], Any], seconds: float, what: str = "") -> None:
    """pred holds for the whole window (checked every 0.1 s): for what must not happen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pred():
            raise AssertionError(f"no longer true after a while: {what or pred}")
        time.sleep(0.1)


class ControllerProcess:
    """`pcipt-controller run` as a child process, with its log in a file."""

    def __init__(
        self, kubeconfig: Path, log_dir: Path, *extra: str, name: str = "controller"
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> ControllerProcess:
        args = [
            sys.executable,
            "-m",
            "controller",
            "run",
            "--namespace",
            OPERATOR_NS,
            "--node-dead-after",
            "6",
            "--claim-grace",
            "2",
            "--audit-interval",
            "2",
            "--metrics-port",
            "0",
            *self.extra,
        ]
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        self.starts += 1
        fh = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
        self.proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
        fh.close()
        if wait:
            self.wait_started()
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"controller exited {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            return self.log().count("controller started") >= self.starts

        wait_for(started, timeout, what="the controller to start")

    def restart(self) -> None:
        self.kill()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class LeaseKeeper:
    """Renews `pcipt-node-<node>` Leases every second, as each node plugin would."""

    def __init__(
        self, api: client.ApiClient, nodes: Iterable[str], compute: str | None = None
    ) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.nodes = set(nodes)
        self.compute = compute
        """The pcipt.io/compute annotation each Lease carries, as a node plugin writes it."""
        self.annotations: dict[str, str] = {}
        """More annotations each Lease carries (pcipt.io/scrubs-released-devices, ...)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LeaseKeeper:
        for n in sorted(self.nodes):
            self.renew(n)
        self._thread.start()
        return self

    def renew(self, node: str) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": f"{c.NODE_LEASE_PREFIX}{node}",
                "namespace": OPERATOR_NS,
                "annotations": {
                    **({"pcipt.io/compute": self.compute} if self.compute else {}),
                    **self.annotations,
                },
            },
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 6, "renewTime": iso_now()},
        }
        self.coord.patch_namespaced_lease(
            f"{c.NODE_LEASE_PREFIX}{node}",
            OPERATOR_NS,
            body,
            field_manager="test-node",
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for n in sorted(self.nodes):
                # The API server may be restarting; try again next second.
                with contextlib.suppress(Exception):
                    self.renew(n)

    def stop(self, delete: bool = True) -> None:
        """Stop renewing; delete the Leases too unless told not to (a node that died)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if delete:
            for n in sorted(self.nodes):
                with contextlib.suppress(client.ApiException):
                    self.coord.delete_namespaced_lease(f"{c.NODE_LEASE_PREFIX}{n}", OPERATOR_NS)


@dataclass
class World:
    """Cluster-scoped objects of one test, all labelled with its ID so cleanup finds them."""

    api: client.ApiClient
    namespace: str
    test_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def node(self, n: str) -> str:
        return f"{self.test_id}-{n}"

    def device(
        self,
        node: str,
        address: str,
        *,
        vendor: str = "10de",
        product: str = "20b0",
        cls: str = "030200",
        numa: int = 0,
        group: int | None = None,
        peers: list[str] | None = None,
        role: str = "None",
        physnet: str | None = None,
        netdev: str | None = None,
        health: str = "Healthy",
        unschedulable: bool = False,
        attributes: dict[str, str] | None = None,
        phys_fn: str | None = None,
        root: str | None = None,
    ) -> str:
        """Publish a device as a node plugin does: spec by apply, then status. `phys_fn`: the
        PF's address, for a VF (role VF is implied)."""
        node = self.node(node)
        name = pcidevice_name(node, address)
        body = {
            "apiVersion": c.API_VERSION,
            "kind": "PciDevice",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.test_id, c.LABEL_NODE: node}},
            "spec": {"nodeName": node, "address": address, "unschedulable": unschedulable},
        }
        self.custom.create_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, body)
        status: dict[str, Any] = {
            "vendorID": vendor,
            "productID": product,
            "classCode": cls,
            "driver": "vfio-pci",
            "numaNode": numa,
            "health": health,
            "sriov": {"role": "VF" if phys_fn else role},
            "attributes": {"test": self.test_id, **(attributes or {})},
        }
        if phys_fn:
            status["sriov"]["physFn"] = phys_fn
        if group is not None:
            status["iommuGroup"] = group
            status["iommuGroupPeers"] = peers or []
        if physnet:
            status["physicalNetwork"] = physnet
        if netdev:
            status["netdev"] = netdev
        if root:
            status["pcieRoot"] = root
        self.custom.patch_cluster_custom_object_status(
            c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name, {"status": status}
        )
        return name

    def flavor(self, name: str, device_type: str = "gpu", **spec: Any) -> str:
        full = f"{name}-{self.test_id}"
        selector = spec.pop("selector", {"vendorIDs": ["10de"], "productIDs": ["20b0"]})
        selector.setdefault("attributes", {"matchLabels": {"test": self.test_id}})
        body = {
            "apiVersion": c.API_VERSION,
            "kind": "PciFlavor",
            "metadata": {"name": full, "labels": {TEST_LABEL: self.test_id}},
            "spec": {"deviceType": device_type, "selector": selector, **spec},
        }
        self.custom.create_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIFLAVOR, body)
        return full

    def vm(
        self,
        name: str,
        devices: list[dict[str, Any]] | None = None,
        networks: list[dict[str, Any]] | None = None,
        namespace: str | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        body = {
            "apiVersion": c.API_VERSION,
            "kind": "PassthroughVM",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.test_id}},
            "spec": {"memory": "1Gi", "devices": devices or [], "networks": networks or [], **spec},
        }
        return dict(
            self.custom.create_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace or self.namespace, c.PLURAL_PASSTHROUGHVM, body
            )
        )

    def get_vm(self, name: str, namespace: str | None = None) -> PassthroughVM:
        return PassthroughVM.model_validate(
            self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace or self.namespace, c.PLURAL_PASSTHROUGHVM, name
            )
        )

    def vms(self, namespace: str | None = None) -> list[PassthroughVM]:
        got = self.custom.list_namespaced_custom_object(
            c.GROUP,
            c.VERSION,
            namespace or self.namespace,
            c.PLURAL_PASSTHROUGHVM,
            label_selector=f"{TEST_LABEL}={self.test_id}",
        )
        return [PassthroughVM.model_validate(x) for x in got["items"]]

    def devices(self) -> list[PciDevice]:
        got = self.custom.list_cluster_custom_object(
            c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, label_selector=f"{TEST_LABEL}={self.test_id}"
        )
        return [PciDevice.model_validate(x) for x in got["items"]]

    def get_device(self, name: str) -> PciDevice:
        return PciDevice.model_validate(
            self.custom.get_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL_PCIDEVICE, name)
        )

    def domain_gone(self, name: str, namespace: str | None = None) -> None:
        """What the node plugin reports once the VM's domain is removed from its node."""
        vm = self.get_vm(name, namespace)
        conds = [x.to_dict() for x in vm.status.conditions if x.type != c.COND_DOMAIN_GONE]
        conds.append(
            {
                "type": c.COND_DOMAIN_GONE,
                "status": "True",
                "reason": "DomainRemoved",
                "message": "test",
                "lastTransitionTime": iso_now()[:19] + "Z",
            }
        )
        self.custom.patch_namespaced_custom_object_status(
            c.GROUP,
            c.VERSION,
            namespace or self.namespace,
            c.PLURAL_PASSTHROUGHVM,
            name,
            {"status": {"conditions": conds}},
        )

    def delete_vm(self, name: str, namespace: str | None = None, domain_gone: bool = True) -> None:
        self.custom.delete_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace or self.namespace, c.PLURAL_PASSTHROUGHVM, name
        )
        if domain_gone:
            try:
                self.domain_gone(name, namespace)
            except client.ApiException as e:
                if e.status != 404:
                    raise

    def cleanup(self, namespaces: Iterable[str] = ()) -> None:
        """Remove everything this test made, finalizers included, so no later controller sees it."""
        sel = f"{TEST_LABEL}={self.test_id}"
        for ns in {self.namespace, *namespaces}:
            items = self.custom.list_namespaced_custom_object(
                c.GROUP, c.VERSION, ns, c.PLURAL_PASSTHROUGHVM, label_selector=sel
            )["items"]
            for vm in items:
                name = vm["metadata"]["name"]
                try:
                    self.custom.patch_namespaced_custom_object(
                        c.GROUP,
                        c.VERSION,
                        ns,
                        c.PLURAL_PASSTHROUGHVM,
                        name,
                        {"metadata": {"finalizers": []}},
                    )
                    self.custom.delete_namespaced_custom_object(
                        c.GROUP, c.VERSION, ns, c.PLURAL_PASSTHROUGHVM, name
                    )
                except client.ApiException as e:
                    if e.status != 404:
                        raise
        for plural in (c.PLURAL_PCIDEVICE, c.PLURAL_PCIFLAVOR):
            self.custom.delete_collection_cluster_custom_object(
                c.GROUP, c.VERSION, plural, label_selector=sel
            )


def check_invariants(world: World) -> dict[str, int]:
    """No device doubly owned, no VM listing a device not claimed for it, no claim whose VM is
    gone or does not list the device (a VM lists what it holds, is detaching, and what a live
    migration claimed on its target). Returns counts."""
    devices = {d.metadata.name: d for d in world.devices()}
    vms = world.vms()
    by_uid = {vm.metadata.uid: vm for vm in vms}
    listed: Counter[str] = Counter()
    problems = []
    for vm in vms:
        names = sorted(listed_devices(vm))
        listed.update(names)
        for n in names:
            ref = devices[n].spec.claim_ref if n in devices else None
            if ref is None or ref.uid != vm.metadata.uid:
                problems.append(
                    f"{vm.metadata.name} lists {n}, claimed by {ref.name if ref else 'nobody'}"
                )
    for n, k in listed.items():
        if k > 1:
            problems.append(f"{n} is listed by {k} VMs")
    leaked = 0
    for d in devices.values():
        ref = d.spec.claim_ref
        if ref is None:
            continue
        vm = by_uid.get(ref.uid)
        names = set() if vm is None else listed_devices(vm)
        if d.metadata.name not in names:
            leaked += 1
            problems.append(
                f"{d.metadata.name} is claimed by {ref.namespace}/{ref.name}, not listed there"
            )
    assert not problems, "\n".join(problems)
    bound = sum(1 for vm in vms if vm.status.node_name)
    return {
        "bound": bound,
        "pending": len(vms) - bound,
        "claimed": sum(1 for d in devices.values() if d.spec.claim_ref),
    }
