"""Certificates for the local control plane: a CA, the API server's serving certificate, an
admin client certificate (group system:masters) and the service-account signing key.

Everything is generated fresh for each cluster and lives in its state folder; nothing here is
meant for production.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from pcipt.tls import cert_pem, issue, key_pem, name, new_ca, new_key, write

SERVICE_IP = "10.0.0.1"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def generate(folder: Path, extra_names: Sequence[str] = ()) -> Pki:
    """Write a complete PKI for one local cluster into `folder`; `extra_names` are more names
    or addresses the API server answers to (a node's address)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = new_ca("pcipt-devcluster-ca")
    serving, serving_key = issue(
        ca,
        ca_key,
        name("kube-apiserver"),
        server_names=[
            "127.0.0.1",
            "localhost",
            "::1",
            SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            *extra_names,
        ],
    )
    admin, admin_key = issue(ca, ca_key, name("pcipt-admin", "system:masters"), client=True)
    sa_key = new_key()
    pki = Pki(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        serving_cert=folder / "apiserver.crt",
        serving_key=folder / "apiserver.key",
        admin_cert=folder / "admin.crt",
        admin_key=folder / "admin.key",
        sa_key=folder / "sa.key",
        sa_pub=folder / "sa.pub",
    )
    write(pki.ca_cert, cert_pem(ca), 0o644)
    write(pki.ca_key, key_pem(ca_key))
    write(pki.serving_cert, cert_pem(serving), 0o644)
    write(pki.serving_key, key_pem(serving_key))
    write(pki.admin_cert, cert_pem(admin), 0o644)
    write(pki.admin_key, key_pem(admin_key))
    write(pki.sa_key, key_pem(sa_key))
    write(
        pki.sa_pub,
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    return pki
