"""Building blocks of the pcipt API: the model base class, object metadata, conditions, label
selectors and the helpers that attach Kubernetes schema extensions (CEL rules, list types).

These are the types only. Matching a selector against labels lives in `pcipt.selectors`, and
turning models into CRDs in `pcipt.crdgen`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from pcipt.quantity import QuantityError, parse_quantity

# --- schema extension helpers -------------------------------------------------------------


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry: a CEL rule the API server checks at admission."""
    out = {"rule": rule}
    if message is not None:
        out["message"] = message
    if message_expression is not None:
        out["messageExpression"] = message_expression
    if field_path is not None:
        out["fieldPath"] = field_path
    if reason is not None:
        out["reason"] = reason
    return out


def cel_quote(text: str) -> str:
    """`text` as a double-quoted CEL string literal (backslashes and quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cel_matches(pattern: str) -> str:
    """A CEL rule that `self` matches the regular expression `pattern`."""
    return f"self.matches({cel_quote(pattern)})"


def cel_value_message(text: str) -> str:
    """A messageExpression that quotes the offending value before `text`: 'x' is not ..."""
    return f"{cel_quote(chr(39))} + self + {cel_quote(chr(39) + ' ' + text)}"


def k8s(
    *rules: dict[str, str],
    list_map_keys: list[str] | None = None,
    list_type: Literal["atomic", "set", "map"] | None = None,
    map_type: Literal["atomic", "granular"] | None = None,
    int_or_string: bool = False,
) -> dict[str, Any]:
    """Schema extensions for a field or model, for `json_schema_extra`."""
    out: dict[str, Any] = {}
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    if list_map_keys:
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = list_map_keys
    elif list_type:
        out["x-kubernetes-list-type"] = list_type
    if map_type:
        out["x-kubernetes-map-type"] = map_type
    if int_or_string:
        out["x-kubernetes-int-or-string"] = True
    return out


# --- base model ---------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, snake_case in Python, docstrings as docs.

    Unknown fields are ignored rather than refused: the API server prunes them anyway, and an
    older component must keep reading objects written by a newer one.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
    )

    def to_dict(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, absent fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- shared field types --------------------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

RequestName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        json_schema_extra=k8s(
            cel(
                cel_matches(DNS_LABEL_PATTERN),
                message_expression=cel_value_message(
                    "is not a valid name: use lower-case letters, digits and '-', starting and "
                    "ending with a letter or digit (a DNS label)"
                ),
            )
        ),
    ),
]
"""A request, disk or network name: a DNS label, unique within its VM."""


def check_quantity(value: int | str) -> int | str:
    """Pydantic twin of QUANTITY_RULE."""
    try:
        q = parse_quantity(value)
    except QuantityError as e:
        raise ValueError(str(e)) from e
    if q <= 0:
        raise ValueError(f"{value!r} must be a positive quantity, e.g. 4Gi")
    return value


QUANTITY_RULE = cel(
    "type(self) == int ? self > 0 : "
    "(isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))",
    message="must be a positive quantity such as 4Gi, 512Mi or 8G",
)


# --- metadata, conditions, selectors ---------------------------------------------------------


class ObjectMeta(ApiModel):
    """The parts of Kubernetes object metadata that pcipt reads. Never generated into CRDs."""

    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One aspect of an object's state, in the form of Kubernetes' metav1.Condition."""

    type: str = Field(max_length=316)
    """CamelCase name of the aspect, such as Ready or Scheduled."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(default="", max_length=1024)
    """CamelCase reason for the last transition, for programs."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail of the last transition, for people."""
    last_transition_time: datetime | None = None
    """When status last changed."""
    observed_generation: int | None = None
    """The object's metadata.generation that this condition was set against."""


Conditions = Annotated[
    list[Condition],
    Field(default_factory=list, json_schema_extra=k8s(list_map_keys=["type"])),
]


SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class SelectorRequirement(ApiModel):
    """A requirement on one key: `key In (a, b)`, `key Exists` and so on."""

    model_config = ConfigDict(
        json_schema_extra=k8s(
            cel(
                "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                message=(
                    "values must be non-empty for In and NotIn, and empty for Exists and "
                    "DoesNotExist"
                ),
            )
        )
    )

    key: str = Field(min_length=1, max_length=317)
    """The label or attribute key the requirement applies to."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[Annotated[str, Field(max_length=256)]] | None = Field(default=None, max_length=64)
    """The values for In and NotIn; empty for Exists and DoesNotExist."""

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"
            )
        return self


class LabelSelector(ApiModel):
    """Kubernetes-style selector: every matchLabels pair and every expression must hold.

    An empty selector matches everything.
    """

    match_labels: dict[str, str] | None = None
    """Exact key=value pairs that must all be present."""
    match_expressions: list[SelectorRequirement] | None = Field(default=None, max_length=32)
    """Requirements that must all hold."""

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


class ResourceKind(ApiModel):
    """Base of the three top-level kinds: apiVersion, kind, metadata, and CRD facts."""

    # Facts for pcipt.crdgen: what the CRD looks like beyond the schema.
    crd_plural: ClassVar[str]
    crd_scope: ClassVar[Literal["Cluster", "Namespaced"]]
    crd_short_names: ClassVar[list[str]]
    crd_printer_columns: ClassVar[list[dict[str, Any]]]
    crd_validations: ClassVar[list[dict[str, str]]] = []
    crd_selectable_fields: ClassVar[list[str]] = []
    """JSON paths `kubectl get --field-selector` (and watches) may select on."""
    crd_description: ClassVar[str]

    api_version: str = ""
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


def printer_column(
    name: str,
    json_path: str,
    *,
    type: str = "string",
    description: str = "",
    priority: int = 0,
) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "type": type, "jsonPath": json_path}
    if description:
        col["description"] = description
    if priority:
        col["priority"] = priority
    return col
