"""The chart explains itself: every value in values.yaml is documented by a comment above it,
and values.yaml and values.schema.json describe the same keys (the schema refuses any other).
helm itself (lint, schema refusals) is exercised in tests/e2e/test_chart.py."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from nodeplugin.devicespec import Entry, Match, NodeConfig, NodeGroup
from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "charts" / "pcipt"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w]*):")


def _node(path: tuple[str, ...]) -> dict[str, Any]:
    node = SCHEMA
    for part in path:
        node = node["properties"][part]
    return node


def _is_group(path: tuple[str, ...]) -> bool:
    """A key that only groups other documented keys; `resources` has properties too, but it
    is one Kubernetes value."""
    return "properties" in _node(path) and path[-1] != "resources"


def value_keys() -> list[tuple[tuple[str, ...], bool]]:
    """(path, has a comment right above) for every key of values.yaml down to the values the
    schema knows; the insides of a value (resources.requests.cpu) are the value's."""
    out = []
    stack: list[tuple[int, str]] = []
    lines = VALUES_TEXT.splitlines()
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = tuple(k for _, k in stack)
        if parent and not _is_group(parent):
            continue  # inside a value
        path = (*parent, m["key"])
        out.append((path, i > 0 and lines[i - 1].strip().startswith("#")))
        stack.append((indent, m["key"]))
    return out


def schema_paths(node: dict[str, Any] = SCHEMA, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for name, sub in node.get("properties", {}).items():
        if (*path, name) == ("global",):
            continue  # helm's own
        out.add((*path, name))
        if _is_group((*path, name)):
            out |= schema_paths(sub, (*path, name))
    return out


def test_every_value_is_documented() -> None:
    keys = value_keys()
    undocumented = [".".join(p) for p, commented in keys if not _is_group(p) and not commented]
    assert undocumented == []


def test_values_and_schema_name_the_same_keys() -> None:
    in_values = {p for p, _ in value_keys()}
    assert in_values == schema_paths()


def test_values_yaml_is_what_the_schema_describes() -> None:
    values = yaml.safe_load(VALUES_TEXT)

    def walk(v: Any, node: dict[str, Any], where: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert isinstance(v, dict), where
            if node.get("additionalProperties") is False:
                assert set(v) <= set(node["properties"]), where
            for k, sub in v.items():
                if k in node["properties"]:
                    walk(sub, node["properties"][k], f"{where}.{k}")
        elif "enum" in node:
            assert v in node["enum"], where

    walk(values, SCHEMA, "values")


def test_every_object_is_closed_but_kubernetes_passthroughs() -> None:
    """Unknown keys fail: each object with properties forbids others."""

    def walk(node: dict[str, Any], where: str) -> list[str]:
        bad = []
        if "properties" in node and node.get("additionalProperties") is not False:
            bad.append(where)
        for k, sub in node.get("properties", {}).items():
            bad += walk(sub, f"{where}.{k}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                bad += walk(node[key], f"{where}.{key}")
        for i, alt in enumerate(node.get("oneOf", [])):
            bad += walk(alt, f"{where}.oneOf[{i}]")
        return bad

    assert walk(SCHEMA, "values") == []


def test_device_spec_schema_names_the_node_plugins_fields() -> None:
    """The chart's schema for deviceSpecs follows the node plugin's own models, so a field the
    plugin would refuse is refused at `helm install` already."""
    specs = _node(("deviceSpecs",))

    def aliases(model: Any) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()}

    entry = specs["properties"]["devices"]["items"]
    assert set(entry["properties"]) == aliases(Entry)
    assert set(entry["properties"]["match"]["properties"]) == aliases(Match)
    group = specs["properties"]["nodeGroups"]["items"]
    assert set(group["properties"]) == aliases(NodeGroup)
    assert set(specs["properties"]) == aliases(NodeConfig) - {"apiVersion", "kind"}
