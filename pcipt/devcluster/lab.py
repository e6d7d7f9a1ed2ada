"""A whole pcipt installation on one machine: the local control plane, the controller, and a
node plugin per simulated host (a fake sysfs tree from a hardware profile, libvirt's test
driver) — each a real process. `make demo` and the end-to-end test run on it.

It starts the components as programs (`python -m controller`, `python -m nodeplugin`); it does
not import them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes import config as k8s_config

from pcipt import constants as c
from pcipt.devcluster import binaries
from pcipt.devcluster.cluster import LocalCluster, free_port
from pcipt.devcluster.crds import apply_crds

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass
class Lab:
    workdir: Path
    profile: Path
    config: Path
    hosts: list[str] = field(default_factory=list)
    """Hosts of the profile to run (default: all)."""
    controller_args: list[str] = field(default_factory=list)
    plugin_args: list[str] = field(default_factory=list)
    cluster: LocalCluster | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kubectl_path: str = ""
    metrics_ports: dict[str, int] = field(default_factory=dict)
    """Where each process serves /metrics (on 127.0.0.1)."""
    install_crds: bool = True
    """Apply crds/ at start; off when something else (helm) owns them."""
    namespace: str = c.DEFAULT_NAMESPACE
    """The operator namespace both components are told (node Leases)."""
    kubeconfigs: dict[str, Path] = field(default_factory=dict)
    """Per process ("controller", "node-<host>"): a kubeconfig other than the admin's, e.g.
    a ServiceAccount token's, to run a component with exactly the chart's RBAC."""

    @property
    def kubeconfig(self) -> Path:
        assert self.cluster is not None
        return self.cluster.kubeconfig

    def host_root(self, host: str) -> Path:
        return self.workdir / "hosts" / host / "sys"

    def state_dir(self, host: str) -> Path:
        return self.workdir / "hosts" / host / "state"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def start(self, cluster: LocalCluster | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.cluster = cluster or LocalCluster(self.workdir / "control-plane")
        self.cluster.up()
        self.kubectl_path = str(binaries.ensure().kubectl)
        api = k8s_config.new_client_from_config(str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
        if self.install_crds:
            apply_crds(api)
        core = client.CoreV1Api(api)
        try:
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
            )
        except client.ApiException as e:
            if e.status != 409:
                raise
        if not self.hosts:
            self.hosts = list((yaml.safe_load(self.profile.read_text()) or {}).get("hosts", {}))
        self.metrics_ports = {"controller": free_port()}
        self.spawn(
            "controller",
            [
                sys.executable,
                "-m",
                "controller",
                "run",
                "--namespace",
                self.namespace,
                "--metrics-port",
                str(self.metrics_ports["controller"]),
                *self.controller_args,
            ],
        )
        for host in self.hosts:
            root = self.host_root(host)
            if not root.exists():
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "nodeplugin",
                        "simulate-host",
                        "--profile",
                        str(self.profile),
                        "--host",
                        host,
                        "--root",
                        str(root),
                    ],
                    check=True,
                    capture_output=True,
                    cwd=REPO,
                )
            self.spawn(
                f"node-{host}",
                [
                    sys.executable,
                    "-m",
                    "nodeplugin",
                    "run",
                    "--simulate",
                    "--namespace",
                    self.namespace,
                    "--node-name",
                    host,
                    "--metrics-port",
                    str(self.metrics_ports.setdefault(host, free_port())),
                    "--sysfs-root",
                    str(root),
                    "--config",
                    str(self.config),
                    "--libvirt-uri",
                    "test:///default",
                    "--state-dir",
                    str(self.state_dir(host)),
                    *self.plugin_args,
                ],
            )

    def spawn(self, name: str, argv: list[str]) -> None:
        kubeconfig = self.kubeconfigs.get(name, self.kubeconfig)
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        with open(self.log(name), "ab") as fh:
            self.procs[name] = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_path, *args],
            capture_output=True,
            text=True,
            input=input,
            check=False,
            env=dict(os.environ, KUBECONFIG=str(self.kubeconfig)),
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def alive(self) -> dict[str, bool]:
        return {n: p.poll() is None for n, p in self.procs.items()}

    def wait_for(self, jsonpath: str, want: str, *args: str, timeout: float = 60.0) -> str:
        """Poll `kubectl get ... -o jsonpath=` until it prints `want`."""
        deadline = time.monotonic() + timeout
        got = ""
        while time.monotonic() < deadline:
            for name, ok in self.alive().items():
                if not ok:
                    raise RuntimeError(f"{name} exited; see {self.log(name)}")
            got = self.kubectl("get", *args, "-o", f"jsonpath={jsonpath}", check=False).stdout
            if got == want:
                return got
            time.sleep(0.2)
        raise TimeoutError(
            f"kubectl get {' '.join(args)} {jsonpath}: {got!r}, not {want!r}, after {timeout}s"
        )

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        if self.cluster is not None:
            self.cluster.down()
