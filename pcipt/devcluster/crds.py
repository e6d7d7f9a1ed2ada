"""Install pcipt's CRDs into a cluster and wait until the API server serves them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client

from pcipt import constants as c

CRD_DIR = Path(__file__).resolve().parent.parent.parent / "crds"
APPLY_PATCH = "application/apply-patch+yaml"
# What crds/ may hold: the CRDs, and the admission policies that belong to them.
KINDS: dict[str, str | None] = {
    "CustomResourceDefinition": None,
    "MutatingAdmissionPolicy": "mutatingadmissionpolicies",
    "MutatingAdmissionPolicyBinding": "mutatingadmissionpolicybindings",
}


class CrdError(RuntimeError):
    """The CRDs are missing or did not become Established."""


def load_crds(folder: Path = CRD_DIR) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise CrdError(
            f"no CRDs in {folder}: run `python -m pcipt.crdgen` to generate them from the models"
        )
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    for d in docs:
        if d.get("kind") not in KINDS:
            raise CrdError(f"{folder} holds a {d.get('kind')}, not only CRDs and their policies")
    return docs


def apply_crds(api: client.ApiClient, folder: Path = CRD_DIR, timeout: float = 60.0) -> list[str]:
    """Server-side apply every CRD (and admission policy) in `folder`; wait until each CRD is
    Established and the policy applies."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    docs = load_crds(folder)
    for doc in docs:
        name = doc["metadata"]["name"]
        if (plural := KINDS[doc["kind"]]) is not None:
            group, version = doc["apiVersion"].split("/")
            client.CustomObjectsApi(api).patch_cluster_custom_object(
                group,
                version,
                plural,
                name,
                doc,
                field_manager=f"{c.FIELD_MANAGER_CONTROLLER}-crds",
                force=True,
                _content_type=APPLY_PATCH,
            )
            continue
        names.append(name)
        ext.patch_custom_resource_definition(
            name,
            doc,
            field_manager=f"{c.FIELD_MANAGER_CONTROLLER}-crds",
            force=True,
            _content_type=APPLY_PATCH,
        )
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            status = ext.read_custom_resource_definition(name).status
            conds = {x.type: x.status for x in (status.conditions if status else None) or []}
            if conds.get("Established") == "True" and conds.get("NamesAccepted") == "True":
                pending.discard(name)
        if pending:
            if time.monotonic() > deadline:
                raise CrdError(f"CRDs not Established within {timeout:.0f}s: {sorted(pending)}")
            time.sleep(0.1)
    if any(d["kind"] == "MutatingAdmissionPolicy" for d in docs):
        _wait_for_admission(api, deadline)
    return names


def _wait_for_admission(api: client.ApiClient, deadline: float) -> None:
    """Until the API server enforces the finalizer policy (it loads policies a moment after they
    are written): a VM created before then would go without it. Asked with a dry run."""
    probe = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_PASSTHROUGHVM,
        "metadata": {"generateName": "pcipt-policy-probe-"},
        "spec": {"memory": "64Mi"},
    }
    objects = client.CustomObjectsApi(api)
    while True:
        try:
            got = cast(
                dict[str, Any],
                objects.create_namespaced_custom_object(
                    c.GROUP, c.VERSION, "default", c.PLURAL_PASSTHROUGHVM, probe, dry_run="All"
                ),
            )
            if c.FINALIZER_RELEASE in (got.get("metadata", {}).get("finalizers") or []):
                return
        except client.ApiException as e:
            if e.status not in (404, 503):  # the CRD is not served yet
                raise
        if time.monotonic() > deadline:
            raise CrdError("the API server does not apply the finalizer policy")
        time.sleep(0.1)
