"""pcipt's Kubernetes client against the real API server: the answers it turns into typed
errors (conflict, gone, invalid), its retries across an API server restart, and credentials
that expire (an exec plugin's token, refreshed on expiry and reloaded after a 401)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.config.kube_config import EXPIRY_SKEW_PREVENTION_DELAY

from pcipt.devcluster import LocalCluster, binaries
from pcipt.kubeclient import (
    Conflict,
    Invalid,
    KubeClient,
    NotFound,
    load_credentials,
    retry_transient,
)
from tests.integration.conftest import KubeCluster

pytestmark = pytest.mark.integration


def _cm(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def test_answers_become_typed_errors(kube: KubeCluster, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    async def scenario() -> None:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            first = await api.create(path, _cm("a", v="1"))
            with pytest.raises(Conflict):  # it exists
                await api.create(path, _cm("a", v="1"))
            await api.replace(f"{path}/a", {**first, "data": {"v": "2"}})
            with pytest.raises(Conflict):  # a stale resourceVersion
                await api.replace(f"{path}/a", {**first, "data": {"v": "3"}})
            with pytest.raises(Conflict):  # a stale precondition on a merge patch
                await api.patch(
                    f"{path}/a",
                    {"metadata": {"resourceVersion": first["metadata"]["resourceVersion"]}},
                )
            with pytest.raises(NotFound):
                await api.get(f"{path}/missing")
            with pytest.raises(Invalid) as bad:
                await api.create(path, _cm("Not_A_Name"))
            assert bad.value.status == 422 and "metadata.name" in bad.value.message
            assert (await api.get(f"{path}/a"))["data"] == {"v": "2"}

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of this module's own: its API server is stopped and started."""
    cluster = LocalCluster(tmp_path_factory.mktemp("client-cp"))
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def test_retries_ride_out_an_api_server_restart(private: LocalCluster) -> None:
    async def scenario() -> None:
        async with KubeClient(load_credentials(str(private.kubeconfig))) as api:
            await api.list("/api/v1/namespaces")
            await asyncio.to_thread(private.stop_apiserver)
            restart = asyncio.create_task(_start_later(private, 2.0))
            started = time.monotonic()
            got = await retry_transient(api.list, "/api/v1/namespaces", attempts=40)
            await restart
            assert got["items"] and time.monotonic() - started >= 2.0

    asyncio.run(scenario())


async def _start_later(cluster: LocalCluster, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(cluster.start_apiserver)


def test_an_exec_plugins_token_is_refreshed_on_expiry_and_reloaded_after_a_401(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    """A kubeconfig whose user is an exec plugin (as EKS, GKE and OIDC logins are): the plugin
    runs again when its token's expirationTimestamp passes, and after the API server refuses
    a token (its ServiceAccount deleted) the client reloads and carries on."""
    kubectl = str(binaries.ensure().kubectl)
    env = dict(os.environ, KUBECONFIG=str(kube.kubeconfig))

    def token_of(sa: str) -> str:
        subprocess.run(
            [kubectl, "create", "serviceaccount", sa, "-n", namespace], env=env, check=True
        )
        return subprocess.run(
            [kubectl, "create", "token", sa, "-n", namespace],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    token_file, runs, ttl = tmp_path / "token", tmp_path / "runs", tmp_path / "ttl"
    token_file.write_text(token_of("first"))
    # The kubeconfig loader treats a token as expired early (clock skew, 5 minutes today):
    # this much means valid for about 5 s.
    ttl.write_text(str(int(EXPIRY_SKEW_PREVENTION_DELAY.total_seconds()) + 5))
    plugin = tmp_path / "plugin.sh"
    # Each run counts itself and hands out the token in the file, valid for `ttl` seconds.
    plugin.write_text(
        "#!/bin/sh\n"
        f"echo run >> {runs}\n"
        f'exp=$(date -u -d "+$(cat {ttl}) seconds" +%Y-%m-%dT%H:%M:%SZ)\n'
        f'printf \'{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
        f'"status":{{"token":"%s","expirationTimestamp":"%s"}}}}\' "$(cat {token_file})" "$exp"\n'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [
            {
                "name": "exec",
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": str(plugin),
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": "exec", "context": {"cluster": cluster["name"], "user": "exec"}}],
        "current-context": "exec",
    }
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))

    def plugin_runs() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    async def scenario() -> None:
        async with KubeClient(load_credentials(str(kubeconfig))) as api:
            await api.get("/api")
            before = plugin_runs()
            await api.get("/api")
            assert plugin_runs() == before  # a valid token is reused
            await asyncio.sleep(6)
            await api.get("/api")
            assert plugin_runs() == before + 1  # expired: the plugin ran again

            # A token valid for an hour, then refused: only a 401 can tell.
            ttl.write_text("3600")
            await asyncio.sleep(6)
            await api.get("/api")
            before = plugin_runs()
            subprocess.run(
                [kubectl, "delete", "serviceaccount", "first", "-n", namespace],
                env=env,
                check=True,
            )
            token_file.write_text(token_of("second"))
            deadline = time.monotonic() + 30
            while plugin_runs() == before:  # the API server notices the deletion shortly
                assert time.monotonic() < deadline, "the old token was never refused"
                got = await api.get("/api")  # never raises: a 401 is answered by a reload
                assert got["kind"] == "APIVersions"
                await asyncio.sleep(0.2)
            assert plugin_runs() == before + 1
            assert (await api.get("/api"))["kind"] == "APIVersions"

    asyncio.run(scenario())
