"""`python -m pcipt.devcluster`: up, status, env, kubeconfig and down on a second, private
control plane; and the test fixtures' USE_EXISTING_CLUSTER path pointed at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pcipt.devcluster import binaries
from pcipt.devcluster.cluster import ClusterState, _alive
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
