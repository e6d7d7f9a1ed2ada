"""`python -m pcipt.devcluster`: up, status, env, kubeconfig and down on a second, private
control plane; the test fixtures' USE_EXISTING_CLUSTER path pointed at it; ports that cannot
collide."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pcipt.devcluster import LocalCluster, binaries
from pcipt.devcluster import cluster as cluster_module
from pcipt.devcluster.cluster import ClusterState, _alive, ephemeral_range
from tests.conftest import REPO_ROOT


def _devcluster(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pcipt.devcluster", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        check=False,
    )


def test_up_env_kubeconfig_status_down(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    up = _devcluster(state, "up", "--crds")
    assert up.returncode == 0, up.stderr
    assert "control plane ready at https://127.0.0.1:" in up.stdout
    assert "crd/passthroughvms.pcipt.io established" in up.stdout
    try:
        st = ClusterState(**json.loads((state / "state.json").read_text()))
        assert st.server.startswith("https://127.0.0.1:") and st.etcd_url.startswith(
            "http://127.0.0.1:"
        )

        again = _devcluster(state, "up")  # idempotent: the running one is reported, not replaced
        assert again.returncode == 0 and st.server in again.stdout

        kubeconfig = _devcluster(state, "kubeconfig").stdout.strip()
        assert kubeconfig == str(state / "kubeconfig")
        env = _devcluster(state, "env").stdout.strip()
        assert env == f"export KUBECONFIG={kubeconfig}"
        assert _devcluster(state, "status").returncode == 0

        kubectl = str(binaries.ensure().kubectl)
        ver = subprocess.run(
            [kubectl, "version", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, KUBECONFIG=kubeconfig),
        )
        assert json.loads(ver.stdout)["serverVersion"]["gitVersion"] == binaries.KUBERNETES_VERSION

        # The test fixtures run against an existing cluster when asked to.
        existing = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/integration/test_api.py::test_every_crd_is_established_with_names_and_status_subresource",
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            check=False,
            env=dict(os.environ, USE_EXISTING_CLUSTER="1", KUBECONFIG=kubeconfig),
        )
        assert existing.returncode == 0, existing.stdout + existing.stderr
        assert "1 passed" in existing.stdout
    finally:
        down = _devcluster(state, "down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not _alive(st.etcd_pid, "etcd") and not _alive(st.apiserver_pid, "kube-apiserver")
    assert _devcluster(state, "status").returncode == 1


def test_twenty_starts_in_a_row_never_collide_on_a_port(tmp_path: Path) -> None:
    """Each start picks ports outside the ephemeral range, where the control plane's own
    outgoing connections (kube-apiserver to etcd) cannot take them first."""
    lo, hi = ephemeral_range()
    logged: list[str] = []
    for i in range(20):
        cluster = LocalCluster(tmp_path / f"cp{i}", log=logged.append)
        st = cluster.up()
        try:
            for url in (st.server, st.etcd_url):
                port = int(url.rsplit(":", 1)[1])
                assert not lo <= port <= hi, f"{url} is in the ephemeral range {lo}-{hi}"
        finally:
            cluster.down()
        assert not _alive(st.apiserver_pid, "kube-apiserver") and not _alive(st.etcd_pid, "etcd")
    assert not [line for line in logged if "port" in line], logged


def test_a_port_taken_before_the_bind_is_retried_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real EADDRINUSE from a real kube-apiserver: the first attempt's API server port is
    held by another listener; up() notices the bind error and starts again elsewhere."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    real = cluster_module.free_ports
    calls: list[list[int]] = []

    def first_one_taken(count: int) -> list[int]:
        ports = real(count)
        if not calls:
            ports[-1] = taken  # etcd, peer, API server: the API server's is taken
        calls.append(ports)
        return ports

    monkeypatch.setattr(cluster_module, "free_ports", first_one_taken)
    logged: list[str] = []
    cluster = LocalCluster(tmp_path / "cp", log=logged.append)
    try:
        st = cluster.up()
        assert not st.server.endswith(f":{taken}")
        assert cluster.is_running()
    finally:
        cluster.down()
        holder.close()
    assert len(calls) == 2
    assert any("kube-apiserver found its port taken" in line for line in logged), logged
