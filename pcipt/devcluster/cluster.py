"""A real Kubernetes control plane on loopback: etcd and kube-apiserver, no kubelet.

This is what integration tests, benchmarks and the demo run against (envtest-style). Both
servers listen on 127.0.0.1 on free ports, with freshly generated certificates and an admin
kubeconfig. `up` leaves them running in the background until `down`; the state folder records
their process IDs, ports and logs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from pcipt.devcluster import binaries, certs

Log = Callable[[str], None]
CONTEXT_NAME = "pcipt-devcluster"


class ClusterError(RuntimeError):
    """The control plane did not come up; the message carries the servers' last log lines."""


S = TypeVar("S")


@dataclass
class ClusterState:
    state_dir: str
    kubeconfig: str
    server: str
    etcd_pid: int
    apiserver_pid: int
    etcd_url: str
    kubernetes_version: str
    started_at: float
    apiserver_cmd: list[str] | None = None


def read_state(path: Path, kind: type[S]) -> S | None:
    """A state file written with asdict(), as its dataclass; None when missing or unreadable
    (a crash mid-write, or a file from another version)."""
    try:
        return kind(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Ports are chosen from here up to the start of the kernel's ephemeral range.
PORT_FLOOR = 10000
_ADDRESS_IN_USE = "address already in use"


class PortTakenError(ClusterError):
    """A server could not bind the port chosen for it; up() retries with other ports."""


def ephemeral_range() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' source ports from (ip_local_port_range)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return lo, hi


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no outgoing connection can take first.

    Port 0 lets the kernel choose from its ephemeral range, the same range it takes source ports
    of outgoing connections from: the API server's own connections to etcd could take the port
    between this choice and the server's bind. Ports are therefore chosen outside that range.
    A port another program binds meanwhile is still possible; up() retries on EADDRINUSE.
    """
    lo, hi = ephemeral_range()
    pools = [r for r in (range(PORT_FLOOR, lo), range(hi + 1, 65536)) if len(r) > 1000]
    if not pools:
        raise ClusterError(f"no ports outside the ephemeral range {lo}-{hi} to listen on")
    for _ in range(500):
        pool = random.choice(pools)
        port = random.randrange(pool.start, pool.stop)
        if _bindable(port):
            return port
    raise ClusterError(f"no free port found outside the ephemeral range {lo}-{hi}")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports from free_port()."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def _alive(pid: int, expect: str) -> bool:
    """Whether pid is still the process we started (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return expect.encode() in cmdline


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def apiserver_ready(server: str, pki_dir: Path) -> bool:
    """Whether the API server at `server` answers /readyz to the admin of the PKI in pki_dir."""
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
    try:
        with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def write_kubeconfig(path: Path, server: str, pki: certs.Pki) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT_NAME,
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": "pcipt-admin",
                "user": {
                    "client-certificate-data": b64(pki.admin_cert),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": "pcipt-admin"}}
        ],
        "current-context": CONTEXT_NAME,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def etcd_command(
    etcd: Path, data_dir: Path, client_url: str, peer_url: str, *, fsync: bool
) -> list[str]:
    """One etcd member serving `client_url`."""
    cmd = [
        str(etcd),
        "--name=pcipt",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=pcipt={peer_url}",
        "--listen-metrics-urls=",
        "--log-level=warn",
        "--quota-backend-bytes=8589934592",
    ]
    if not fsync:
        # Like Kubernetes' own integration tests: durability is not what is under test.
        cmd.append("--unsafe-no-fsync")
    return cmd


def apiserver_command(
    apiserver: Path,
    pki: certs.Pki,
    cert_dir: Path,
    *,
    etcd_url: str,
    bind: str,
    port: int,
    issuer: str,
    advertise: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """kube-apiserver with RBAC, the PKI's certificates and service-account keys."""
    return [
        str(apiserver),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={bind}",
        f"--advertise-address={advertise or bind}",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-issuer={issuer}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        "--max-requests-inflight=800",
        "--max-mutating-requests-inflight=400",
        "--v=1",
        *(extra or []),
    ]


class LocalCluster:
    """etcd + kube-apiserver in `state_dir`. Safe to construct for a cluster that already runs."""

    def __init__(
        self,
        state_dir: Path,
        *,
        fsync: bool = False,
        log: Log = _stderr,
        extra_names: Sequence[str] = (),
    ) -> None:
        self.state_dir = state_dir
        self.extra_names = tuple(extra_names)
        """More names or addresses the API server's certificate carries (a lab host's)."""
        self.fsync = fsync
        self.log = log
        # Processes this object started, by name: poll() is the reliable liveness test for them
        # (right after exec, /proc/<pid>/cmdline can still show the parent's command line).
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def state(self) -> ClusterState | None:
        return read_state(self.state_file, ClusterState)

    def is_running(self) -> bool:
        st = self.state()
        return (
            st is not None
            and _alive(st.etcd_pid, "etcd")
            and _alive(st.apiserver_pid, "kube-apiserver")
            and self._ready()
        )

    def _ready(self) -> bool:
        st = self.state()
        return st is not None and apiserver_ready(st.server, self.state_dir / "pki")

    def up(self, timeout: float = 120.0) -> ClusterState:
        """Start the control plane (or return the running one) and wait until it is ready."""
        if self.is_running():
            st = self.state()
            assert st is not None
            return st
        if self.state_file.exists():
            self.down()
        bins = binaries.ensure(self.log)
        for attempt in range(1, 4):
            try:
                return self._start(bins, timeout)
            except PortTakenError as e:
                self.log(f"devcluster: {e}; starting again on other ports (attempt {attempt})")
        raise ClusterError("every port chosen was taken by another program, three times over")

    def _start(self, bins: binaries.Binaries, timeout: float) -> ClusterState:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for old_log in self.state_dir.glob("*.log"):
            old_log.unlink()  # a retry must not read the last attempt's bind error
        pki = certs.generate(self.state_dir / "pki", extra_names=self.extra_names)
        etcd_port, peer_port, api_port = free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        server = f"https://127.0.0.1:{api_port}"
        etcd_cmd = etcd_command(
            bins.etcd,
            self.state_dir / "etcd",
            etcd_url,
            f"http://127.0.0.1:{peer_port}",
            fsync=self.fsync,
        )
        apiserver_cmd = apiserver_command(
            bins.kube_apiserver,
            pki,
            self.state_dir / "pki",
            etcd_url=etcd_url,
            bind="127.0.0.1",
            port=api_port,
            issuer=server,
            extra=["--endpoint-reconciler-type=none"],
        )
        etcd_pid = self._spawn("etcd", etcd_cmd)
        apiserver_pid = self._spawn("kube-apiserver", apiserver_cmd)
        write_kubeconfig(self.kubeconfig, server, pki)
        st = ClusterState(
            state_dir=str(self.state_dir),
            kubeconfig=str(self.kubeconfig),
            server=server,
            etcd_pid=etcd_pid,
            apiserver_pid=apiserver_pid,
            etcd_url=etcd_url,
            kubernetes_version=binaries.KUBERNETES_VERSION,
            started_at=time.time(),
            apiserver_cmd=apiserver_cmd,
        )
        self.state_file.write_text(json.dumps(asdict(st), indent=2))
        self._wait_ready(st, timeout)
        return st

    def _spawn(self, name: str, cmd: list[str]) -> int:
        with open(self.state_dir / f"{name}.log", "ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        self._procs[name] = proc
        return proc.pid

    def _wait_ready(self, st: ClusterState, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if (code := proc.poll()) is not None:
                    if _ADDRESS_IN_USE in _tail(self.state_dir / f"{name}.log", 200).lower():
                        self.down(keep_logs=True)
                        raise PortTakenError(f"{name} found its port taken")
                    self._fail(f"{name} exited during start-up with status {code}", f"{name}.log")
            if self._ready():
                return
            time.sleep(0.2)
        self._fail(f"kube-apiserver was not ready within {timeout:.0f}s", "kube-apiserver.log")

    def _fail(self, what: str, log_name: str) -> None:
        tail = _tail(self.state_dir / log_name)
        self.down(keep_logs=True)
        raise ClusterError(f"{what}. Last lines of {self.state_dir / log_name}:\n{tail}")

    def down(self, *, keep_logs: bool = False) -> None:
        """Stop both servers and delete the state (data, certificates, kubeconfig)."""
        st = self.state()
        if st is not None:
            for pid, name in ((st.apiserver_pid, "kube-apiserver"), (st.etcd_pid, "etcd")):
                _stop(pid, name)
        for proc in self._procs.values():
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._procs.clear()
        if keep_logs:
            for child in self.state_dir.iterdir() if self.state_dir.exists() else []:
                if child.suffix != ".log":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def stop_apiserver(self) -> None:
        """Take the API server away (etcd keeps running), as an outage would."""
        st = self.state()
        assert st is not None, "not running"
        _stop(st.apiserver_pid, "kube-apiserver")
        proc = self._procs.pop("kube-apiserver", None)
        if proc is not None:
            proc.wait()

    def start_apiserver(self, timeout: float = 120.0) -> None:
        """Bring the API server back on the same port, with the same certificates."""
        st = self.state()
        assert st is not None and st.apiserver_cmd, "not running"
        st.apiserver_pid = self._spawn("kube-apiserver", st.apiserver_cmd)
        self.state_file.write_text(json.dumps(asdict(st), indent=2))
        self._wait_ready(st, timeout)

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}


def _stop(pid: int, name: str, grace: float = 10.0) -> None:
    if not _alive(pid, name):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid, name):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    # Reap it if it is our own child (the pytest fixture starts it in-process).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
