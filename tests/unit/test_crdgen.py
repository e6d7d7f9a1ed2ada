"""crdgen: the committed CRDs match the models, and every generated schema is structural,
documented and cheap enough for CEL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pcipt import constants as c
from pcipt import crdgen
from pcipt.api.v1alpha1 import KINDS, PassthroughVM, ResourceKind

FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "nullable", "title"}


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")


def _schema(kind: type[ResourceKind]) -> dict[str, Any]:
    return crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def test_committed_crds_and_api_reference_match_the_models() -> None:
    assert crdgen.check(crdgen.DEFAULT_OUT) == [], "run `python -m pcipt.crdgen`"
    assert crdgen.DOCS_FILE.read_text() == crdgen.render_docs(), "run `python -m pcipt.crdgen`"


def test_the_charts_crds_are_the_same_crds_kept_on_uninstall() -> None:
    assert crdgen.check(crdgen.CHART_OUT, chart=True) == [], "run `python -m pcipt.crdgen`"
    plain, chart = crdgen.rendered_files(), crdgen.rendered_files(chart=True)
    assert plain.keys() == chart.keys()
    for name, text in chart.items():
        guard = crdgen.ADMISSION_GUARD if name == crdgen.ADMISSION_FILE else crdgen.CHART_GUARD
        guard_open, guard_close = guard
        assert text.startswith(guard_open) and text.endswith(guard_close)
        docs = list(yaml.safe_load_all(text.removeprefix(guard_open).removesuffix(guard_close)))
        if name == crdgen.ADMISSION_FILE:
            # The finalizer policy goes with the chart: nothing would take the finalizer off
            # once the controller is uninstalled.
            assert all("annotations" not in d["metadata"] for d in docs)
        else:
            (doc,) = docs
            assert doc["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert docs == list(yaml.safe_load_all(plain[name])), name


def test_every_vm_gets_the_release_finalizer_at_creation_and_only_then() -> None:
    policy, binding = crdgen.admission_policies()
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {
            "apiGroups": ["pcipt.io"],
            "apiVersions": ["*"],
            "operations": ["CREATE"],  # never UPDATE: the controller removes it on deletion
            "resources": ["passthroughvms"],
        }
    ]
    assert c.FINALIZER_RELEASE in policy["spec"]["mutations"][0]["applyConfiguration"]["expression"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    vm = crdgen.crd(PassthroughVM)["spec"]["versions"][0]
    assert vm["selectableFields"] == [{"jsonPath": ".status.nodeName"}]
    assert c.FIELD_VM_NODE == "status.nodeName"


def test_default_check_covers_crds_and_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert crdgen.main(["--check"]) == 0
    assert str(crdgen.CHART_OUT) in capsys.readouterr().out


def test_api_reference_lists_every_field_and_rule_message() -> None:
    docs = crdgen.render_docs()
    assert "| `spec.networks[].vlan` | integer |" in docs
    assert "'<value>' is not a unicast MAC address" in docs
    assert "request names must be unique across devices and networks" in docs


def test_check_reports_drift_missing_and_stray_files(tmp_path: Path) -> None:
    crdgen.write(tmp_path)
    assert crdgen.check(tmp_path) == []
    edited = tmp_path / "pcipt.io_pcidevices.yaml"
    edited.write_text(edited.read_text().replace("description:", "description: edited", 1))
    (tmp_path / "pcipt.io_gadgets.yaml").write_text("kind: CustomResourceDefinition\n")
    problems = crdgen.check(tmp_path)
    assert any("edited" in p for p in problems)
    assert any("no model generates" in p for p in problems)
    (tmp_path / "pcipt.io_pciflavors.yaml").unlink()
    assert len(crdgen.check(tmp_path)) == 3


def test_cli_check_exits_nonzero_on_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 0
    next(tmp_path.iterdir()).write_text("# hand-edited\n")
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_rendering_is_byte_for_byte_deterministic() -> None:
    assert crdgen.rendered_files() == crdgen.rendered_files()
    for text in crdgen.rendered_files().values():
        assert text.startswith(crdgen.HEADER)
        assert "&id" not in text, "YAML anchors make CRDs hard to read"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_schema_is_structural(kind: type[ResourceKind]) -> None:
    for path, node in _nodes(_schema(kind)):
        assert not (FORBIDDEN_KEYS & node.keys()), (
            f"{kind.__name__}{path}: {FORBIDDEN_KEYS & node.keys()}"
        )
        assert "type" in node or node.get("x-kubernetes-int-or-string"), (
            f"{kind.__name__}{path} has no type"
        )
        if node.get("type") == "object" and path != ".metadata":  # the API server owns metadata
            assert {
                "properties",
                "additionalProperties",
                "x-kubernetes-preserve-unknown-fields",
            } & node.keys(), path
        if node.get("type") == "array":
            assert "items" in node, path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_every_field_is_documented(kind: type[ResourceKind]) -> None:
    for path, node in _nodes(_schema(kind)):
        if path in ("", ".metadata") or path.endswith(("[]", ".*")):
            continue
        assert node.get("description"), (
            f"{kind.__name__}{path} has no description (kubectl explain)"
        )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_cel_nodes_are_bounded_and_carry_one_message(kind: type[ResourceKind]) -> None:
    spec = _schema(kind)["properties"]["spec"]
    for path, node in _nodes(spec, ".spec"):
        for rule in node.get("x-kubernetes-validations", []):
            assert "message" in rule or "messageExpression" in rule, f"{path}: {rule['rule']}"
        if node.get("x-kubernetes-validations"):
            assert "pattern" not in node, f"{path}: a CEL rule replaces the pattern"
            if node.get("type") == "string":
                assert "maxLength" in node, f"{path}: CEL on an unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list makes CEL cost estimates explode"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_status_has_no_defaults(kind: type[ResourceKind]) -> None:
    for path, node in _nodes(_schema(kind)["properties"]["status"], ".status"):
        assert "default" not in node, path


def test_optional_fields_are_pruned_not_nullable() -> None:
    vm = _schema(KINDS[2])["properties"]["spec"]["properties"]["devices"]["items"]["properties"]
    assert vm["numaPolicy"]["enum"] == ["none", "preferred", "required"]
    assert "nullable" not in vm["numaPolicy"]


def test_quantity_becomes_int_or_string() -> None:
    memory = _schema(KINDS[2])["properties"]["spec"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and "type" not in memory


def test_unsupported_union_is_refused() -> None:
    class Odd(BaseModel):
        x: int | list[int]

    schema = Odd.model_json_schema()
    with pytest.raises(crdgen.SchemaError, match="no structural schema form"):
        crdgen.structural(schema, {}, in_status=False, path="odd")
