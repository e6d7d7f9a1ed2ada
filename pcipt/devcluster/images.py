"""Images for the local node, made here since no registry can be reached: the pods' pause image
(a static binary FROM scratch) and pcipt's own (hack/build-image.sh), each exported from
buildah's storage as an archive that the node's containerd imports.

Both use hack/build-image.sh's storage (vfs in ~/.cache/pcipt/image, or PCIPT_IMAGE_ROOT and
PCIPT_IMAGE_RUNROOT), so the image the chart's tests build is the one the node runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from pcipt.devcluster import binaries

REPO = Path(__file__).resolve().parent.parent.parent
PAUSE_SOURCE = REPO / "hack" / "pause.c"
PCIPT_IMAGE = "localhost/pcipt:dev"

Log = Callable[[str], None]


class ImageError(RuntimeError):
    """An image could not be built or exported; the message carries the tool's own words."""


def image_dir() -> Path:
    return binaries.cache_root() / "image"


def storage_flags() -> list[str]:
    """buildah's flags for hack/build-image.sh's storage."""
    root = os.environ.get("PCIPT_IMAGE_ROOT", str(image_dir() / "storage"))
    runroot = os.environ.get("PCIPT_IMAGE_RUNROOT", str(image_dir() / "run"))
    return ["--storage-driver", "vfs", "--root", root, "--runroot", runroot]


def _run(cmd: list[str], *, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ImageError(f"`{' '.join(cmd[:4])} ...` failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def buildah(*args: str) -> str:
    return _run(["buildah", *storage_flags(), *args])


def export(tag: str, archive: Path) -> Path:
    """Write the image `tag` as a docker-archive that keeps its name."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    tmp.unlink(missing_ok=True)
    buildah("push", "--quiet", tag, f"docker-archive:{tmp}:{tag}")
    tmp.replace(archive)
    return archive


def pause_archive(tag: str, log: Log) -> Path:
    """The pause image's archive, rebuilt only when hack/pause.c changes."""
    digest = hashlib.sha256(PAUSE_SOURCE.read_bytes()).hexdigest()[:12]
    archive = image_dir() / f"pause-{digest}.tar"
    if archive.exists():
        return archive
    log(f"devcluster: building the pause image {tag}")
    with tempfile.TemporaryDirectory(prefix="pcipt-pause-") as tmp:
        binary = Path(tmp) / "pause"
        _run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(PAUSE_SOURCE)])
        ctr = buildah("from", "scratch").strip()
        try:
            buildah("copy", ctr, str(binary), "/pause")
            buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr)
            buildah("commit", "--quiet", ctr, tag)
        finally:
            subprocess.run(
                ["buildah", *storage_flags(), "rm", ctr], capture_output=True, check=False
            )
    return export(tag, archive)


_built_here: set[str] = set()


def build_pcipt(log: Log) -> str:
    """Build pcipt's image from this tree with hack/build-image.sh, once per process (the image
    test and the real-pod tier share it); returns its tag."""
    if PCIPT_IMAGE not in _built_here:
        log(f"devcluster: building the pcipt image {PCIPT_IMAGE} (hack/build-image.sh)")
        _run([str(REPO / "hack" / "build-image.sh"), PCIPT_IMAGE])
        _built_here.add(PCIPT_IMAGE)
    return PCIPT_IMAGE


_exported: dict[str, Path] = {}


def pcipt_archive(tag: str, log: Log) -> Path:
    """pcipt's image (build_pcipt), exported under `tag` (another name for the same image),
    once per process and tag."""
    build_pcipt(log)
    if tag not in _built_here:
        buildah("tag", PCIPT_IMAGE, tag)
        _built_here.add(tag)
    if tag not in _exported:
        name = "pcipt-image-" + hashlib.sha256(tag.encode()).hexdigest()[:8] + ".tar"
        _exported[tag] = export(tag, image_dir() / name)
    return _exported[tag]
