"""The node's device specs: which of the host's PCI functions are offered, and the facts nobody
can discover (the physical network a port is cabled to, trust, free attributes).

PURE: a config (YAML/JSON text, or a nova.conf) and a discovered host in; for each function,
whether to publish it and with which attributes, out. Nothing is published that no entry
matches. Entries are tried in order and the first match wins: the native `devices` entries,
then `novaDeviceSpecs`. `nodeGroups` carry entries for the nodes their selector picks; on such a
node each group's `devices` follow the top-level ones and its `novaDeviceSpecs` follow the
top-level Nova specs, in file order.

Nova's `[pci] device_spec` entries are accepted as they are, with Nova's semantics:
- `vendor_id`/`product_id`: hex up to ffff, or `*`; absent means any;
- `address` as a string is a glob: `[[[domain]:]bus]:][slot][.function]`, each field hex or
  `*`, missing fields any (`*:0a:00.*`, `:0a:00.`, `0a:00.1`); as a map, per-field regular
  expressions (`domain`, `bus`, `slot`, `function`, default `.*`) matched at the start of the
  zero-padded hex field, as Nova's `re.match` does;
- a single address that is an SR-IOV PF also matches the PF's VFs; `devname` names a network
  interface, and when that is a PF's, matches its VFs too;
- every other key (`physical_network`, `trusted`, `remote_managed`, `resource_class`, ...)
  is a tag and becomes an attribute; `physical_network` also sets the device's physical
  network;
- refused like Nova refuses them: a spec that is not a JSON object (or list of objects), an ID
  that is not hex or exceeds ffff, an address field out of range or not hex, more than three
  ':'-separated fields, a bad regular expression, `address` together with `devname`, and
  `remote_managed: true` on a PF.
"""

from __future__ import annotations

import fnmatch
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nodeplugin.discovery import HostInventory, PciFunction
from pcipt.api.v1alpha1 import LabelSelector
from pcipt.pci import PciAddress
from pcipt.selectors import PHYSNET_ATTRIBUTE, label_selector_matches

TRUE_STRINGS = {"1", "t", "true", "on", "y", "yes"}
FALSE_STRINGS = {"0", "f", "false", "off", "n", "no"}


class DeviceSpecError(ValueError):
    """A config that cannot be used; the message names the entry and the field."""


# --- the native format ----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AddressFields(_Strict):
    """Per-field regular expressions over the zero-padded hex fields, matched in full."""

    domain: str = ".*"
    bus: str = ".*"
    slot: str = ".*"
    function: str = ".*"

    @field_validator("domain", "bus", "slot", "function")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from e
        return v


class Match(_Strict):
    """What a function must be for the entry to apply. Set fields AND together."""

    vendor_id: str | None = Field(default=None, alias="vendorID")
    product_id: str | None = Field(default=None, alias="productID")
    class_code: str | None = Field(default=None, alias="classCode")
    driver: str | None = None
    address: str | AddressFields | None = None
    netdev: str | None = None
    """A netdev name (`ens1f0`), or a PF's with a VF range (`ens1f0#0-7`, `ens1f0#0,2,4-5`)."""
    sriov_role: Literal["PF", "VF", "None"] | None = Field(default=None, alias="sriovRole")
    numa_node: int | None = Field(default=None, alias="numaNode")

    @field_validator("vendor_id", "product_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and v != "*" and not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,4}", v):
            raise ValueError(f"{v!r} is not a PCI ID: use up to 4 hex digits, or *")
        return v

    @field_validator("class_code")
    @classmethod
    def _class(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(
            r"[0-9a-fA-F]{2}([0-9a-fA-F]{2}([0-9a-fA-F]{2})?)?", v
        ):
            raise ValueError(f"{v!r} is not a class-code prefix of 2, 4 or 6 hex digits")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | AddressFields | None) -> str | AddressFields | None:
        if isinstance(v, str) and not re.fullmatch(r"[0-9a-fA-F*?:.\[\]\-!]+", v):
            raise ValueError(f"{v!r} is not an address or address glob such as 0000:3b:*.*")
        return v

    @field_validator("netdev")
    @classmethod
    def _netdev(cls, v: str | None) -> str | None:
        if v is not None:
            parse_netdev_range(v)
        return v


