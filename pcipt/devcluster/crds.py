"""Install pcipt's CRDs into a cluster and wait until the API server serves them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from pcipt import constants as c

CRD_DIR = Path(__file__).resolve().parent.parent.parent / "crds"
APPLY_PATCH = "application/apply-patch+yaml"


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
        if d.get("kind") != "CustomResourceDefinition":
            raise CrdError(f"{folder} holds a {d.get('kind')}, not only CRDs")
    return docs


def apply_crds(api: client.ApiClient, folder: Path = CRD_DIR, timeout: float = 60.0) -> list[str]:
    """Server-side apply every CRD in `folder` and wait until each is Established."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for doc in load_crds(folder):
        name = doc["metadata"]["name"]
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
    return names
