"""The pcipt-controller command line: run (the operator) and plan (a dry run of the scheduler).

Every setting of `run` is declared once in RUN_SETTINGS with its environment twin
(PCIPT_<NAME>); the flag wins over the twin (pcipt.settings).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

import kopf

from controller import handlers
from controller.plan import PlanError, run_plan
from controller.runtime import ControllerSettings
from pcipt import logs, metrics
from pcipt.logs import setup_logging
from pcipt.settings import KUBECONFIG, Setting, add_settings, default_of, parse_args


def D(name: str) -> object:  # noqa: N802 - reads as a column of the table below
    """ControllerSettings' default for a field."""
    return default_of(ControllerSettings, name)


def default_identity() -> str:
    """The pod's name when the chart passes it (stable across container restarts), else one
    per process."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}.{os.getpid()}"


# `pcipt-controller run`: every setting once, with its PCIPT_<NAME> twin (pcipt.settings).
RUN_SETTINGS: tuple[Setting, ...] = (
    KUBECONFIG,
    Setting(
        "--namespace",
        D("namespace"),
        "operator namespace: node Leases, Events of cluster objects",
    ),
    Setting(
        "--leader-elect",
        False,
        "elect one acting replica on a Lease in --namespace (for more than one replica; "
        "safety does not depend on it)",
        kind="flag",
    ),
    Setting("--leader-elect-lease", "pcipt-controller", "name of the Lease replicas elect on"),
    Setting(
        "--leader-elect-lease-duration",
        D("lease_duration"),
        "seconds a leader's Lease lasts unrenewed: the longest a standby waits after the "
        "leader is killed",
        float,
    ),
    Setting(
        "--leader-elect-renew-period",
        D("renew_period"),
        "seconds between a leader's renewals",
        float,
    ),
    Setting(
        "--identity",
        default_identity,
        "this replica's name in the election; stable across restarts of one pod, so a "
        "restarted leader takes its Lease back at once (default: $POD_NAME, else host.pid)",
    ),
    Setting(
        "--node-dead-after",
        D("node_dead_after"),
        "seconds without a node Lease renewal before the node is not alive",
        float,
    ),
    Setting(
        "--claim-grace",
        D("claim_grace"),
        "seconds before the audit releases a claim its VM does not list",
        float,
    ),
    Setting("--audit-interval", D("audit_interval"), "seconds between audits", float),
    Setting(
        "--release-quarantine",
        D("release_quarantine"),
        "seconds a device a VM used is held back after its release, on top of its scrub",
        float,
    ),
    Setting(
        "--live-migration-timeout",
        D("live_migration_timeout"),
        "seconds a live migration may wait for its nodes' plugins to get ready before it is "
        "failed (never once the domain is moving)",
        float,
    ),
    Setting("--scoring", D("scoring"), "node scoring policy", choices=("best-fit", "spread")),
    Setting("--bind-concurrency", D("bind_concurrency"), "binds in flight at once", int),
    Setting(
        "--cpu-allocation-ratio",
        D("cpu_allocation_ratio"),
        "shared vCPUs per host CPU a node takes (dedicated vCPUs always take a CPU each)",
        float,
    ),
    Setting(
        "--webhook",
        "none",
        "validating webhook: none; dev (self-signed on 127.0.0.1, configuration managed "
        "by the controller); serve (--webhook-cert/--webhook-key, configuration from the chart)",
        choices=("none", "dev", "serve"),
    ),
    Setting("--webhook-port", 0, "port the webhook listens on (0: dev any, serve 9443)", int),
    Setting(
        "--webhook-addr",
        "0.0.0.0",
        "serve: the address to listen on (the Service reaches the pod on its IP)",
    ),
    Setting(
        "--webhook-cert",
        "",
        "serve: a certificate file (with --webhook-key) made elsewhere, e.g. by cert-manager",
    ),
    Setting("--webhook-key", "", "serve: the key of --webhook-cert"),
    Setting(
        "--webhook-secret",
        "",
        "serve without --webhook-cert: keep a self-issued certificate in this Secret of "
        "--namespace (the chart creates it empty)",
    ),
    Setting(
        "--webhook-service",
        "pcipt-webhook",
        "the Service the API server calls the webhook through (names in the certificate)",
    ),
    Setting(
        "--webhook-config",
        "",
        "the ValidatingWebhookConfiguration to put the self-issued CA into",
    ),
    Setting("--liveness", "", "kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"),
    *metrics.SETTINGS,
    *logs.SETTINGS,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcipt-controller", description="The pcipt operator.")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run the operator against a cluster")
    add_settings(run, RUN_SETTINGS)

    plan = sub.add_parser("plan", help="dry-run the scheduler on manifests, without a cluster")
    plan.add_argument("--devices", type=Path, required=True, help="PciDevice manifests")
    plan.add_argument("--flavors", type=Path, required=True, help="PciFlavor manifests")
    plan.add_argument("--vm", type=Path, required=True, help="one PassthroughVM manifest")
    plan.add_argument(
        "--nodes",
        type=Path,
        help="Node manifests (labels; Ready=False means not alive) and the node plugins' "
        "Leases (pcipt-node-<node>: their pcipt.io/compute annotation is the host's CPUs and "
        "memory)",
    )
    plan.add_argument(
        "--placed",
        type=Path,
        help="PassthroughVMs already placed (kubectl get ptvm -A -o yaml): the CPUs and memory "
        "they hold are counted",
    )
    plan.add_argument(
        "--namespace",
        help="namespace the VM would be created in (default: its own, else default)",
    )
    plan.add_argument(
        "--namespace-labels", type=Path, help="Namespace manifests, or a map {namespace: {labels}}"
    )
    plan.add_argument("--scoring", choices=["best-fit", "spread"], default="best-fit")
    plan.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), {"run": RUN_SETTINGS}, argv)
    if args.cmd == "plan":
        try:
            code, text = run_plan(
                args.devices,
                args.flavors,
                args.vm,
                nodes=args.nodes,
                placed=args.placed,
                namespace_labels=args.namespace_labels,
                namespace=args.namespace,
                output=args.output,
                policy=args.scoring,
            )
        except PlanError as e:
            print(f"pcipt-controller plan: {e}", file=sys.stderr)
            return 1
        print(text, end="" if text.endswith("\n") else "\n")
        return code
    return run(args)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_format, args.log_level)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    settings = ControllerSettings(
        namespace=args.namespace,
        node_dead_after=args.node_dead_after,
        claim_grace=args.claim_grace,
        audit_interval=args.audit_interval,
        scoring=args.scoring,
        bind_concurrency=args.bind_concurrency,
        cpu_allocation_ratio=args.cpu_allocation_ratio,
        leader_lease=args.leader_elect_lease if args.leader_elect else None,
        identity=args.identity,
        lease_duration=args.leader_elect_lease_duration,
        renew_period=args.leader_elect_renew_period,
        release_quarantine=args.release_quarantine,
        live_migration_timeout=args.live_migration_timeout,
    )
    webhook = None
    if args.webhook == "dev":
        webhook = {
            "dev": True,
            "port": args.webhook_port,
            "cert_dir": tempfile.mkdtemp(prefix="pcipt-webhook-"),
        }
    elif args.webhook == "serve":
        if bool(args.webhook_cert) == bool(args.webhook_secret):
            print(
                "pcipt-controller: --webhook serve needs either --webhook-cert and --webhook-key "
                "(a certificate made elsewhere) or --webhook-secret (self-issued), not both",
                file=sys.stderr,
            )
            return 2
        webhook = {
            "port": args.webhook_port or 9443,
            "addr": args.webhook_addr,
            "cert": args.webhook_cert,
            "key": args.webhook_key,
            "secret": args.webhook_secret,
            "service": args.webhook_service,
            "config": args.webhook_config,
            "cert_dir": tempfile.mkdtemp(prefix="pcipt-webhook-"),
        }
    if webhook is not None:
        handlers.enable_webhook()
    memo = kopf.Memo(
        settings=settings,
        webhook=webhook,
        metrics=(args.metrics_host, args.metrics_port),
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    asyncio.run(
        kopf.operator(
            registry=handlers.registry,
            clusterwide=True,
            # Every replica watches (warm standbys); which one acts is the Lease's business
            # (controller/leader.py), not kopf peering's.
            standalone=True,
            # kopf wants an identity even standalone, and would ask getpass for one, which
            # fails for a uid with no passwd entry (the image runs as 65532).
            identity=args.identity,
            liveness_endpoint=args.liveness or None,
            memo=memo,
        )
    )
    return 0