class Entry(_Strict):
    """One rule: which functions it offers, on which nodes, with what facts."""

    name: str | None = None
    match: Match
    node_selector: LabelSelector | None = Field(default=None, alias="nodeSelector")
    """Apply on nodes whose labels match (every node carries kubernetes.io/hostname)."""
    physical_network: str | None = Field(default=None, alias="physicalNetwork")
    trusted: bool | None = None
    """VFs it offers may be given to networks asking for a trusted VF."""
    managed: bool | None = None
    """False: the admin binds these devices to vfio-pci (or a vendor's vfio-pci variant)
    and pcipt never rebinds them; a device found on another driver is published Unhealthy."""
    one_time_use: bool | None = Field(default=None, alias="oneTimeUse")
    """After a VM releases it the device stays reserved (cordoned) until an admin frees it."""
    live_migratable: bool | None = Field(default=None, alias="liveMigratable")
    attributes: dict[str, str] = Field(default_factory=dict)


class VfRule(_Strict):
    """How many VFs the SR-IOV PFs it matches should have. The node plugin makes them through
    sriov_numvfs, and changes the count only while no VF of that PF is claimed (the kernel
    changes a count only through 0, which removes every VF)."""

    name: str | None = None
    match: Match
    count: int = Field(ge=0, le=4096)
    """VFs to have; at most the PF's sriov_totalvfs."""
    node_selector: LabelSelector | None = Field(default=None, alias="nodeSelector")


class NodeGroup(_Strict):
    """Entries for the nodes a selector picks (the chart's values map onto these)."""

    name: str = Field(min_length=1)
    node_selector: LabelSelector = Field(alias="nodeSelector")
    devices: list[Entry] = Field(default_factory=list)
    vfs: list[VfRule] = Field(default_factory=list)
    nova_device_specs: list[str | dict[str, Any]] = Field(
        default_factory=list, alias="novaDeviceSpecs"
    )


class NodeConfig(_Strict):
    """The whole file."""

    api_version: str | None = Field(default=None, alias="apiVersion")
    kind: str | None = None
    devices: list[Entry] = Field(default_factory=list)
    nova_device_specs: list[str | dict[str, Any]] = Field(
        default_factory=list, alias="novaDeviceSpecs"
    )
    vfs: list[VfRule] = Field(default_factory=list)
    """VF counts of SR-IOV PFs; the first rule that matches a PF decides."""
    node_groups: list[NodeGroup] = Field(default_factory=list, alias="nodeGroups")


def parse_netdev_range(text: str) -> tuple[str, set[int] | None]:
    """`ens1f0#0-3,6` -> ('ens1f0', {0, 1, 2, 3, 6}); `ens1f0` -> ('ens1f0', None)."""
    name, sep, ranges = text.partition("#")
    if not name:
        raise ValueError(f"{text!r} names no interface")
    if not sep:
        return name, None
    out: set[int] = set()
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"{text!r}: {part!r} is not a VF index or range such as 0-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{text!r}: range {part!r} runs backwards")
        out.update(range(lo, hi + 1))
    return name, out


# --- Nova's format ------------------------------------------------------------------------


_HEX_FIELDS = {"domain": (0xFFFF, 4), "bus": (0xFF, 2), "slot": (0x1F, 2), "function": (0x7, 1)}


def _nova_hex(value: str, what: str, maxval: int, width: int) -> str:
    value = value.strip()
    if value == "*":
        return "*"
    try:
        n = int(value, 16)
    except ValueError:
        raise DeviceSpecError(f"{what} ({value!r}) does not parse as a hex number") from None
    if n > maxval:
        raise DeviceSpecError(
            f"{what} ({value}) is greater than the maximum allowable value ({maxval:X})"
        )
    return f"{n:0{width}x}"


