"""The webhook's serving certificate when the chart runs the controller in `serve` mode without
cert-manager: kept in one Secret that the chart creates empty, and its CA put into the
ValidatingWebhookConfiguration's caBundle.

Every replica runs this at start. The Secret is written with a resourceVersion precondition, so
when two replicas start together one certificate wins and the other adopts it: both then serve
the same certificate, whichever the Service picks. Rendering stays deterministic (the chart
never generates keys), and the controller needs only get/update on that one Secret.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from pcipt import tls
from pcipt.kubeclient import Conflict, KubeClient, NotFound

log = logging.getLogger("pcipt.controller.webhook")

VWC_PATH = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
LEAF_DAYS = 5 * 365
RENEW_BEFORE = dt.timedelta(days=365)
"""At start, a certificate with less than this left is replaced."""


class WebhookCertError(RuntimeError):
    """The serving certificate could not be set up; the message says what to fix."""


@dataclass(frozen=True)
class ServingCert:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "tls.crt", folder / "tls.key"
        tls.write(cert, self.cert_pem + self.ca_pem, 0o644)
        tls.write(key, self.key_pem)
        return cert, key


def service_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use to reach a webhook Service."""
    return [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def problem(cert: ServingCert, names: list[str], now: dt.datetime) -> str | None:
    """Why this certificate cannot be used (None: it can)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.cert_pem)
        ca = x509.load_pem_x509_certificate(cert.ca_pem)
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
    except ValueError as e:
        return f"unreadable: {e}"
    if leaf.issuer != ca.subject:
        return "not issued by the stored CA"
    try:
        leaf.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return "its signature does not verify against the stored CA"
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():  # type: ignore[union-attr]
        return "key does not match the certificate"
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    missing = sorted(set(names) - set(san.get_values_for_type(x509.DNSName)))
    if missing:
        return f"not valid for {missing}"
    left = min(leaf.not_valid_after_utc, ca.not_valid_after_utc) - now
    if left < RENEW_BEFORE:
        return f"expires in {left.days} days"
    return None


def new_cert(names: list[str]) -> ServingCert:
    ca, ca_key = tls.new_ca("pcipt-webhook-ca")
    leaf, key = tls.issue(ca, ca_key, tls.name(names[0]), server_names=names, days=LEAF_DAYS)
    return ServingCert(tls.cert_pem(ca), tls.cert_pem(leaf), tls.key_pem(key))


def _decode(data: dict[str, str], key: str) -> bytes:
    return base64.b64decode(data.get(key, "") or "")


def _from_secret(secret: dict[str, Any]) -> ServingCert | None:
    data = secret.get("data") or {}
    if not all(data.get(k) for k in ("ca.crt", "tls.crt", "tls.key")):
        return None
    return ServingCert(_decode(data, "ca.crt"), _decode(data, "tls.crt"), _decode(data, "tls.key"))


async def ensure_cert(
    api: KubeClient, namespace: str, secret: str, service: str, *, attempts: int = 5
) -> ServingCert:
    """The Secret's certificate if usable, else a new one written to it (first writer wins)."""
    names = service_names(service, namespace)
    path = f"/api/v1/namespaces/{namespace}/secrets/{secret}"
    for _ in range(attempts):
        try:
            current = await api.get(path)
        except NotFound as e:
            raise WebhookCertError(
                f"Secret {namespace}/{secret} does not exist: the chart creates it (empty) for "
                "the controller to fill; install the chart, or set webhook.mode=none"
            ) from e
        stored = _from_secret(current)
        why = "empty" if stored is None else problem(stored, names, dt.datetime.now(dt.UTC))
        if stored is not None and why is None:
            return stored
        log.info("webhook certificate in %s/%s is %s: issuing a new one", namespace, secret, why)
        fresh = new_cert(names)
        body = {
            "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
            "data": {
                "ca.crt": base64.b64encode(fresh.ca_pem).decode(),
                "tls.crt": base64.b64encode(fresh.cert_pem).decode(),
                "tls.key": base64.b64encode(fresh.key_pem).decode(),
            },
        }
        try:
            await api.patch(path, body)
            return fresh
        except Conflict:
            continue  # another replica wrote one first: read and adopt it
    raise WebhookCertError(f"Secret {namespace}/{secret} kept changing; gave up after {attempts}")


async def inject_ca(
    api: KubeClient, config: str, *, namespace: str, service: str, ca_pem: bytes
) -> int:
    """Put the CA into each webhook of `config` that calls our Service; returns how many
    changed. A JSON patch with a test per entry, so a concurrent edit fails instead of being
    overwritten."""
    bundle = base64.b64encode(ca_pem).decode()
    try:
        vwc = await api.get(f"{VWC_PATH}/{config}")
    except NotFound:
        log.warning("ValidatingWebhookConfiguration %s not found: nothing to inject into", config)
        return 0
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(vwc.get("webhooks") or []):
        ref = (hook.get("clientConfig") or {}).get("service") or {}
        if ref.get("name") != service or ref.get("namespace") != namespace:
            continue
        if hook["clientConfig"].get("caBundle") == bundle:
            continue
        ops += [
            {"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]},
            {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle},
        ]
    if ops:
        await api.patch(f"{VWC_PATH}/{config}", ops, patch_type="json")
        log.info("injected the webhook CA into %s (%d webhooks)", config, len(ops) // 2)
    return len(ops) // 2


async def keep_ca_injected(
    api: KubeClient,
    config: str,
    *,
    namespace: str,
    service: str,
    ca_pem: bytes,
    interval: float = 60.0,
) -> None:
    """Re-inject now and then: a GitOps sync or `helm upgrade` that replaces the object drops
    the caBundle, and the API server would then refuse to call us."""
    while True:
        await asyncio.sleep(interval)
        try:
            await inject_ca(api, config, namespace=namespace, service=service, ca_pem=ca_pem)
        except Exception as e:
            log.warning("webhook CA not re-injected into %s: %s", config, e)
