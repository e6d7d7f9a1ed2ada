"""Fixtures for tests against the real control plane.

One etcd + kube-apiserver per test session (or the current kubeconfig's cluster when
USE_EXISTING_CLUSTER=1), pcipt's CRDs applied from crds/, and a fresh namespace per test.
A cluster that cannot start, or missing CRDs, fail the tests loudly: nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from pcipt.devcluster import LocalCluster, binaries
from pcipt.devcluster.crds import apply_crds
from tests.integration.ctlfix import OPERATOR_NS, LeaseKeeper, World


@dataclass
class KubeCluster:
    kubeconfig: Path
    kubectl_path: str
    api: client.ApiClient

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        proc = subprocess.run(
            [self.kubectl_path, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    if os.environ.get("USE_EXISTING_CLUSTER") == "1":
        kubeconfig = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")))
        kubectl_path = shutil.which("kubectl") or str(binaries.ensure().kubectl)
        api = config.new_client_from_config(str(kubeconfig))
        apply_crds(api)
        yield KubeCluster(kubeconfig, kubectl_path, api)
        return
    cluster = LocalCluster(tmp_path_factory.mktemp("devcluster"))
    cluster.up()
    try:
        api = config.new_client_from_config(str(cluster.kubeconfig))
        apply_crds(api)
        yield KubeCluster(cluster.kubeconfig, str(binaries.ensure().kubectl), api)
    finally:
        cluster.down()


@pytest.fixture
def namespace(kube: KubeCluster) -> Iterator[str]:
    """A fresh namespace for one test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    # Without kube-controller-manager a deleted namespace stays Terminating; that is harmless.
    core.delete_namespace(name)


@pytest.fixture
def custom(kube: KubeCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names for cluster-scoped objects, so tests never collide."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the controller's tests: the operator namespace, a test's objects, node Leases ----------


@pytest.fixture(scope="session")
def operator_namespace(kube: KubeCluster) -> str:
    """The operator's namespace (node Leases live there), created once."""
    try:
        client.CoreV1Api(kube.api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=OPERATOR_NS))
        )
    except client.ApiException as e:
        if e.status != 409:
            raise
    return OPERATOR_NS


@pytest.fixture
def world(kube: KubeCluster, namespace: str, operator_namespace: str) -> Iterator[World]:
    """The cluster-scoped objects of one test (devices, flavors) and its VMs, cleaned up after."""
    w = World(kube.api, namespace)
    yield w
    w.cleanup()


@pytest.fixture
def leases(kube: KubeCluster, operator_namespace: str) -> Iterator[Callable[..., LeaseKeeper]]:
    """Start renewing nodes' Leases as their plugins would; stopped (and deleted) after."""
    keepers: list[LeaseKeeper] = []

    def start(*nodes: str, compute: str | None = None) -> LeaseKeeper:
        k = LeaseKeeper(kube.api, nodes, compute).start()
        keepers.append(k)
        return k

    yield start
    for k in keepers:
        k.stop()
