"""Find, or build from the Go module proxy, the etcd, kube-apiserver and kubectl binaries.

Lookup order for each binary:
  1. a folder named by PCIPT_ASSETS (or KUBEBUILDER_ASSETS, which means the same);
  2. PATH, when the binary found there is a version pcipt supports;
  3. the cache, ~/.cache/pcipt/bin/<kubernetes version>/;
  4. otherwise it is built, once, into that cache with the machine's Go toolchain:
     kube-apiserver and kubectl from k8s.io/kubernetes (a throw-away module that requires it and
     replaces each staging module with its published version of the same release), etcd from
     go.etcd.io/etcd/server/v3. Debian's etcd-server (3.4) is too old for Kubernetes 1.34+.

The node components (kubelet, kube-controller-manager, kube-scheduler, kube-proxy), needed only
by the local node whose pods really run (`pcipt.devcluster.node`), are looked up the same way
(ensure_node) and built from the same k8s.io/kubernetes version, into the same cache folder.

helm, needed by the chart's tests only, is looked up the same way (ensure_helm) and built from
helm.sh/helm/v3 into ~/.cache/pcipt/bin/helm-<version>/ when missing.

This module runs programs (go, --version probes) but never downloads binaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KUBERNETES_VERSION: Final = "v1.37.2"
ETCD_VERSION: Final = "v3.6.16"
HELM_VERSION: Final = "v3.22.0"
# The oldest helm 3 whose JSON-schema validation and server-side apply the chart's tests use.
MIN_HELM: Final = (3, 18, 0)
# The oldest versions whose features the CRDs rely on (CEL quantity library, messageExpression)
# and that Kubernetes supports as its store.
MIN_APISERVER_MINOR: Final = 33
MIN_ETCD: Final = (3, 5, 13)

NAMES: Final = ("etcd", "kube-apiserver", "kubectl")
# Built from k8s.io/kubernetes like kube-apiserver; the local node's components.
NODE_NAMES: Final = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy")
ASSET_ENV_VARS: Final = ("PCIPT_ASSETS", "KUBEBUILDER_ASSETS")

Log = Callable[[str], None]


class BinaryError(RuntimeError):
    """A binary could not be found or built; the message says what to do."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kubectl: Path

    def as_dict(self) -> dict[str, str]:
        return {
            "etcd": str(self.etcd),
            "kube-apiserver": str(self.kube_apiserver),
            "kubectl": str(self.kubectl),
        }


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_root() -> Path:
    if env := os.environ.get("PCIPT_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pcipt"


def bin_cache_dir() -> Path:
    return cache_root() / "bin" / KUBERNETES_VERSION


# --- version probes -------------------------------------------------------------------------


def _run_version(path: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            [str(path), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<cannot run: {e}>"
    return out.stdout + out.stderr


def _semver(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def binary_version(name: str, path: Path) -> tuple[int, int, int] | None:
    if name == "kubectl":
        text = _run_version(path, "version", "--client", "-o", "json")
        with contextlib.suppress(ValueError, KeyError):
            return _semver(json.loads(text[text.index("{") :])["clientVersion"]["gitVersion"])
        return _semver(text)
    if name == "helm":
        return _semver(_run_version(path, "version", "--template", "{{.Version}}"))
    if name == "etcd":
        m = re.search(r"etcd Version:\s*(\S+)", _run_version(path, "--version"))
        return _semver(m.group(1)) if m else None
    return _semver(_run_version(path, "--version"))


def _why_unsupported(name: str, version: tuple[int, int, int] | None) -> str | None:
    """None when the version is usable, else the reason in words."""
    want = _semver(KUBERNETES_VERSION)
    assert want is not None
    if version is None:
        return "its version could not be read"
    if name == "etcd" and version < MIN_ETCD:
        return f"etcd {'.'.join(map(str, version))} is older than {'.'.join(map(str, MIN_ETCD))}"
    if name == "kube-apiserver" and version[:2] < (1, MIN_APISERVER_MINOR):
        return f"kube-apiserver {version[0]}.{version[1]} is older than 1.{MIN_APISERVER_MINOR}"
    if name == "helm" and not (MIN_HELM <= version < (4, 0, 0)):
        return f"helm {'.'.join(map(str, version))} is not a helm 3 from 3.{MIN_HELM[1]} on"
    if name == "kubectl" and abs(version[1] - want[1]) > 1:
        return f"kubectl 1.{version[1]} is more than one minor version from 1.{want[1]}"
    return None


# --- lookup ---------------------------------------------------------------------------------


_told: set[tuple[str, str]] = set()


def _asset_dir() -> tuple[str, Path] | None:
    for var in ASSET_ENV_VARS:
        if value := os.environ.get(var):
            return var, Path(value)
    return None


def find(name: str, log: Log = _stderr) -> Path | None:
    """The first usable binary in the lookup order, or None when it must be built."""
    if assets := _asset_dir():
        var, folder = assets
        path = folder / name
        if not os.access(path, os.X_OK):
            raise BinaryError(
                f"{var}={folder} has no executable {name}: put etcd, kube-apiserver and kubectl "
                f"there, or unset {var} to let pcipt find or build them"
            )
        return path
    on_path = shutil.which(name)
    if on_path:
        why = _why_unsupported(name, binary_version(name, Path(on_path)))
        if why is None:
            return Path(on_path)
        if (on_path, why) not in _told:  # say it once per process, not at every lookup
            _told.add((on_path, why))
            log(f"devcluster: not using {on_path}: {why}")
    cached = bin_cache_dir() / name
    if os.access(cached, os.X_OK):
        return cached
    return None


def ensure(log: Log = _stderr) -> Binaries:
    """Find every binary, building what is missing into the cache."""
    found = {name: find(name, log) for name in NAMES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        with _build_lock():
            # Another process may have built them while we waited for the lock.
            found = {name: find(name, log) for name in NAMES}
            missing = [n for n, p in found.items() if p is None]
            if {"kube-apiserver", "kubectl"} & set(missing):
                build_kubernetes(bin_cache_dir(), ("kube-apiserver", "kubectl"), log)
            if "etcd" in missing:
                build_etcd(bin_cache_dir(), log)
        found = {name: find(name, log) for name in NAMES}
    paths = {n: p for n, p in found.items() if p is not None}
    if len(paths) != len(NAMES):
        raise BinaryError(f"still missing after the build: {sorted(set(NAMES) - set(paths))}")
    return Binaries(
        etcd=paths["etcd"], kube_apiserver=paths["kube-apiserver"], kubectl=paths["kubectl"]
    )


def ensure_node(log: Log = _stderr) -> dict[str, Path]:
    """kubelet, kube-controller-manager, kube-scheduler and kube-proxy, built when missing.

    Never taken from PATH: they must be the control plane's own version, and a distribution's
    kubelet on PATH is usually another one.
    """
    assets = _asset_dir()
    folder = assets[1] if assets else bin_cache_dir()

    def lookup() -> dict[str, Path]:
        return {n: folder / n for n in NODE_NAMES if os.access(folder / n, os.X_OK)}

    found = lookup()
    if len(found) < len(NODE_NAMES):
        if assets:
            missing = sorted(set(NODE_NAMES) - set(found))
            raise BinaryError(f"{assets[0]}={folder} lacks {', '.join(missing)} for the local node")
        with _build_lock():
            found = lookup()
            if len(found) < len(NODE_NAMES):
                build_kubernetes(bin_cache_dir(), NODE_NAMES, log)
            found = lookup()
    if len(found) < len(NODE_NAMES):
        raise BinaryError(f"still missing after the build: {sorted(set(NODE_NAMES) - set(found))}")
    return found


# --- building ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BinaryError(
            "kube-apiserver, kubectl or etcd is missing and there is no Go toolchain to build it. "
            "Install Go 1.26 or newer (https://go.dev/dl or your distribution's golang package), "
            "or set PCIPT_ASSETS to a folder holding etcd, kube-apiserver and kubectl "
            f"(Kubernetes {KUBERNETES_VERSION}, etcd {ETCD_VERSION})."
        )
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOWORK": "off"})
    return env


def _run_go(args: list[str], cwd: Path, log: Log) -> str:
    cmd = [_go(), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BinaryError(
            f"`go {' '.join(args)}` failed in {cwd} (exit {proc.returncode}):\n{tail}\n"
            "The Go module proxy must be reachable (GOPROXY) and Go new enough for "
            f"Kubernetes {KUBERNETES_VERSION}."
        )
    return proc.stdout


def staging_replacements(kubernetes_go_mod: str, staging_version: str) -> list[str]:
    """`replace` lines that swap k8s.io/kubernetes' local staging paths for published modules."""
    modules = re.findall(
        r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", kubernetes_go_mod, re.MULTILINE
    )
    if not modules:
        raise BinaryError("k8s.io/kubernetes' go.mod lists no staging modules; cannot build it")
    return [f"\t{m} => {m} {staging_version}" for m in sorted(set(modules))]


def _install(built: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, dest)  # atomic: an interrupted build never leaves half a binary in the cache


def build_kubernetes(dest: Path, names: tuple[str, ...], log: Log = _stderr) -> None:
    """Build the named commands of k8s.io/kubernetes (cmd/<name>) into dest."""
    version = KUBERNETES_VERSION
    major, minor, _ = _semver(version) or (0, 0, 0)
    staging_version = f"v0.{minor}.{version.rsplit('.', 1)[-1]}"
    log(
        f"devcluster: building {', '.join(names)} {version} from the Go module proxy "
        "(first run only; a few minutes on 2 cores)"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pcipt-k8s-build-") as tmp:
        work = Path(tmp)
        info = json.loads(
            _run_go(["mod", "download", "-json", f"k8s.io/kubernetes@{version}"], work, log)
        )
        upstream_mod = Path(info["GoMod"]).read_text()
        go_directive = re.search(r"^go\s+(\S+)", upstream_mod, re.MULTILINE)
        lines = [
            "module pcipt.local/kubernetes-build",
            "",
            f"go {go_directive.group(1) if go_directive else '1.26.0'}",
            "",
            f"require k8s.io/kubernetes {version}",
            "",
            "replace (",
            *staging_replacements(upstream_mod, staging_version),
            ")",
            "",
        ]
        (work / "go.mod").write_text("\n".join(lines))
        stamp = {
            "gitVersion": version,
            "gitMajor": str(major),
            "gitMinor": str(minor),
            "gitTreeState": "clean",
            "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        ldflags = ["-s", "-w"] + [
            f"-X {pkg}.{k}={v}"
            for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
            for k, v in stamp.items()
        ]
        out = work / "out"
        _run_go(
            [
                "build",
                "-trimpath",
                f"-ldflags={' '.join(ldflags)}",
                "-o",
                f"{out}/",
                *(f"k8s.io/kubernetes/cmd/{name}" for name in names),
            ],
            work,
            log,
        )
        for name in names:
            _install(out / name, dest / name)
    elapsed = time.monotonic() - started
    log(f"devcluster: built {', '.join(names)} in {elapsed:.0f}s -> {dest}")


def _build_module_binary(
    binary: str,
    require: str,
    package: str,
    dest: Path,
    *,
    log: Log,
    ldflags: Callable[[Path], str] = lambda _work: "-s -w",
) -> None:
    """Build one binary from a throw-away module that requires `require` ("module version");
    ldflags may read the resolved module graph in the work folder."""
    log(f"devcluster: building {binary} ({require}) from the Go module proxy (first run only)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"pcipt-{binary}-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(
            f"module pcipt.local/{binary}-build\n\ngo 1.25.0\n\nrequire {require}\n"
        )
        out = work / binary
        flags = ldflags(work)
        _run_go(["build", "-trimpath", f"-ldflags={flags}", "-o", str(out), package], work, log)
        _install(out, dest / binary)
    log(f"devcluster: built {binary} in {time.monotonic() - started:.0f}s -> {dest}")


def build_etcd(dest: Path, log: Log = _stderr) -> None:
    module = "go.etcd.io/etcd/server/v3"
    _build_module_binary("etcd", f"{module} {ETCD_VERSION}", module, dest, log=log)


# --- helm -------------------------------------------------------------------------------------


def helm_cache_dir() -> Path:
    return cache_root() / "bin" / f"helm-{HELM_VERSION}"


def find_helm(log: Log = _stderr) -> Path | None:
    """helm from the asset folder, PATH (a supported version) or the cache; None: build it."""
    if assets := _asset_dir():
        path = assets[1] / "helm"
        if os.access(path, os.X_OK):
            return path
    on_path = shutil.which("helm")
    if on_path:
        why = _why_unsupported("helm", binary_version("helm", Path(on_path)))
        if why is None:
            return Path(on_path)
        if (on_path, why) not in _told:
            _told.add((on_path, why))
            log(f"devcluster: not using {on_path}: {why}")
    cached = helm_cache_dir() / "helm"
    return cached if os.access(cached, os.X_OK) else None


def ensure_helm(log: Log = _stderr) -> Path:
    found = find_helm(log)
    if found is None:
        with _build_lock():
            found = find_helm(log)
            if found is None:
                build_helm(helm_cache_dir(), log)
                found = find_helm(log)
    if found is None:
        raise BinaryError(f"helm is still missing after building it into {helm_cache_dir()}")
    return found


def build_helm(dest: Path, log: Log = _stderr) -> None:
    def ldflags(work: Path) -> str:
        # As helm's Makefile does: its own version, and the Kubernetes version `helm template`
        # and `helm lint` assume without a cluster, from the client-go it is built with (unset,
        # they assume 1.20, older than the chart's kubeVersion allows).
        client_go = _run_go(["list", "-m", "-f", "{{.Version}}", "k8s.io/client-go"], work, log)
        _, kube_minor, _ = _semver(client_go) or (0, 0, 0)
        stamp = [f"helm.sh/helm/v3/internal/version.version={HELM_VERSION}"] + [
            f"helm.sh/helm/v3/pkg/{pkg}.{var}={value}"
            for pkg in ("chartutil", "lint/rules")
            for var, value in (("k8sVersionMajor", 1), ("k8sVersionMinor", kube_minor))
        ]
        return " ".join(["-s -w", *(f"-X {s}" for s in stamp)])

    module = "helm.sh/helm/v3"
    _build_module_binary(
        "helm", f"{module} {HELM_VERSION}", f"{module}/cmd/helm", dest, log=log, ldflags=ldflags
    )
