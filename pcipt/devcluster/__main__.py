"""`python -m pcipt.devcluster up|down|env|kubeconfig|status|build|install-crds`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from kubernetes import config

from pcipt.devcluster import binaries
from pcipt.devcluster.cluster import ClusterError, LocalCluster
from pcipt.devcluster.crds import apply_crds


def default_state_dir(name: str) -> Path:
    if env := os.environ.get("PCIPT_DEVCLUSTER_DIR"):
        return Path(env)
    return binaries.cache_root() / "devcluster" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcipt.devcluster",
        description="A real local Kubernetes control plane (etcd + kube-apiserver on loopback).",
    )
    parser.add_argument(
        "--name", default="default", help="cluster name (state folder); default: default"
    )
    parser.add_argument("--state-dir", type=Path, help="state folder (env PCIPT_DEVCLUSTER_DIR)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the control plane in the background and wait until ready")
    up.add_argument("--fsync", action="store_true", help="let etcd fsync (slower; default off)")
    up.add_argument("--crds", action="store_true", help="also install pcipt's CRDs from crds/")
    sub.add_parser("down", help="stop it and delete its state")
    sub.add_parser("env", help='print shell exports (eval "$(python -m pcipt.devcluster env)")')
    sub.add_parser("kubeconfig", help="print the admin kubeconfig's path")
    sub.add_parser("status", help="say whether it runs, and where")
    build = sub.add_parser(
        "build", help="find or build etcd, kube-apiserver and kubectl; print their paths"
    )
    build.add_argument("--helm", action="store_true", help="helm too (the chart's tests need it)")
    sub.add_parser("install-crds", help="create or update pcipt's CRDs and wait until Established")
    args = parser.parse_args(argv)

    state_dir = args.state_dir or default_state_dir(args.name)
    cluster = LocalCluster(state_dir, fsync=getattr(args, "fsync", False))
    try:
        if args.cmd == "build":
            for name, path in binaries.ensure().as_dict().items():
                print(f"{name}: {path}")
            if args.helm:
                print(f"helm: {binaries.ensure_helm()}")
        elif args.cmd == "up":
            st = cluster.up()
            print(f"control plane ready at {st.server} (Kubernetes {st.kubernetes_version})")
            print(f"kubeconfig: {st.kubeconfig}")
            if args.crds:
                _install_crds(cluster)
        elif args.cmd == "down":
            cluster.down()
            print(f"stopped and removed {state_dir}")
        elif args.cmd == "env":
            print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
        elif args.cmd == "kubeconfig":
            print(cluster.kubeconfig)
        elif args.cmd == "status":
            current = cluster.state()
            if current is None or not cluster.is_running():
                print(f"not running (state folder {state_dir})")
                return 1
            print(
                f"running at {current.server}; etcd {current.etcd_url}; "
                f"kubeconfig {current.kubeconfig}"
            )
        elif args.cmd == "install-crds":
            _install_crds(cluster)
    except (ClusterError, binaries.BinaryError) as e:
        print(f"devcluster: {e}", file=sys.stderr)
        return 1
    return 0


def _install_crds(cluster: LocalCluster) -> None:
    api = config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    for name in apply_crds(api):
        print(f"crd/{name} established")


if __name__ == "__main__":
    sys.exit(main())
