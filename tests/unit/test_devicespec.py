"""Device specs: the native format, Nova's device_spec with Nova's semantics, and refusals
that name the entry and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeplugin.devicespec import (
    DeviceSpecError,
    decide,
    load_specs,
    nova_conf_specs,
    parse_netdev_range,
)
from nodeplugin.discovery import HostInventory, discover
from tests.unit.hosts import build_lab

GPU, AUDIO, BRIDGE = "0000:3b:00.0", "0000:3b:00.1", "0000:3a:00.0"
PF0, PF1, NVME, NODRV = "0000:5e:00.0", "0000:d8:00.0", "0000:af:00.0", "0000:b0:00.0"
VFS0 = ["0000:5e:02.0", "0000:5e:02.1", "0000:5e:02.2", "0000:5e:02.3"]
VFS1 = ["0000:d8:02.0", "0000:d8:02.1"]
HOSTNAME = {"kubernetes.io/hostname": "node-a"}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostInventory:
    root = tmp_path_factory.mktemp("lab") / "sys"
    build_lab(root)
    return discover(root)


def offered(
    host: HostInventory, config: str, labels: dict[str, str] | None = None
) -> dict[str, tuple[str, str | None, dict[str, str]]]:
    specs = load_specs(config)
    return {
        d.address: (d.entry, d.physical_network, d.attributes)
        for d in decide(specs, host, labels or HOSTNAME)
        if d.publish
    }


# --- native ---------------------------------------------------------------------------------


def test_nothing_is_offered_without_an_entry(host: HostInventory) -> None:
    assert offered(host, "") == {}
    assert offered(host, "devices: []") == {}


def test_vendor_and_product(host: HostInventory) -> None:
    got = offered(
        host,
        "devices: [{name: a100, match: {vendorID: '10DE', productID: '20b0'}, attributes: {tier: gold}}]",
    )
    assert got == {GPU: ("a100", None, {"tier": "gold"})}


def test_bridges_are_never_offered(host: HostInventory) -> None:
    assert BRIDGE not in offered(host, "devices: [{match: {vendorID: '8086'}}]")


def test_address_glob_and_lspci_short_form(host: HostInventory) -> None:
    assert set(offered(host, "devices: [{match: {address: '0000:3b:*.*'}}]")) == {GPU, AUDIO}
    assert set(offered(host, "devices: [{match: {address: '3b:00.1'}}]")) == {AUDIO}


def test_address_per_field_regex_matches_whole_fields(host: HostInventory) -> None:
    got = offered(host, "devices: [{match: {address: {bus: '5e', slot: '02', function: '[0-1]'}}}]")
    assert set(got) == set(VFS0[:2])


def test_netdev_with_a_vf_range_and_physnet(host: HostInventory) -> None:
    got = offered(
        host,
        "devices: [{name: p2, match: {netdev: 'ens1f0#0,2-3'}, physicalNetwork: physnet2, trusted: true}]",
    )
    assert set(got) == {VFS0[0], VFS0[2], VFS0[3]}
    assert got[VFS0[0]] == ("p2", "physnet2", {"physical_network": "physnet2", "trusted": "true"})


def test_netdev_without_range_is_that_interface(host: HostInventory) -> None:
    assert set(offered(host, "devices: [{match: {netdev: ens1f0}}]")) == {PF0}


def test_class_driver_role_numa(host: HostInventory) -> None:
    assert set(offered(host, "devices: [{match: {classCode: '0108'}}]")) == {NVME}
    assert set(offered(host, "devices: [{match: {driver: iavf, numaNode: 1}}]")) == set(VFS1)
    assert set(offered(host, "devices: [{match: {sriovRole: PF}}]")) == {PF0, PF1}


def test_first_matching_entry_wins(host: HostInventory) -> None:
    got = offered(
        host,
        "devices: [{name: first, match: {vendorID: '10de', productID: '20b0'}},"
        " {name: second, match: {vendorID: '10de'}}]",
    )
    assert got[GPU][0] == "first" and got[AUDIO][0] == "second"


def test_entries_limited_to_nodes_by_label(host: HostInventory) -> None:
    cfg = "devices: [{match: {vendorID: '10de'}, nodeSelector: {matchLabels: {gpu: 'yes'}}}]"
    assert offered(host, cfg) == {}
    assert set(offered(host, cfg, {**HOSTNAME, "gpu": "yes"})) == {GPU, AUDIO}


NODE_GROUPS = """
devices:
  - {name: top, match: {classCode: '0108'}}
