"""Binary lookup for the local control plane: explicit folder, PATH (version-checked), cache.

The real build from the Go module proxy runs whenever the cache is empty (first `make test` on
a fresh machine); here fake binaries stand in to pin down the lookup rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcipt.devcluster import binaries

KUBE_MOD = """module k8s.io/kubernetes

go 1.26.0

require k8s.io/api v0.0.0

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/x/y => github.com/x/y v1.0.0
)
"""


def _fake(folder: Path, name: str, output: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # Shell builtins only: the tests run these with PATH pointing at a folder of fakes.
    lines = "".join(f"echo '{line}'\n" for line in output.splitlines())
    path.write_text(f"#!/bin/sh\n{lines}")
    path.chmod(0o755)
    return path


def _fake_set(
    folder: Path, *, etcd: str = "3.6.16", k8s: str = "v1.37.2", kubectl: str = "v1.37.2"
) -> None:
    _fake(folder, "etcd", f"etcd Version: {etcd}\nGit SHA: x")
    _fake(folder, "kube-apiserver", f"Kubernetes {k8s}")
    _fake(folder, "kubectl", f'{{"clientVersion": {{"gitVersion": "{kubectl}"}}}}')


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in binaries.ASSET_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PCIPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    (tmp_path / "path").mkdir()
    return tmp_path


def test_staging_replacements_point_at_published_modules() -> None:
    lines = binaries.staging_replacements(KUBE_MOD, "v0.37.2")
    assert lines == [
        "\tk8s.io/api => k8s.io/api v0.37.2",
        "\tk8s.io/client-go => k8s.io/client-go v0.37.2",
    ]


def test_explicit_asset_folder_wins(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_set(isolated / "assets")
    _fake_set(isolated / "path")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(isolated / "assets"))
    assert binaries.find("kube-apiserver") == isolated / "assets" / "kube-apiserver"


def test_explicit_asset_folder_missing_a_binary_says_so(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(isolated / "assets", "etcd", "etcd Version: 3.6.16")
    monkeypatch.setenv("PCIPT_ASSETS", str(isolated / "assets"))
    with pytest.raises(binaries.BinaryError, match=r"PCIPT_ASSETS=.* has no executable kubectl"):
        binaries.find("kubectl")


def test_path_binaries_of_supported_versions_are_used(isolated: Path) -> None:
    _fake_set(isolated / "path", kubectl="v1.36.0")
    found = binaries.ensure()
    assert found.kubectl == isolated / "path" / "kubectl"
    assert found.etcd == isolated / "path" / "etcd"


def test_path_binaries_that_are_too_old_fall_through_to_the_cache(isolated: Path) -> None:
    _fake_set(isolated / "path", etcd="3.4.23", kubectl="v1.32.4-dispatcher", k8s="v1.30.0")
    _fake_set(binaries.bin_cache_dir())
    logged: list[str] = []
    found = binaries.ensure(logged.append)
    assert found.etcd == binaries.bin_cache_dir() / "etcd"
    assert found.kubectl == binaries.bin_cache_dir() / "kubectl"
    assert any("etcd 3.4.23 is older than 3.5.13" in m for m in logged)
    assert any("kubectl 1.32 is more than one minor version" in m for m in logged)
    assert any("kube-apiserver 1.30 is older than 1.33" in m for m in logged)


def test_missing_binaries_without_go_explain_what_to_do(isolated: Path) -> None:
    with pytest.raises(binaries.BinaryError, match=r"no Go toolchain to build it.*PCIPT_ASSETS"):
        binaries.ensure()


def test_cache_folder_is_per_kubernetes_version(isolated: Path) -> None:
    assert binaries.bin_cache_dir() == isolated / "cache" / "bin" / binaries.KUBERNETES_VERSION


def test_free_ports_lie_outside_the_ephemeral_range() -> None:
    from pcipt.devcluster.cluster import ephemeral_range, free_ports

    lo, hi = ephemeral_range()
    ports = free_ports(50)
    assert len(set(ports)) == 50
    assert all(not lo <= p <= hi and p >= 10000 for p in ports)