@dataclass(frozen=True)
class NovaAddress:
    kind: Literal["glob", "regex"]
    fields: tuple[str, str, str, str]
    """domain, bus, slot, function: hex or * (glob), or regular expressions (regex)"""

    def is_single(self) -> bool:
        """Names one address: every field plain hex (a regex map of plain hex fields too, as
        Nova's `is_single_address` reads it)."""
        return all(f and all(c in string.hexdigits for c in f) for f in self.fields)

    def single(self) -> str | None:
        """The address it names, written as sysfs writes addresses, when it names one."""
        if not self.is_single():
            return None
        d, b, s, fn = self.fields
        return f"{d}:{b}:{s}.{fn}"

    def matches(self, address: str) -> bool:
        a = PciAddress.parse(address)
        have = (f"{a.domain:04x}", f"{a.bus:02x}", f"{a.device:02x}", f"{a.function:x}")
        if self.kind == "glob":
            return all(w in ("*", h) for w, h in zip(self.fields, have, strict=True))
        return all(re.match(w, h) is not None for w, h in zip(self.fields, have, strict=True))


def parse_nova_address(value: Any, where: str) -> NovaAddress:
    if isinstance(value, dict):
        fields = []
        for key in ("domain", "bus", "slot", "function"):
            pattern = str(value.get(key, ".*"))
            try:
                re.compile(pattern)
            except re.error as e:
                raise DeviceSpecError(
                    f"{where}: address.{key} {pattern!r} is not a regular expression: {e}"
                ) from e
            fields.append(pattern)
        return NovaAddress("regex", (fields[0], fields[1], fields[2], fields[3]))
    if not isinstance(value, str):
        raise DeviceSpecError(
            f"{where}: address must be a string or a map, not {type(value).__name__}"
        )
    dbs, _, func = value.partition(".")
    f = _nova_hex(func, f"{where}: address function", 0x7, 1) if func.strip() else "*"
    d = b = s = "*"
    if dbs:
        parts = dbs.split(":")
        if len(parts) > 3:
            raise DeviceSpecError(
                f"{where}: address {value!r} has more than domain:bus:slot before the '.'"
            )
        parts = ["*"] * (3 - len(parts)) + parts
        d, b, s = (
            _nova_hex(p.strip() or "*", f"{where}: address {name}", *_HEX_FIELDS[name])
            for p, name in zip(parts, ("domain", "bus", "slot"), strict=True)
        )
    return NovaAddress("glob", (d, b, s, f))


@dataclass(frozen=True)
class NovaSpec:
    index: int
    where: str
    """How messages and `discover` name it: novaDeviceSpecs[2], nodeGroups[0].novaDeviceSpecs[1]."""
    source: str
    vendor_id: str
    product_id: str
    address: NovaAddress | None
    devname: str | None
    tags: dict[str, str]


def parse_nova_spec(
    raw: str | Mapping[str, Any], index: int, prefix: str = "novaDeviceSpecs"
) -> list[NovaSpec]:
    """One `device_spec` value (a JSON object, or a list of them) -> specs."""
    where = f"{prefix}[{index}]"
    if isinstance(raw, str):
        try:
            doc: Any = json.loads(raw)
        except ValueError:
            raise DeviceSpecError(f"{where}: invalid entry {raw!r}: not JSON") from None
    else:
        doc = dict(raw)
    docs = doc if isinstance(doc, list) else [doc]
    if not isinstance(doc, (list, dict)):
        raise DeviceSpecError(f"{where}: invalid entry {raw!r}: expecting a list or an object")
    out = []
    for j, d in enumerate(docs):
        at = where if len(docs) == 1 else f"{where}[{j}]"
        if not isinstance(d, dict):
            raise DeviceSpecError(f"{at}: invalid entry {d!r}: expecting an object")
        keys = dict(d)
        vendor = _nova_hex(str(keys.pop("vendor_id", "*")), f"{at}: vendor_id", 0xFFFF, 4)
        product = _nova_hex(str(keys.pop("product_id", "*")), f"{at}: product_id", 0xFFFF, 4)
        # Nova reads both as "not given" when empty or null.
        devname = keys.pop("devname", None) or None
        address_raw = keys.pop("address", None)
        if devname is not None and address_raw is not None:
            raise DeviceSpecError(f"{at}: a spec can name devname or address, but not both")
        address = parse_nova_address(address_raw, at) if address_raw is not None else None
        # A null tag is no tag: `"physical_network": null` means no physical network (the
        # device is not for a Neutron physnet), not one called "None".
        tags = {str(k): _tag(v) for k, v in keys.items() if v is not None}
        for name in BOOLEAN_TAGS:
            if name in tags:
                tags[name] = _nova_bool(tags[name], f"{at}: tag {name}")
        out.append(
            NovaSpec(
                index,
                where,
                json.dumps(doc) if not isinstance(raw, str) else raw,
                vendor,
                product,
                address,
                str(devname) if devname is not None else None,
                tags,
            )
        )
    return out


