"""The pcipt-controller command line.

Every setting has an environment twin (PCIPT_<NAME>), so the chart can set them either way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import kopf

from controller import handlers
from controller.plan import PlanError, run_plan
from controller.runtime import ControllerSettings
from pcipt import constants as c
from pcipt import logs, metrics
from pcipt.logs import setup_logging
from pcipt.settings import env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcipt-controller", description="The pcipt operator.")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run the operator against a cluster")
    run.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    run.add_argument(
        "--namespace",
        default=env("NAMESPACE", c.DEFAULT_NAMESPACE),
        help="operator namespace: node Leases, Events of cluster objects",
    )
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--standalone",
        action="store_true",
        default=env("STANDALONE", "") == "1",
        help="no kopf peering (safety does not depend on it)",
    )
    mode.add_argument(
        "--peering",
        default=env("PEERING", ""),
        help="kopf peering name for HA (needs the ClusterKopfPeering CRD)",
    )
    run.add_argument(
        "--priority",
        type=int,
        default=int(env("PRIORITY", "0")) or random.randint(1, 1_000_000),
        help="kopf peering priority; replicas must differ (tied peers all pause): default random",
    )
    run.add_argument(
        "--peering-lifetime",
        type=int,
        default=int(env("PEERING_LIFETIME", "60")),
        help="seconds a silent peer is still considered alive",
    )
    run.add_argument(
        "--node-dead-after",
        type=float,
        default=float(env("NODE_DEAD_AFTER", "40")),
        help="seconds without a node Lease renewal before the node is not alive",
    )
    run.add_argument(
        "--claim-grace",
        type=float,
        default=float(env("CLAIM_GRACE", "30")),
        help="seconds before the audit releases a claim its VM does not list",
    )
    run.add_argument(
        "--audit-interval",
        type=float,
        default=float(env("AUDIT_INTERVAL", "30")),
        help="seconds between audits",
    )
    run.add_argument(
        "--scoring",
        choices=["best-fit", "spread"],
        default=env("SCORING", "best-fit"),
        help="node scoring policy",
    )
    run.add_argument(
        "--bind-concurrency",
        type=int,
        default=int(env("BIND_CONCURRENCY", "16")),
        help="binds in flight at once",
    )
    run.add_argument(
        "--webhook",
        choices=["none", "dev", "serve"],
        default=env("WEBHOOK", "none"),
        help="validating webhook: none; dev (self-signed on 127.0.0.1, configuration managed "
        "by the controller); serve (--webhook-cert/--webhook-key, configuration from the chart)",
    )
    run.add_argument("--webhook-port", type=int, default=int(env("WEBHOOK_PORT", "0")))
    run.add_argument(
        "--webhook-addr",
        default=env("WEBHOOK_ADDR", "0.0.0.0"),
        help="serve: the address to listen on (the Service reaches the pod on its IP)",
    )
    run.add_argument(
        "--webhook-cert",
        default=env("WEBHOOK_CERT", ""),
        help="serve: a certificate file (with --webhook-key) made elsewhere, e.g. by cert-manager",
    )
    run.add_argument("--webhook-key", default=env("WEBHOOK_KEY", ""))
    run.add_argument(
        "--webhook-secret",
        default=env("WEBHOOK_SECRET", ""),
        help="serve without --webhook-cert: keep a self-issued certificate in this Secret of "
        "--namespace (the chart creates it empty)",
    )
    run.add_argument(
        "--webhook-service",
        default=env("WEBHOOK_SERVICE", "pcipt-webhook"),
        help="the Service the API server calls the webhook through (names in the certificate)",
    )
    run.add_argument(
        "--webhook-config",
        default=env("WEBHOOK_CONFIG", ""),
        help="the ValidatingWebhookConfiguration to put the self-issued CA into",
    )
    run.add_argument(
        "--liveness",
        default=env("LIVENESS", ""),
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    metrics.add_arguments(run)
    logs.add_arguments(run)

    plan = sub.add_parser("plan", help="dry-run the scheduler on manifests, without a cluster")
    plan.add_argument("--devices", type=Path, required=True, help="PciDevice manifests")
    plan.add_argument("--flavors", type=Path, required=True, help="PciFlavor manifests")
    plan.add_argument("--vm", type=Path, required=True, help="one PassthroughVM manifest")
    plan.add_argument(
        "--nodes", type=Path, help="Node manifests (labels; Ready=False means not alive)"
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
    args = build_parser().parse_args(argv)
    if args.cmd == "plan":
        try:
            code, text = run_plan(
                args.devices,
                args.flavors,
                args.vm,
                nodes=args.nodes,
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
    identity = f"pcipt-controller/{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
    settings = ControllerSettings(
        namespace=args.namespace,
        node_dead_after=args.node_dead_after,
        claim_grace=args.claim_grace,
        audit_interval=args.audit_interval,
        scoring=args.scoring,
        bind_concurrency=args.bind_concurrency,
        peering=args.peering or None,
        identity=identity,
        priority=args.priority,
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
        peering_lifetime=args.peering_lifetime,
        metrics=(args.metrics_host, args.metrics_port),
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    asyncio.run(
        kopf.operator(
            registry=handlers.registry,
            clusterwide=True,
            standalone=args.standalone or not args.peering,
            peering_name=args.peering or None,
            priority=args.priority,
            identity=identity,  # type: ignore[arg-type]  # kopf types it as a NewType of str
            liveness_endpoint=args.liveness or None,
            memo=memo,
        )
    )
    return 0
