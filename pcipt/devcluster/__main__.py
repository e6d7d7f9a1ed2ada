"""`python -m pcipt.devcluster up|down|env|kubeconfig|status|build|install-crds|load-image`.

`up` starts a control plane on loopback; `up --node` a control plane and a node whose pods
really run (kubelet, containerd), in private network and mount namespaces (node.py).
"""

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
from pcipt.devcluster.images import ImageError
from pcipt.devcluster.node import LocalNode, NodeState


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
    up.add_argument(
        "--node",
        action="store_true",
        help="a control plane and a node whose pods really run, in private namespaces (root)",
    )
    up.add_argument("--node-name", default="pcipt-node", help="--node: the node's name")
    up.add_argument(
        "--image",
        action="store_true",
        help="--node: build pcipt's image from this tree and import it (localhost/pcipt:dev)",
    )
    sub.add_parser("down", help="stop it and delete its state")
    load = sub.add_parser("load-image", help="import an image archive into the node's containerd")
    load.add_argument(
        "archive",
        type=Path,
        nargs="?",
        help="docker- or oci-archive; default: build pcipt's image from this tree",
    )
    sub.add_parser("env", help='print shell exports (eval "$(python -m pcipt.devcluster env)")')
    sub.add_parser("kubeconfig", help="print the admin kubeconfig's path")
    sub.add_parser("status", help="say whether it runs, and where")
    build = sub.add_parser(
        "build", help="find or build etcd, kube-apiserver and kubectl; print their paths"
    )
    build.add_argument("--helm", action="store_true", help="helm too (the chart's tests need it)")
    build.add_argument(
        "--node",
        action="store_true",
        help="kubelet, kube-proxy, kube-scheduler, kube-controller-manager",
    )
    sub.add_parser("install-crds", help="create or update pcipt's CRDs and wait until Established")
    args = parser.parse_args(argv)

    state_dir = args.state_dir or default_state_dir(args.name)
    node = LocalNode(state_dir, node_name=getattr(args, "node_name", "pcipt-node"))
    with_node = getattr(args, "node", False) or node.state() is not None
    cluster: LocalCluster | LocalNode = (
        node if with_node else LocalCluster(state_dir, fsync=getattr(args, "fsync", False))
    )
    try:
        if args.cmd == "build":
            for name, path in binaries.ensure().as_dict().items():
                print(f"{name}: {path}")
            if args.helm:
                print(f"helm: {binaries.ensure_helm()}")
            if args.node:
                for node_bin, node_path in binaries.ensure_node().items():
                    print(f"{node_bin}: {node_path}")
        elif args.cmd == "up" and with_node:
            nst = node.up()
            print(f"node {nst.node_name} Ready at {nst.node_ip}; API server {nst.server}")
            print(f"kubeconfig: {nst.kubeconfig}")
            if args.image:
                node.load_pcipt_image()
            if args.crds:
                _install_crds(node.kubeconfig)
        elif args.cmd == "up":
            st = cluster.up()
            print(f"control plane ready at {st.server} (Kubernetes {st.kubernetes_version})")
            print(f"kubeconfig: {st.kubeconfig}")
            if args.crds:
                _install_crds(cluster.kubeconfig)
        elif args.cmd == "load-image":
            if not with_node:
                print("devcluster: no node here (start one with `up --node`)", file=sys.stderr)
                return 1
            node.load_image(args.archive) if args.archive else node.load_pcipt_image()
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
            where = (
                f"node {current.node_name} at {current.node_ip}"
                if isinstance(current, NodeState)
                else f"etcd {current.etcd_url}"
            )
            print(f"running at {current.server}; {where}; kubeconfig {current.kubeconfig}")
        elif args.cmd == "install-crds":
            _install_crds(cluster.kubeconfig)
    except (ClusterError, binaries.BinaryError, ImageError) as e:
        print(f"devcluster: {e}", file=sys.stderr)
        return 1
    return 0


def _install_crds(kubeconfig: Path) -> None:
    api = config.new_client_from_config(str(kubeconfig))  # type: ignore[no-untyped-call]
    for name in apply_crds(api):
        print(f"crd/{name} established")


if __name__ == "__main__":
    sys.exit(main())
