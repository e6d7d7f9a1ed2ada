"""The container image, built from the Containerfile with buildah (vfs storage, chroot
isolation) on a Debian base made here with debootstrap, as hack/build-image.sh does: its entry
points run, as the unprivileged user, with libvirt's client library, and the node plugin's
discovery inside the image reads a fake sysfs as it does outside."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcipt.devcluster.images import PCIPT_IMAGE, build_pcipt, storage_flags
from tests.conftest import REPO_ROOT

# Slow by nature: builds the image on first use.
pytestmark = pytest.mark.timeout(1500)

TAG = PCIPT_IMAGE


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["buildah", *storage_flags(), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    # hack/build-image.sh, once per test run: the real-pod tier runs the same image.
    build_pcipt(lambda msg: print(msg, file=sys.stderr))
    ctr = buildah("from", "-q", TAG).stdout.strip()
    try:
        yield ctr
    finally:
        buildah("rm", ctr, check=False)


def run_in(
    ctr: str, *argv: str, volumes: dict[Path, str] | None = None
) -> subprocess.CompletedProcess[str]:
    vols = [
        a for host, inside in (volumes or {}).items() for a in ("--volume", f"{host}:{inside}:ro")
    ]
    return buildah("run", "--isolation", "chroot", *vols, ctr, "--", *argv, check=False)


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["pcipt-controller", "run", "--help"], "--leader-elect"),
        (["pcipt-nodeplugin", "run", "--help"], "--libvirt-uri"),
        (["kubectl-pcipt", "--help"], "inventory"),
    ],
)
def test_entry_points_run(container: str, argv: list[str], text: str) -> None:
    out = run_in(container, *argv)
    assert out.returncode == 0, out.stderr
    assert text in out.stdout


def test_it_runs_unprivileged_with_libvirts_client_library(container: str) -> None:
    out = run_in(container, "id", "-u")
    assert out.stdout.strip() == "65532"
    out = run_in(container, "python3", "-c", "import libvirt; print(libvirt.getVersion())")
    assert out.returncode == 0 and int(out.stdout) >= 9_000_000, out.stderr  # libvirt 9.0 or newer
    out = run_in(container, "lspci", "--version")
    assert out.returncode == 0 and "lspci" in out.stdout
    # The node plugin's tools for VFs: `ip link` (VF settings), nvme-cli (NVMe VF resources).
    for tool in (["ip", "-V"], ["nvme", "version"]):
        out = run_in(container, *tool)
        assert out.returncode == 0, (tool, out.stderr)


def test_discover_in_the_image_reads_a_fake_sysfs_as_outside(
    container: str, tmp_path: Path
) -> None:
    host_root = tmp_path / "sys"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nodeplugin",
            "simulate-host",
            "--profile",
            str(REPO_ROOT / "demo" / "hardware.yaml"),
            "--host",
            "node-a",
            "--root",
            str(host_root),
        ],
        check=True,
        capture_output=True,
        cwd=REPO_ROOT,
    )
    config = REPO_ROOT / "demo" / "node-config.yaml"
    args = ["discover", "--node-name", "node-a", "-o", "json"]
    inside = run_in(
        container,
        "pcipt-nodeplugin",
        *args,
        "--sysfs-root",
        "/host/sys",
        "--config",
        "/host/node-config.yaml",
        volumes={host_root: "/host/sys", config: "/host/node-config.yaml"},
    )
    assert inside.returncode == 0, inside.stderr
    outside = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodeplugin",
            *args,
            "--sysfs-root",
            str(host_root),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    got, want = json.loads(inside.stdout), json.loads(outside.stdout)
    assert len(got["items"]) == len(want["items"]) >= 3
    assert got == want


def test_image_size_is_reported(container: str) -> None:
    size = buildah("images", "--format", "{{.Size}}", TAG).stdout.strip().splitlines()[0]
    print(f"image {TAG}: {size}", file=sys.stderr)
    value, unit = size.split()
    assert unit == "MB" and float(value) < 600, f"the image grew to {size}"
