"""The self-issued webhook certificate: what makes a stored one unusable."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from controller import webhookcert
from controller.webhookcert import ServingCert, new_cert, problem, service_names
from pcipt import tls

NAMES = service_names("pcipt-webhook", "pcipt-system")
NOW = dt.datetime.now(dt.UTC)


def test_names_are_the_services_dns_names() -> None:
    assert NAMES == [
        "pcipt-webhook.pcipt-system.svc",
        "pcipt-webhook.pcipt-system.svc.cluster.local",
    ]


def test_a_new_certificate_is_usable() -> None:
    assert problem(new_cert(NAMES), NAMES, NOW) is None


def test_another_services_certificate_is_not() -> None:
    other = new_cert(service_names("x", "pcipt-system"))
    assert problem(other, NAMES, NOW) == f"not valid for {sorted(NAMES)}"


def test_one_close_to_expiry_is_renewed() -> None:
    cert = new_cert(NAMES)
    later = (
        NOW
        + dt.timedelta(days=webhookcert.LEAF_DAYS)
        - webhookcert.RENEW_BEFORE
        + dt.timedelta(days=1)
    )
    assert (problem(cert, NAMES, later) or "").startswith("expires in")


def test_a_mismatched_key_or_ca_is_refused() -> None:
    a, b = new_cert(NAMES), new_cert(NAMES)
    assert (
        problem(ServingCert(a.ca_pem, a.cert_pem, b.key_pem), NAMES, NOW)
        == "key does not match the certificate"
    )
    assert problem(ServingCert(b.ca_pem, a.cert_pem, a.key_pem), NAMES, NOW) in {
        "not issued by the stored CA",
        "its signature does not verify against the stored CA",
    }
    # Same subject, different key: only the signature tells them apart.
    ca, _ = tls.new_ca("pcipt-webhook-ca")
    impostor = ServingCert(tls.cert_pem(ca), a.cert_pem, a.key_pem)
    assert problem(impostor, NAMES, NOW) == "its signature does not verify against the stored CA"
    assert (problem(ServingCert(b"junk", a.cert_pem, a.key_pem), NAMES, NOW) or "").startswith(
        "unreadable"
    )


def test_written_files_chain_to_the_ca(tmp_path: Path) -> None:
    cert = new_cert(NAMES)
    crt, key = cert.write(tmp_path)
    assert crt.read_bytes() == cert.cert_pem + cert.ca_pem
    assert key.stat().st_mode & 0o777 == 0o600
