"""The pydantic models: examples round-trip, and every manifest the API server refuses is
refused locally too (the `plan` command and the webhook parse with these models)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from pcipt.api.v1alpha1 import (
    DeviceRequest,
    LabelSelector,
    NetworkRequest,
    PassthroughVM,
    PassthroughVMSpec,
    PciDevice,
    PciFlavor,
    SelectorRequirement,
    parse_vlan_range,
)
from tests.manifests import InvalidManifest, example_docs, invalid_manifests

MODELS: dict[str, type[pydantic.BaseModel]] = {
    "PciDevice": PciDevice,
    "PciFlavor": PciFlavor,
    "PassthroughVM": PassthroughVM,
}


@pytest.mark.parametrize(
    ("path", "doc"),
    [x for x in example_docs() if x[1]["kind"] in MODELS],
    ids=lambda x: getattr(x, "name", ""),
)
def test_examples_round_trip_through_the_models(path: object, doc: dict[str, Any]) -> None:
    model = MODELS[doc["kind"]].model_validate(doc)
    once = model.to_dict()  # type: ignore[attr-defined]
    again = MODELS[doc["kind"]].model_validate(once).to_dict()  # type: ignore[attr-defined]
    assert once == again
    assert once["metadata"]["name"] == doc["metadata"]["name"]


def _k8s_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "json-or-python")) and part not in ("str", "int"):
            out += ("." if out else "") + part
    return out


@pytest.mark.parametrize("bad", invalid_manifests(), ids=lambda m: m.id)
def test_models_refuse_what_the_api_server_refuses(bad: InvalidManifest) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        MODELS[bad.doc["kind"]].model_validate(bad.doc)
    paths = [_k8s_path(e["loc"]) for e in err.value.errors()]
    # pydantic reports model-level rules at the model, field rules at the field: either way the
    # location is the manifest's field or encloses it.
    want = bad.field if not bad.field.startswith("metadata.") else ""
    assert any(want.startswith(p) or p.startswith(want) for p in paths), (paths, bad.field)


def test_vlan_ranges() -> None:
    assert parse_vlan_range("100") == (100, 100)
    assert parse_vlan_range("100-199") == (100, 199)
    for bad in ("0", "4095", "1-5000", "a-b", "10-"):
        with pytest.raises(ValueError, match="VLAN"):
            parse_vlan_range(bad)


def test_selector_requirement_values_follow_the_operator() -> None:
    SelectorRequirement(key="k", operator="Exists")
    SelectorRequirement(key="k", operator="In", values=["a"])
    with pytest.raises(pydantic.ValidationError, match="values must be non-empty"):
        SelectorRequirement(key="k", operator="NotIn", values=[])
    with pytest.raises(pydantic.ValidationError, match="empty for Exists"):
        SelectorRequirement(key="k", operator="DoesNotExist", values=["a"])
    assert LabelSelector().is_empty()


def test_spec_lists_request_names_in_order() -> None:
    spec = PassthroughVMSpec(
        memory="1Gi",
        devices=[DeviceRequest(name="gpu", flavor="a100")],
        networks=[NetworkRequest(name="net", flavor="vf")],
    )
    assert spec.request_names() == ["gpu", "net"]


def test_python_names_map_to_the_wire_names() -> None:
    vm = PassthroughVM.model_validate(
        {"metadata": {"name": "x"}, "spec": {"memory": 1024, "placement": {"sameNUMA": []}}}
    )
    wire = vm.to_dict()
    assert wire["spec"]["placement"] == {"sameNUMA": []}
    flavor = PciFlavor.model_validate(
        {
            "metadata": {"name": "f"},
            "spec": {
                "deviceType": "gpu",
                "selector": {"vendorIDs": ["10de"]},
                "limits": {"maxPerVM": 2},
            },
        }
    )
    assert flavor.spec.selector.vendor_ids == ["10de"]
    assert flavor.to_dict()["spec"]["limits"] == {"maxPerVM": 2}


def test_unknown_fields_are_ignored_so_older_readers_keep_working() -> None:
    vm = PassthroughVM.model_validate(
        {"metadata": {"name": "x"}, "spec": {"memory": "1Gi", "futureField": 1}}
    )
    assert "futureField" not in vm.to_dict()["spec"]