novaDeviceSpecs:
  - '{"vendor_id": "10de", "product_id": "1aef"}'
nodeGroups:
  - name: gpu-hosts
    nodeSelector: {matchLabels: {gpu: a100}}
    devices:
      - {match: {vendorID: '10de', productID: '20b0'}, attributes: {tier: gold}}
  - name: physnet2-hosts
    nodeSelector: {matchExpressions: [{key: rack, operator: In, values: [r1, r2]}]}
    devices:
      - {name: p2, match: {netdev: 'ens1f0#0-1'}, physicalNetwork: physnet2}
    novaDeviceSpecs:
      - '{"devname": "ens2f0", "physical_network": "physnet3"}'
"""


def test_node_groups_apply_only_where_their_selector_picks(host: HostInventory) -> None:
    plain = offered(host, NODE_GROUPS)
    assert set(plain) == {NVME, AUDIO}
    gpu = offered(host, NODE_GROUPS, {**HOSTNAME, "gpu": "a100"})
    assert set(gpu) == {NVME, AUDIO, GPU}
    # An unnamed group entry is named by its place in the file.
    assert gpu[GPU] == ("nodeGroups[0].devices[0]", None, {"tier": "gold"})
    both = offered(host, NODE_GROUPS, {**HOSTNAME, "gpu": "a100", "rack": "r2"})
    assert set(both) == {NVME, AUDIO, GPU, PF1, *VFS0[:2], *VFS1}
    assert both[VFS0[0]][:2] == ("p2", "physnet2")
    assert both[VFS1[0]][:2] == ("nodeGroups[1].novaDeviceSpecs[0]", "physnet3")


def test_node_group_entries_follow_the_top_level_ones(host: HostInventory) -> None:
    cfg = (
        "devices: [{name: top, match: {vendorID: '10de'}}]\n"
        "nodeGroups: [{name: g, nodeSelector: {matchLabels: {gpu: a100}},"
        " devices: [{name: group, match: {vendorID: '10de', productID: '20b0'}}]}]"
    )
    assert offered(host, cfg, {**HOSTNAME, "gpu": "a100"})[GPU][0] == "top"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            "nodeGroups: [{name: g, devices: []}]",
            "nodeGroups[0].nodeSelector: Field required",
        ),
        (
            "nodeGroups: [{name: g, nodeSelector: {}}, {name: g, nodeSelector: {}}]",
            "nodeGroups[1].name: 'g' is used by an earlier group",
        ),
        (
            "nodeGroups: [{name: g, nodeSelector: {}, devices: [{name: x, match: {vendorID: 'zz'}}]}]",
            "nodeGroups[0].devices[0].match.vendorID (entry 'x')",
        ),
        (
            'nodeGroups: [{name: g, nodeSelector: {}, novaDeviceSpecs: [\'{"vendor_id": "1ffff"}\']}]',
            "nodeGroups[0].novaDeviceSpecs[0]: vendor_id",
        ),
        (
            "devices: [{name: gpus, match: {vendorID: '10dex'}}]",
            "devices[0].match.vendorID (entry 'gpus')",
        ),
        (
            "devices: [{match: {vendorID: '10de'}}, {name: nic, match: {netdev: 'ens1f0#7-2'}}]",
            "devices[1].match.netdev (entry 'nic'): Value error, 'ens1f0#7-2': range '7-2' runs backwards",
        ),
        ("devices: [{match: {address: {bus: '('}}}]", "devices[0].match.address"),
        ("devices: [{match: {vendorID: '10de'}, colour: blue}]", "devices[0].colour"),
        ("devices: [{match: {classCode: '030'}}]", "is not a class-code prefix"),
        ("devices: nope", "devices"),
        ("[1, 2]", "must be a map"),
        ("devices: [{match: {vendorID: '10de'}", "not YAML or JSON"),
    ],
)
def test_bad_native_config_names_entry_and_field(config: str, message: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        load_specs(config)
    assert message in str(err.value)


def test_netdev_ranges() -> None:
    assert parse_netdev_range("ens1f0#0-3,6") == ("ens1f0", {0, 1, 2, 3, 6})
    assert parse_netdev_range("ens1f0") == ("ens1f0", None)
    with pytest.raises(ValueError):
        parse_netdev_range("#0-1")


# --- Nova -----------------------------------------------------------------------------------


def nova(host: HostInventory, *specs: str) -> dict[str, tuple[str, str | None, dict[str, str]]]:
    quoted = ", ".join(repr(s) for s in specs)
    return offered(host, f"novaDeviceSpecs: [{quoted}]")


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ('{"vendor_id": "10de", "product_id": "20b0"}', {GPU}),
        ('{"vendor_id": "10de", "product_id": "*"}', {GPU, AUDIO}),
        ('{"vendor_id": "10DE"}', {GPU, AUDIO}),
        ('{"address": "0000:3b:00.1"}', {AUDIO}),
        ('{"address": "*:3b:00.*"}', {GPU, AUDIO}),
        ('{"address": ":3b:00."}', {GPU, AUDIO}),
        ('{"address": "3b:00.1"}', {AUDIO}),
        ('{"address": "5e:02.2"}', {VFS0[2]}),
        ('{"address": {"bus": "5e", "slot": "02", "function": "[0-1]"}}', set(VFS0[:2])),
        # Nova's regexes match at the start of the zero-padded field (re.match): "0" matches "02".
        ('{"address": {"bus": "5e", "slot": "0"}}', {PF0, *VFS0}),
        # A single PF address matches the PF and its VFs.
        ('{"address": "0000:5e:00.0"}', {PF0, *VFS0}),
        ('{"vendor_id": "8086", "product_id": "1889", "address": "0000:5e:00.0"}', set(VFS0)),
        # A PF's devname matches its VFs too; a devname not on the host matches nothing.
        ('{"devname": "ens1f0", "product_id": "1889"}', set(VFS0)),
        ('{"devname": "ens1f0v1"}', {VFS0[1]}),
        ('{"devname": "eth9"}', set()),
        ('[{"address": "0000:3b:00.0"}, {"address": "0000:af:00.0"}]', {GPU, NVME}),
    ],
)
def test_nova_matching(host: HostInventory, spec: str, want: set[str]) -> None:
    assert set(nova(host, spec)) == want


def test_nova_tags_become_attributes_and_physnet(host: HostInventory) -> None:
    got = nova(
        host,
        '{"devname": "ens2f0", "physical_network": "physnet1", "trusted": "true", "resource_class": "CUSTOM_VF"}',
    )
    assert set(got) == {PF1, *VFS1}
    entry, physnet, attrs = got[VFS1[0]]
    assert entry == "novaDeviceSpecs[0]" and physnet == "physnet1"
    assert attrs == {
        "physical_network": "physnet1",
        "trusted": "true",
        "resource_class": "CUSTOM_VF",
    }


def test_nova_null_and_empty_values_mean_not_given(host: HostInventory) -> None:
    # Nova: an empty devname is no devname (so it may stand beside an address), and a null
    # physical_network is no physical network, not one named "None".
    got = nova(host, '{"address": "0000:3b:00.0", "devname": "", "physical_network": null}')
    assert got == {GPU: ("novaDeviceSpecs[0]", None, {})}
    got = nova(host, '{"devname": null, "vendor_id": "10de", "product_id": "1aef"}')
    assert set(got) == {AUDIO}


@pytest.mark.parametrize(
    ("address", "want"),
    [
        # A map whose four fields are plain hex names one address: when that is a PF, its
        # VFs match too, as with the string form.
        ('{"domain": "0000", "bus": "5e", "slot": "00", "function": "0"}', {PF0, *VFS0}),
        # Any field that is a pattern makes it a regex over addresses: the PF alone.
        ('{"domain": "0000", "bus": "5e", "slot": "00", "function": "[0]"}', {PF0}),
        ('{"bus": "5e", "slot": "00", "function": "0"}', {PF0}),
        # Plain hex naming a function that is not a PF is just that function.
        ('{"domain": "0000", "bus": "3b", "slot": "00", "function": "1"}', {AUDIO}),
    ],
)
def test_nova_regex_map_of_plain_hex_naming_a_pf_matches_its_vfs(
    host: HostInventory, address: str, want: set[str]
) -> None:
    assert set(nova(host, f'{{"address": {address}}}')) == want


def test_a_pf_is_a_function_that_can_have_vfs(tmp_path: Path) -> None:
    # The kernel creates sriov_totalvfs for any function with an SR-IOV capability; one whose
    # firmware allows 0 VFs is no PF (Nova: sriov_totalvfs > 0), so its address is its own.
    tree = build_lab(tmp_path / "sys")
    (tree.devices / NVME / "sriov_totalvfs").write_text("0\n")
    host = discover(tmp_path / "sys")
    assert host.by_address()[NVME].sriov_role == "None"
    assert host.by_address()[PF0].sriov_role == "PF"
    assert host.by_address()[PF0].vf_product_id == "1889"
    assert set(offered(host, "devices: [{match: {sriovRole: PF}}]")) == {PF0, PF1}


@pytest.mark.parametrize("tag", ["managed", "live_migratable", "one_time_use"])
@pytest.mark.parametrize(
    ("value", "want"),
    [("yes", "true"), ("Y", "true"), ("1", "true"), (True, "true"), (1, "true"),
     ("on", "true"), ("no", "false"), ("OFF", "false"), ("0", "false"), (False, "false")],
)  # fmt: skip
def test_nova_boolean_tags_are_normalised(
    host: HostInventory, tag: str, value: object, want: str
) -> None:
    import json

    spec = json.dumps({"address": "0000:3b:00.1", tag: value})
    assert nova(host, spec)[AUDIO][2] == {tag: want}


@pytest.mark.parametrize("tag", ["managed", "live_migratable", "one_time_use"])
def test_nova_boolean_tags_refuse_other_values(tag: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        load_specs(f'novaDeviceSpecs: [\'{{"{tag}": "maybe"}}\']')
    assert f"novaDeviceSpecs[0]: tag {tag} ('maybe') is not a boolean" in str(err.value)


def test_native_entries_have_the_same_marks(host: HostInventory) -> None:
    got = offered(
        host,
        "devices: [{match: {address: '0000:af:00.0'}, managed: false, oneTimeUse: true,"
        " liveMigratable: false}]",
    )
    assert got[NVME][2] == {"managed": "false", "one_time_use": "true", "live_migratable": "false"}


def test_nova_remote_managed_needs_the_card_serial_number(host: HostInventory) -> None:
    # Port 0's card has a serial number in its VPD, which its VFs share; port 1's has none,
    # so its VFs are not offered as remote_managed (and fall through to later specs).
    got = nova(
        host,
        '{"vendor_id": "8086", "product_id": "1889", "remote_managed": "true"}',
        '{"vendor_id": "8086", "product_id": "1889"}',
    )
    assert {a for a, v in got.items() if v[0] == "novaDeviceSpecs[0]"} == set(VFS0)
    assert {a for a, v in got.items() if v[0] == "novaDeviceSpecs[1]"} == set(VFS1)
    assert host.by_address()[VFS0[2]].serial == "MT2048X12345"
    assert host.by_address()[VFS1[0]].serial is None


def test_vpd_serial_parsing() -> None:
    from nodeplugin.discovery import parse_vpd_serial
    from nodeplugin.simulate import vpd_image

    assert parse_vpd_serial(vpd_image("SN-42")) == "SN-42"
    assert parse_vpd_serial(vpd_image("  ")) is None
    assert parse_vpd_serial(b"") is None
    assert parse_vpd_serial(vpd_image("SN-42")[:9]) is None  # cut short: nothing, no error
    assert parse_vpd_serial(b"\x78") is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # A PF's address with the PF's own IDs (or none) is the PF: refused.
        ('{"address": "0000:5e:00.0", "remote_managed": "true"}', "cannot apply to PF 0000:5e:00.0"),
        ('{"address": "0000:5e:00.0", "vendor_id": "8086", "product_id": "1592", '
         '"remote_managed": "yes"}', "cannot apply to PF 0000:5e:00.0"),
        ('{"devname": "ens1f0", "remote_managed": "true"}', "cannot apply to PF 0000:5e:00.0"),
        # IDs that are neither the PF's nor its VFs'.
        ('{"address": "0000:5e:00.0", "product_id": "1234", "remote_managed": "true"}',
         "are neither PF 0000:5e:00.0's (8086:1592) nor its VFs' (8086:1889)"),
        ('{"address": "0000:5e:00.0", "vendor_id": "15b3", "product_id": "1889", '
         '"remote_managed": "true"}', "nor its VFs'"),
        ('{"devname": "eth9", "remote_managed": "true"}', "devname 'eth9' is not on this host"),
    ],
)  # fmt: skip
def test_nova_remote_managed_refusals(host: HostInventory, spec: str, message: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        decide(load_specs(f"novaDeviceSpecs: [{spec!r}]"), host, HOSTNAME)
    assert message in str(err.value)


def test_nova_remote_managed_false_is_not_checked(host: HostInventory) -> None:
    got = nova(host, '{"address": "0000:d8:00.0", "remote_managed": "false"}')
    assert set(got) == {PF1, *VFS1}


def test_native_entries_come_before_nova_ones(host: HostInventory) -> None:
    got = offered(
        host,
        "devices: [{name: native, match: {vendorID: '10de'}}]\n"
        'novaDeviceSpecs: [\'{"vendor_id": "10de", "physical_network": "x"}\']',
    )
    assert got[GPU][0] == "native"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "invalid entry"),
        ('"a string"', "expecting a list or an object"),
        ("[1]", "expecting an object"),
        ('{"vendor_id": "xyz1"}', "vendor_id ('xyz1') does not parse as a hex number"),
        (
            '{"product_id": "12345"}',
            "product_id (12345) is greater than the maximum allowable value (FFFF)",
        ),
        ('{"address": "0000:3b:00.9"}', "address function (9) is greater than"),
        ('{"address": "0000:3b:20.0"}', "address slot (20) is greater than"),
        ('{"address": "1:2:3:4.0"}', "more than domain:bus:slot"),
        ('{"address": "zz:00.0"}', "address bus ('zz') does not parse as a hex number"),
        ('{"address": {"bus": "["}}', "address.bus '[' is not a regular expression"),
        ('{"address": "0000:3b:00.0", "devname": "eth0"}', "devname or address, but not both"),
    ],
)
def test_nova_refusals(spec: str, message: str) -> None:
    with pytest.raises(DeviceSpecError) as err:
        load_specs(f"novaDeviceSpecs: [{spec!r}]")
    assert message in str(err.value) and "novaDeviceSpecs[0]" in str(err.value)


def test_nova_refuses_remote_managed_on_a_pf(host: HostInventory) -> None:
    specs = load_specs(
        'novaDeviceSpecs: [\'{"address": "0000:5e:00.0", "remote_managed": "true"}\']'
    )
    with pytest.raises(DeviceSpecError, match=r"remote_managed cannot apply to PF 0000:5e:00\.0"):
        decide(specs, host, HOSTNAME)
    ok = load_specs(
        'novaDeviceSpecs: [\'{"address": "0000:5e:00.0", "product_id": "1889", "remote_managed": "true"}\']'
    )
    assert {d.address for d in decide(ok, host, HOSTNAME) if d.publish} == set(VFS0)


NOVA_CONF = """
[DEFAULT]
device_spec = {"vendor_id": "ffff"}
pci_passthrough_whitelist = {"address": "0000:3b:00.1"}

