"""The self-issued webhook certificate on the real API server: replicas starting together agree
on one certificate, the CA lands in the webhook configuration, and a usable one is kept."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Callable

import pytest
from kubernetes import client

from controller import webhookcert
from pcipt.kubeclient import KubeClient, load_credentials
from tests.integration.conftest import KubeCluster

SERVICE = "pcipt-webhook"


def _vwc(name: str, namespace: str) -> client.V1ValidatingWebhookConfiguration:
    hook = {
        "name": "passthroughvms.validate.pcipt.io",
        "rules": [
            {
                "apiGroups": ["pcipt.io"],
                "apiVersions": ["v1alpha1"],
                "resources": ["passthroughvms"],
                "operations": ["CREATE"],
            }
        ],
        "clientConfig": {
            "service": {"name": SERVICE, "namespace": namespace, "path": "/passthroughvms"}
        },
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Ignore",
        # Match nothing, so other tests' VMs never wait on this unreachable service.
        "objectSelector": {"matchLabels": {"never": "matched"}},
    }
    other = {**hook, "name": "other.example.com", "clientConfig": {"url": "https://127.0.0.1:1/x"}}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [other, hook],
    }  # type: ignore[return-value]


async def _ensure_twice(
    kube: KubeCluster, namespace: str, secret: str
) -> list[webhookcert.ServingCert]:
    apis = [KubeClient(load_credentials(str(kube.kubeconfig))) for _ in range(2)]
    try:
        return list(
            await asyncio.gather(
                *(webhookcert.ensure_cert(a, namespace, secret, SERVICE) for a in apis)
            )
        )
    finally:
        for a in apis:
            await a.close()


def test_replicas_starting_together_agree_on_one_certificate(
    kube: KubeCluster, namespace: str
) -> None:
    core = client.CoreV1Api(kube.api)
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="tls"), type="Opaque")
    )
    first, second = asyncio.run(_ensure_twice(kube, namespace, "tls"))
    assert first == second
    stored = core.read_namespaced_secret("tls", namespace).data
    assert base64.b64decode(stored["ca.crt"]) == first.ca_pem
    assert webhookcert.problem(first, webhookcert.service_names(SERVICE, namespace), _now()) is None
    # A restart adopts it rather than issuing another.
    again, _ = asyncio.run(_ensure_twice(kube, namespace, "tls"))
    assert again == first


def test_an_unusable_stored_certificate_is_replaced(kube: KubeCluster, namespace: str) -> None:
    core = client.CoreV1Api(kube.api)
    wrong = webhookcert.new_cert(webhookcert.service_names("someone-else", namespace))
    data = {
        k: base64.b64encode(v).decode()
        for k, v in (
            ("ca.crt", wrong.ca_pem),
            ("tls.crt", wrong.cert_pem),
            ("tls.key", wrong.key_pem),
        )
    }
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="tls"), data=data)
    )
    got, _ = asyncio.run(_ensure_twice(kube, namespace, "tls"))
    assert got.cert_pem != wrong.cert_pem
    assert webhookcert.problem(got, webhookcert.service_names(SERVICE, namespace), _now()) is None


def test_a_missing_secret_says_what_to_do(kube: KubeCluster, namespace: str) -> None:
    with pytest.raises(webhookcert.WebhookCertError, match="does not exist: the chart creates it"):
        asyncio.run(_ensure_twice(kube, namespace, "absent"))


def test_the_ca_goes_into_our_webhooks_only(
    kube: KubeCluster, namespace: str, unique: Callable[[str], str]
) -> None:
    name = unique("vwc")
    adm = client.AdmissionregistrationV1Api(kube.api)
    adm.create_validating_webhook_configuration(_vwc(name, namespace))
    cert = webhookcert.new_cert(webhookcert.service_names(SERVICE, namespace))

    async def inject() -> int:
        async with KubeClient(load_credentials(str(kube.kubeconfig))) as api:
            return await webhookcert.inject_ca(
                api, name, namespace=namespace, service=SERVICE, ca_pem=cert.ca_pem
            )

    try:
        assert asyncio.run(inject()) == 1
        hooks = adm.read_validating_webhook_configuration(name).webhooks
        assert hooks[0].client_config.ca_bundle is None  # the other webhook is not ours
        assert base64.b64decode(hooks[1].client_config.ca_bundle) == cert.ca_pem
        assert asyncio.run(inject()) == 0  # already there: no write
    finally:
        adm.delete_validating_webhook_configuration(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