BOOLEAN_TAGS = ("managed", "live_migratable", "one_time_use")
"""Tags Nova normalises to "true"/"false", refusing any other value."""


def _nova_bool(value: str, what: str) -> str:
    v = value.strip().lower()
    if v in TRUE_STRINGS:
        return "true"
    if v in FALSE_STRINGS:
        return "false"
    raise DeviceSpecError(
        f"{what} ({value!r}) is not a boolean: use one of "
        f"{', '.join(sorted(TRUE_STRINGS))} or {', '.join(sorted(FALSE_STRINGS))}"
    )


def _tag(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


NOVA_SPEC_OPTIONS = {
    ("pci", "device_spec"),
    ("pci", "passthrough_whitelist"),
    ("default", "pci_passthrough_whitelist"),
}


def nova_conf_specs(text: str) -> list[str]:
    """Every `device_spec` value of a nova.conf (and of its older names: `[pci]
    passthrough_whitelist`, `[DEFAULT] pci_passthrough_whitelist`), in order; oslo.config
    repeats a multi-valued option's key, and continues a value on indented lines."""
    values: list[str] = []
    section = None
    current: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if current is not None and line[:1] in (" ", "\t") and stripped:
            current.append(stripped)
            continue
        if current is not None:
            values.append(" ".join(current))
            current = None
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip().lower()
            continue
        if "=" not in stripped:
            continue
        key, _, value = stripped.partition("=")
        # [pci] device_spec, its older name [pci] passthrough_whitelist, and the oldest,
        # [DEFAULT] pci_passthrough_whitelist, which oslo.config still reads as deprecated.
        if (section, key.strip()) in NOVA_SPEC_OPTIONS:
            current = [value.strip()]
    if current is not None:
        values.append(" ".join(current))
    return [v for v in values if v]


# --- loading -----------------------------------------------------------------------------


@dataclass
class GroupSpecs:
    name: str
    node_selector: LabelSelector
    entries: list[Entry]
    nova: list[NovaSpec]
    vfs: list[VfRule] = field(default_factory=list)


@dataclass
class DeviceSpecs:
    """A parsed, validated config, ready to match."""

    entries: list[Entry] = field(default_factory=list)
    nova: list[NovaSpec] = field(default_factory=list)
    groups: list[GroupSpecs] = field(default_factory=list)
    vfs: list[VfRule] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.entries and not self.nova and not self.groups and not self.vfs

    def for_node(self, node_labels: Mapping[str, str]) -> DeviceSpecs:
        """The entries that apply on a node with these labels, groups folded in."""
        picked = [g for g in self.groups if label_selector_matches(g.node_selector, node_labels)]
        return DeviceSpecs(
            entries=self.entries + [e for g in picked for e in g.entries],
            nova=self.nova + [s for g in picked for s in g.nova],
            vfs=[
                r
                for r in self.vfs + [r for g in picked for r in g.vfs]
                if r.node_selector is None or label_selector_matches(r.node_selector, node_labels)
            ],
        )


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def load_specs(text: str | None = None, *, nova_conf: str | None = None) -> DeviceSpecs:
    """Parse a node config (YAML or JSON) and/or a nova.conf. Raises DeviceSpecError naming the
    entry and the field of the first problem."""
    specs = DeviceSpecs()
    if text is not None and text.strip():
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DeviceSpecError(f"the config is not YAML or JSON: {e}") from e
        if doc is not None:
            if not isinstance(doc, dict):
                raise DeviceSpecError(
                    "the config must be a map with `devices` and/or `novaDeviceSpecs`"
                )
            try:
                cfg = NodeConfig.model_validate(doc)
            except ValidationError as e:
                first = e.errors()[0]
                path = _field_path(first["loc"])
                name = _entry_name(doc, first["loc"])
                raise DeviceSpecError(f"{path}{name}: {first['msg']}") from e
            specs.entries = cfg.devices
            specs.vfs = cfg.vfs
            for i, raw in enumerate(cfg.nova_device_specs):
                specs.nova.extend(parse_nova_spec(raw, i))
            seen: set[str] = set()
            for g, group in enumerate(cfg.node_groups):
                if group.name in seen:
                    raise DeviceSpecError(
                        f"nodeGroups[{g}].name: {group.name!r} is used by an earlier group"
                    )
                seen.add(group.name)
                prefix = f"nodeGroups[{g}]"
                nova = [
                    s
                    for i, raw in enumerate(group.nova_device_specs)
                    for s in parse_nova_spec(raw, i, f"{prefix}.novaDeviceSpecs")
                ]
                entries = [
                    e if e.name else e.model_copy(update={"name": f"{prefix}.devices[{i}]"})
                    for i, e in enumerate(group.devices)
                ]
                specs.groups.append(
                    GroupSpecs(group.name, group.node_selector, entries, nova, group.vfs)
                )
    if nova_conf is not None:
        offset = len({s.index for s in specs.nova})
        for i, raw in enumerate(nova_conf_specs(nova_conf)):
            specs.nova.extend(parse_nova_spec(raw, offset + i))
    return specs


def _entry_name(doc: Mapping[str, Any], loc: Sequence[int | str]) -> str:
    """` (entry 'a100')` when the problem is inside a named devices entry, top-level or in a
    group."""
    start = 2 if len(loc) >= 2 and loc[0] == "nodeGroups" else 0
    if len(loc) >= start + 2 and loc[start] == "devices" and isinstance(loc[start + 1], int):
        try:
            holder = doc["nodeGroups"][loc[1]] if start else doc
            name = holder["devices"][loc[start + 1]].get("name")
        except (KeyError, IndexError, AttributeError, TypeError):
            return ""
        return f" (entry {name!r})" if name else ""
    return ""


# --- matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether a function is offered, by which entry, and with which facts."""

    address: str
    publish: bool
    entry: str = ""
    physical_network: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


def _norm_id(v: str) -> str:
    v = v.lower().removeprefix("0x")
    return v.zfill(4)


def _matches_native(m: Match, f: PciFunction, host: HostInventory) -> bool:
    if m.vendor_id not in (None, "*") and _norm_id(m.vendor_id) != f.vendor_id:
        return False
    if m.product_id not in (None, "*") and _norm_id(m.product_id) != f.product_id:
        return False
    if m.class_code is not None and not f.class_code.startswith(m.class_code.lower()):
        return False
    if m.driver is not None and f.driver != m.driver:
        return False
    if m.sriov_role is not None and f.sriov_role != m.sriov_role:
        return False
    if m.numa_node is not None and f.numa_node != m.numa_node:
        return False
    if isinstance(m.address, str):
        pattern = m.address.lower()
        if ":" in pattern and pattern.count(":") == 1:
            pattern = "*:" + pattern  # bus:slot.fn, as lspci prints it
        if not fnmatch.fnmatchcase(f.address, pattern):
            return False
    elif isinstance(m.address, AddressFields):
        a = PciAddress.parse(f.address)
        have = (f"{a.domain:04x}", f"{a.bus:02x}", f"{a.device:02x}", f"{a.function:x}")
        want = (m.address.domain, m.address.bus, m.address.slot, m.address.function)
        if not all(re.fullmatch(w, h, re.IGNORECASE) for w, h in zip(want, have, strict=True)):
            return False
    if m.netdev is not None:
        name, vfs = parse_netdev_range(m.netdev)
        if vfs is None:
            if name not in f.netdevs:
                return False
        else:
            pf = host.by_netdev().get(name)
            if pf is None or f.phys_fn != pf.address or f.vf_index not in vfs:
                return False
    return True


def matches(m: Match, f: PciFunction, host: HostInventory) -> bool:
    """Whether a native match selects the function (netdev ranges, PF addresses and all)."""
    return _matches_native(m, f, host)


def _matches_nova(s: NovaSpec, f: PciFunction, host: HostInventory) -> bool:
    if s.vendor_id not in ("*", f.vendor_id) or s.product_id not in ("*", f.product_id):
        return False
    if s.devname is not None:
        owner = host.by_netdev().get(s.devname)
        if owner is None:
            return False  # Nova: a devname that is not on the host matches nothing
        if f.address == owner.address:
            return True
        return owner.sriov_role == "PF" and f.phys_fn == owner.address
    address = s.address or NovaAddress("glob", ("*", "*", "*", "*"))
    if f.phys_fn is not None and (single := address.single()) is not None:
        named = host.by_address().get(single)
        if named is not None and named.sriov_role == "PF" and address.matches(f.phys_fn):
            return True  # a PF's address, string or plain-hex map, matches its VFs
    return address.matches(f.address)


def _remote_managed(s: NovaSpec) -> bool:
    """Nova reads the tag leniently: anything but a true string is false."""
    return s.tags.get("remote_managed", "").strip().lower() in TRUE_STRINGS


def check_nova_refusals(specs: DeviceSpecs, host: HostInventory) -> None:
    """Refusals that depend on the hardware, as Nova makes them: a remote_managed spec whose
    devname is not on the host, or that names a PF. A spec naming a PF's address may still
    be remote_managed when its IDs are the VFs' (it then means the PF's VFs); IDs that are
    neither the PF's nor its VFs' are refused."""
    by_addr, by_dev = host.by_address(), host.by_netdev()
    for s in specs.nova:
        if not _remote_managed(s):
            continue
        target = None
        if s.devname is not None:
            target = by_dev.get(s.devname)
            if target is None:
                raise DeviceSpecError(
                    f"{s.where}: remote_managed devname {s.devname!r} is not on this host"
                )
        elif s.address is not None and (single := s.address.single()) is not None:
            target = by_addr.get(single)
        if target is None or target.sriov_role != "PF":
            continue
        vendor_ok = s.vendor_id in ("*", target.vendor_id)
        if vendor_ok and s.product_id == target.vf_product_id:
            continue
        if vendor_ok and s.product_id in ("*", target.product_id):
            raise DeviceSpecError(
                f"{s.where}: remote_managed cannot apply to PF {target.address}; "
                f"name its VFs (product_id {target.vf_product_id or '?'}) instead"
            )
        raise DeviceSpecError(
            f"{s.where}: vendor_id {s.vendor_id} and product_id {s.product_id} are neither "
            f"PF {target.address}'s ({target.vendor_id}:{target.product_id}) nor its VFs' "
            f"({target.vendor_id}:{target.vf_product_id or '?'})"
        )


def decide(
    specs: DeviceSpecs, host: HostInventory, node_labels: Mapping[str, str]
) -> list[Decision]:
    """A decision for every function of the host, in address order. Bridges are never offered."""
    specs = specs.for_node(node_labels)
    check_nova_refusals(specs, host)
    out: list[Decision] = []
    for f in host.functions:
        decision = Decision(f.address, False)
        if not f.is_bridge:
            for i, e in enumerate(specs.entries):
                if (
                    e.node_selector is None or label_selector_matches(e.node_selector, node_labels)
                ) and (_matches_native(e.match, f, host)):
                    attrs = dict(e.attributes)
                    physnet = e.physical_network or attrs.get(PHYSNET_ATTRIBUTE)
                    if physnet:
                        attrs[PHYSNET_ATTRIBUTE] = physnet
                    for key, flag in (
                        ("trusted", e.trusted),
                        ("managed", e.managed),
                        ("one_time_use", e.one_time_use),
                        ("live_migratable", e.live_migratable),
                    ):
                        if flag is not None:
                            attrs[key] = "true" if flag else "false"
                    decision = Decision(f.address, True, e.name or f"devices[{i}]", physnet, attrs)
                    break
            else:
                for s in specs.nova:
                    # A remote_managed device must carry the card's serial number in its VPD
                    # (a VF may use its PF's): the remote side needs it to find the card.
                    if _matches_nova(s, f, host) and (not _remote_managed(s) or f.serial):
                        physnet = s.tags.get(PHYSNET_ATTRIBUTE)
                        decision = Decision(f.address, True, s.where, physnet, dict(s.tags))
                        break
        out.append(decision)
    return out
