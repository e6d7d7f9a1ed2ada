"""kopf wiring: @kopf.on.* only. Each handler hands the raw event to the runtime.

PciDevices and PassthroughVMs are not watched here: they change three times a bind, and the
runtime watches them with pcipt's lean informer (controller/runtime.py), which costs a fraction
of kopf's per-event machinery. Flavors, namespaces and nodes, which change seldom, come here.

Low-level event handlers (`on.event`) are used throughout on purpose: they write no progress
annotations and keep no diffbase, so watching costs no API writes, and the runtime's own queue
decides what to do (see controller/runtime.py). kopf's own per-handler Events are off; the
runtime posts one Event per transition.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from controller import webhookcert
from controller.runtime import ControllerSettings, Runtime
from pcipt import constants as c
from pcipt import tls
from pcipt.kubeclient import ApiError, KubeClient, load_credentials
from pcipt.metrics import serve as serve_metrics

registry = kopf.OperatorRegistry()
log = logging.getLogger("pcipt.controller")


class NoDiffBase(kopf.DiffBaseStorage):
    """pcipt has only on.event handlers, which never see a diff: kopf's diff base (a deep copy
    of every object at every event, 5-6% of the controller's CPU in a fill) is not kept."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


def configure_kopf(settings: kopf.OperatorSettings, webhook: dict[str, Any] | None) -> None:
    settings.posting.enabled = False  # one Event per transition, posted by the runtime
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    if webhook:
        if webhook.get("dev"):
            folder = Path(webhook["cert_dir"])
            cert, key, ca = tls.server_pair(folder, ["127.0.0.1", "localhost"], "pcipt-webhook")
            settings.admission.server = kopf.WebhookServer(
                addr="127.0.0.1",
                port=webhook.get("port") or None,
                host="127.0.0.1",
                certfile=str(cert),
                pkeyfile=str(key),
                cadata=ca,
            )
            settings.admission.managed = f"validate.{c.GROUP}"
        else:
            settings.admission.server = kopf.WebhookServer(
                addr=webhook.get("addr", "0.0.0.0"),
                port=webhook.get("port") or 9443,
                certfile=webhook["cert"],
                pkeyfile=webhook["key"],
            )


@kopf.on.login(registry=registry)
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in with the credentials our own client uses (kubeconfig, exec
    plugins, OIDC, in-cluster), loaded afresh: kopf calls this again when a token is refused."""
    creds = load_credentials(os.environ.get("KUBECONFIG"))
    token = creds.auth_headers().get("Authorization", "").removeprefix("Bearer ") or None
    return kopf.ConnectionInfo(
        server=creds.host,
        ca_path=creds.ca_file,
        insecure=creds.ssl is False,
        token=token,
        certificate_path=creds.cert_file,
        private_key_path=creds.key_file,
    )


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    cfg: ControllerSettings = memo["settings"]
    api = KubeClient(load_credentials(os.environ.get("KUBECONFIG")), user_agent="pcipt-controller")
    webhook = memo.get("webhook")
    if webhook and webhook.get("secret"):
        await _self_issued_cert(api, cfg.namespace, webhook, memo)
    configure_kopf(settings, webhook)
    runtime = Runtime(api, cfg)
    try:
        await runtime.start()
    except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
        await api.close()
        raise kopf.TemporaryError(f"start-up sync failed, retrying: {e}", delay=2) from e
    except Exception as e:
        # A bug, not weather: exit, so the pod restarts and the error is seen.
        log.exception("start-up failed")
        await api.close()
        raise kopf.PermanentError(f"start-up failed: {e}") from e
    memo["runtime"] = runtime
    host, port = memo.get("metrics", ("", 0))
    if port:
        memo["metrics_runner"] = await serve_metrics(
            runtime.registry, host, port, health=runtime.ready.is_set
        )
        log.info("serving metrics and health on %s:%d", host or "*", port)


async def _self_issued_cert(
    api: KubeClient, namespace: str, webhook: dict[str, Any], memo: kopf.Memo
) -> None:
    """Serve mode without a certificate from elsewhere: adopt or issue the one in the Secret,
    and keep its CA in the webhook configuration."""
    try:
        cert = await webhookcert.ensure_cert(api, namespace, webhook["secret"], webhook["service"])
        if webhook.get("config"):
            await webhookcert.inject_ca(
                api,
                webhook["config"],
                namespace=namespace,
                service=webhook["service"],
                ca_pem=cert.ca_pem,
            )
    except webhookcert.WebhookCertError as e:
        await api.close()
        raise kopf.PermanentError(str(e)) from e
    except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
        await api.close()
        raise kopf.TemporaryError(
            f"webhook certificate set-up failed, retrying: {e}", delay=2
        ) from e
    webhook["cert"], webhook["key"] = (str(p) for p in cert.write(Path(webhook["cert_dir"])))
    if webhook.get("config"):
        memo["webhook_ca_task"] = asyncio.get_running_loop().create_task(
            webhookcert.keep_ca_injected(
                api,
                webhook["config"],
                namespace=namespace,
                service=webhook["service"],
                ca_pem=cert.ca_pem,
            )
        )


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("webhook_ca_task")
    if task is not None:
        task.cancel()
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.stop()
        await runtime.api.close()
    runner = memo.get("metrics_runner")
    if runner is not None:
        await runner.cleanup()


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL_PCIFLAVOR, registry=registry)
async def pciflavor_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).on_flavor(event["type"], dict(event["object"]))


@kopf.on.event("", "v1", "namespaces", registry=registry)
async def namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).on_namespace(event["type"], dict(event["object"]))


@kopf.on.event("", "v1", "nodes", registry=registry)
async def node_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).on_node(event["type"], dict(event["object"]))


def enable_webhook() -> None:
    """Register the validating webhook (kopf refuses admission handlers without a server)."""
    kopf.on.validate(
        c.GROUP,
        c.VERSION,
        c.PLURAL_PASSTHROUGHVM,
        operations=["CREATE", "UPDATE"],
        registry=registry,
        id="passthroughvms",
    )(validate_vm)


async def validate_vm(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    if runtime is None or not runtime.ready.is_set():
        return  # not synced yet: the same checks land as a condition instead
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    problems = await runtime.confirmed_admission_problems(dict(body))
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)