[pci]
# the VFs of port 0, on physnet2
device_spec = {"devname": "ens1f0", "product_id": "1889",
    "physical_network": "physnet2"}
passthrough_whitelist = {"address": "0000:af:00.0"}
alias = {"name": "a1", "vendor_id": "10de"}
device_spec = [{"vendor_id": "10de", "product_id": "20b0"}]

[libvirt]
virt_type = kvm
"""


def test_nova_conf_pci_section_multi_valued_and_continued() -> None:
    # [DEFAULT] pci_passthrough_whitelist: the deprecated name oslo.config still reads.
    assert nova_conf_specs(NOVA_CONF) == [
        '{"address": "0000:3b:00.1"}',
        '{"devname": "ens1f0", "product_id": "1889", "physical_network": "physnet2"}',
        '{"address": "0000:af:00.0"}',
        '[{"vendor_id": "10de", "product_id": "20b0"}]',
    ]


def test_nova_conf_specs_are_honoured(host: HostInventory, tmp_path: Path) -> None:
    specs = load_specs(None, nova_conf=NOVA_CONF)
    got = {d.address: d for d in decide(specs, host, HOSTNAME) if d.publish}
    assert set(got) == {*VFS0, NVME, GPU, AUDIO}
    assert got[VFS0[0]].physical_network == "physnet2"
    assert got[GPU].entry == "novaDeviceSpecs[3]"
