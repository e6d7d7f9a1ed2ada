"""Loaders for the manifests tests apply: examples/ and the invalid corpus in tests/data/invalid.

Each invalid manifest starts with two comment lines naming the field the API server must
blame and a piece of the message it must give:
    # field: spec.devices[0].count
    # error: should be greater than or equal to 1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
INVALID = Path(__file__).resolve().parent / "data" / "invalid"


@dataclass(frozen=True)
class InvalidManifest:
    path: Path
    field: str
    error: str
    doc: dict[str, Any]

    @property
    def id(self) -> str:
        return self.path.stem


def invalid_manifests() -> list[InvalidManifest]:
    out = []
    for path in sorted(INVALID.glob("*.yaml")):
        text = path.read_text()
        meta = dict(
            line[2:].split(": ", 1)
            for line in text.splitlines()
            if line.startswith("# ") and ": " in line
        )
        out.append(InvalidManifest(path, meta["field"], meta["error"], yaml.safe_load(text)))
    return out


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def example_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in example_files() for d in yaml.safe_load_all(p.read_text()) if d]
