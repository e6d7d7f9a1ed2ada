"""The Helm chart with real helm (built from the Go module proxy, cached) against the real local
API server: lint, schema and advice failures, deterministic rendering, server-side dry run,
install / upgrade / uninstall, least-privilege RBAC, and the components running with exactly
the chart's RBAC while a GitOps-style server-side apply sees no drift.

The tests run in file order on one cluster: install, then use, upgrade and uninstall it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeplugin.devicespec import decide, load_specs
from nodeplugin.discovery import discover
from nodeplugin.simulate import build_host, load_profile
from pcipt.devcluster import LocalCluster, binaries
from pcipt.devcluster.cluster import free_port
from pcipt.devcluster.lab import Lab
from tests.conftest import REPO_ROOT

# Slow by nature: builds helm and a control plane on first use.
pytestmark = pytest.mark.timeout(1200)

CHART = REPO_ROOT / "charts" / "pcipt"
VALUES = REPO_ROOT / "examples" / "helm" / "values-demo.yaml"
EX = REPO_ROOT / "examples"
RELEASE, NS, TENANT = "pcipt", "pcipt-system", "gpu-tenants"
KUBE_VERSION = binaries.KUBERNETES_VERSION.lstrip("v")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """helm's own folders in a temporary place, so the tests never touch the user's."""
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return str(binaries.ensure_helm())


def run(
    argv: list[str], env: dict[str, str], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, input=input, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def template(helm_bin: str, helm_env: dict[str, str]) -> Any:
    def render(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(
            [
                helm_bin,
                "template",
                RELEASE,
                str(CHART),
                "-n",
                NS,
                "--kube-version",
                KUBE_VERSION,
                *args,
            ],
            helm_env,
            check=check,
        )

    return render


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


# --- without a cluster -------------------------------------------------------------------


def test_lint_strict(helm_bin: str, helm_env: dict[str, str]) -> None:
    for values in ([], ["-f", str(VALUES)]):
        out = run(
            [helm_bin, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *values],
            helm_env,
        )
        assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_rendering_is_deterministic(template: Any) -> None:
    a = template(
        "-f", str(VALUES), "--set", "controller.replicas=3", "--set", "nodePlugin.logLevel=DEBUG"
    ).stdout
    b = template(
        "-f", str(VALUES), "--set", "nodePlugin.logLevel=DEBUG", "--set", "controller.replicas=3"
    ).stdout
    assert a == b and "replicas: 3" in a
    # Nothing random, time- or cluster-dependent may reach a manifest.
    banned = re.compile(
        r"\b(rand\w*|uuidv4|gen(CA|SelfSignedCert|SignedCert|PrivateKey)|now|lookup)\b"
    )
    for path in (CHART / "templates").rglob("*"):
        if path.is_file():
            for action in re.findall(r"\{\{.*?\}\}", path.read_text(), re.DOTALL):
                assert not banned.search(action), f"{path.name}: {action}"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("controller.replicas=two", "at '/controller/replicas': got string, want integer"),
        ("controller.replica=3", "at '/controller': additional properties 'replica' not allowed"),
        (
            "webhook.failurePolicy=Sometimes",
            "at '/webhook/failurePolicy': value must be one of 'Ignore', 'Fail'",
        ),
        (
            "deviceSpecs.devices[0].match.vendorID=zz",
            "at '/deviceSpecs/devices/0/match/vendorID': 'zz' does not match pattern",
        ),
        ("deviceSpecs.devices[0].name=x", "at '/deviceSpecs/devices/0': missing property 'match'"),
        ("nodePlugin.libvirtSocketDir=run/libvirt", "at '/nodePlugin/libvirtSocketDir'"),
        ("image.digest=sha256:abc", "at '/image/digest'"),
        ("colour=blue", "additional properties 'colour' not allowed"),
    ],
)
def test_bad_values_are_refused_with_the_schemas_message(
    template: Any, setting: str, message: str
) -> None:
    out = template("--set", setting, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert message in out.stderr


@pytest.mark.parametrize(
    ("settings", "advice"),
    [
        (
            ["controller.leaderElection.enabled=false"],
            "Enable leader election, or set controller.replicas=1",
        ),
        (["controller.leaderElection.renewPeriod=4"], "e.g. leaseDuration=16"),
        (["nodePlugin.leaseDuration=10"], "e.g. leaseDuration=40"),
        (["controller.nodeDeadAfter=20"], "Set controller.nodeDeadAfter >= 40"),
        (["webhook.certificate.source=secret"], "needs webhook.certificate.secretName"),
        (["webhook.certificate.secretName=mine"], "Remove secretName, or set source=secret"),
        (["webhook.failurePolicy=Fail", "controller.replicas=1"], "Use controller.replicas>=2"),
        (["nodePlugin.enabled=false"], "Enable the node plugin, or drop deviceSpecs"),
        (["controller.livenessPort=8080"], "must differ"),
    ],
)
def test_contradictory_values_fail_with_advice(
    template: Any, settings: list[str], advice: str
) -> None:
    args = ["-f", str(VALUES)] + [a for s in settings for a in ("--set", s)]
    out = template(*args, check=False)
    assert out.returncode != 0 and "validate.yaml" in out.stderr
    assert advice in out.stderr


def test_device_spec_configmap_offers_what_the_demo_config_does(
    template: Any, tmp_path: Path
) -> None:
    """The example values write the demo's node config as node groups: on every demo host they
    must offer exactly the same functions with the same facts."""
    rendered = template(
        "-f", str(VALUES), "--show-only", "templates/nodeplugin-configmap.yaml"
    ).stdout
    chart_specs = load_specs(docs_of(rendered)[0]["data"]["devices.yaml"])
    demo_specs = load_specs((REPO_ROOT / "demo" / "node-config.yaml").read_text())
    assert chart_specs.groups, "the example should show node groups"
    for host in load_profile((REPO_ROOT / "demo" / "hardware.yaml").read_text()):
        root = tmp_path / host.name
        build_host(root, host)
        inv = discover(root)
        labels = {"kubernetes.io/hostname": host.name}

        def offered(specs: Any, inv: Any = inv, labels: dict[str, str] = labels) -> dict[str, Any]:
            return {
                d.address: (d.physical_network, d.attributes)
                for d in decide(specs, inv, labels)
                if d.publish
            }

        assert offered(chart_specs) == offered(demo_specs), host.name
        assert offered(chart_specs)


def test_servicemonitors_select_the_metrics_services(template: Any) -> None:
    objs = docs_of(
        template(
            "-f",
            str(VALUES),
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.serviceMonitor.labels.release=prom",
        ).stdout
    )
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    services = [o for o in objs if o["kind"] == "Service"]
    assert {m["metadata"]["name"] for m in monitors} == {"pcipt-controller", "pcipt-node-plugin"}
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "prom"
        want = m["spec"]["selector"]["matchLabels"]
        hits = [
            s
            for s in services
            if want.items() <= s["metadata"]["labels"].items()
            and any(p["name"] == "metrics" for p in s["spec"]["ports"])
        ]
        assert len(hits) == 1, m["metadata"]["name"]
    assert not [o for o in docs_of(template().stdout) if o["kind"] == "ServiceMonitor"]


def test_only_the_node_plugin_is_privileged(template: Any) -> None:
    objs = docs_of(template("-f", str(VALUES)).stdout)
    workloads = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "DaemonSet")}
    ctl = workloads["pcipt-controller"]["spec"]["template"]["spec"]
    sc = ctl["containers"][0]["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    )
    assert sc["capabilities"]["drop"] == ["ALL"] and not ctl.get("hostNetwork")
    assert ctl["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    plugin = workloads["pcipt-node-plugin"]["spec"]["template"]["spec"]
    assert plugin["containers"][0]["securityContext"]["privileged"] is True
    assert {v["hostPath"]["path"] for v in plugin["volumes"] if "hostPath" in v} == {
        "/sys",
        "/dev/vfio",
        "/var/run/libvirt",
        "/var/lib/pcipt",
    }
    assert plugin["nodeSelector"] == {"pcipt.io/passthrough": "true"}
    assert plugin["tolerations"][0]["key"] == "pcipt.io/dedicated"
    assert plugin["priorityClassName"] == "system-node-critical"


# --- on the real API server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("chart-cluster"))
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def kenv(cluster: LocalCluster, helm_env: dict[str, str]) -> dict[str, str]:
    return {**helm_env, "KUBECONFIG": str(cluster.kubeconfig)}


@pytest.fixture(scope="module")
def kubectl(kenv: dict[str, str]) -> Any:
    path = str(binaries.ensure().kubectl)

    def k(
        *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run([path, *args], kenv, check=check, input=input)

    return k


def test_rendered_manifests_pass_a_server_side_dry_run(template: Any, kubectl: Any) -> None:
    kubectl("create", "namespace", NS)
    for values in (
        [],
        ["-f", str(VALUES)],
        [
            "--set",
            "webhook.certificate.source=secret",
            "--set",
            "webhook.certificate.secretName=mine",
        ],
    ):
        manifests = template(*values).stdout
        out = kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=helm-test",
            "-f",
            "-",
            input=manifests,
        )
        kinds = {line.split("/")[0] for line in out.stdout.splitlines()}
        assert {
            "deployment.apps",
            "daemonset.apps",
            "customresourcedefinition.apiextensions.k8s.io",
            "validatingwebhookconfiguration.admissionregistration.k8s.io",
        } <= kinds
    assert kubectl("get", "crd", "-o", "name").stdout.strip() == ""  # a dry run creates nothing


def test_plain_kubectl_manifest_is_the_rendered_chart_and_applies(kubectl: Any) -> None:
    check = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "render-manifests.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    out = kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", str(REPO_ROOT / "deploy" / "pcipt.yaml")
    )
    assert "namespace/pcipt-system serverside-applied (server dry run)" in out.stdout
    assert "deployment.apps/pcipt-controller serverside-applied" in out.stdout


def test_install_creates_every_object(helm_bin: str, kenv: dict[str, str], kubectl: Any) -> None:
    run(
        [
            helm_bin,
            "install",
            RELEASE,
            str(CHART),
            "-n",
            NS,
            "-f",
            str(VALUES),
            "--create-namespace",
        ],
        kenv,
    )
    manifest = run([helm_bin, "get", "manifest", RELEASE, "-n", NS], kenv).stdout
    objs = docs_of(manifest)
    assert len(objs) >= 20
    for o in objs:
        ns = ["-n", o["metadata"].get("namespace", NS)]
        got = kubectl("get", o["kind"], o["metadata"]["name"], *ns, "-o", "json")
        assert json.loads(got.stdout)["metadata"]["name"] == o["metadata"]["name"]
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    assert (
        kubectl(
            "get", "deploy", "pcipt-controller", "-n", NS, "-o", "jsonpath={.spec.replicas}"
        ).stdout
        == "2"
    )


def test_rbac_is_least_privilege(kubectl: Any) -> None:
    def can(sa: str, *args: str) -> bool:
        out = kubectl(
            "auth", "can-i", *args, "--as", f"system:serviceaccount:{NS}:{sa}", check=False
        )
        return out.stdout.strip() == "yes"

    ctl, plugin = "pcipt-controller", "pcipt-node-plugin"
    # The controller: its own webhook Secret, nothing else; no pods, no exec; claims by patch.
    assert can(ctl, "get", "secret/pcipt-webhook-tls", "-n", NS)
    assert not can(ctl, "get", "secrets", "-n", NS) and not can(ctl, "list", "secrets", "-A")
    assert not can(ctl, "get", "secret/other", "-n", NS) and not can(
        ctl, "get", "secrets", "-n", "kube-system"
    )
    assert not can(ctl, "create", "pods", "-A") and not can(
        ctl, "create", "pods", "--subresource=exec", "-A"
    )
    assert can(ctl, "patch", "pcidevices.pcipt.io") and not can(
        ctl, "delete", "pcidevices.pcipt.io"
    )
    assert not can(ctl, "update", "passthroughvms.pcipt.io", "-A") and not can(
        ctl, "delete", "passthroughvms.pcipt.io", "-A"
    )
    assert can(ctl, "patch", "validatingwebhookconfiguration/pcipt-webhook")
    assert not can(ctl, "patch", "validatingwebhookconfiguration/other")
    # The node plugin: publishes devices, renews Leases, writes VM status; no Secrets at all.
    assert not can(plugin, "get", "secrets", "-A") and not can(plugin, "list", "secrets", "-n", NS)
    assert can(plugin, "create", "pcidevices.pcipt.io") and can(
        plugin, "patch", "pcidevices.pcipt.io", "--subresource=status"
    )
    assert can(plugin, "patch", "leases", "-n", NS) and not can(
        plugin, "patch", "leases", "-n", "kube-node-lease"
    )
    assert can(plugin, "patch", "passthroughvms.pcipt.io", "--subresource=status", "-A")
    assert not can(plugin, "patch", "passthroughvms.pcipt.io", "-A")
    assert not can(plugin, "create", "pods", "-A")


def _sa_kubeconfig(
    cluster: LocalCluster, kubectl: Any, sa: str, path: Path, *, pod: str | None = None
) -> Path:
    """A kubeconfig with a token of ServiceAccount `sa`; bound to `pod` when given, as the
    kubelet mounts it into the pod (the token then names the pod's node)."""
    bound = ["--bound-object-kind", "Pod", "--bound-object-name", pod] if pod else []
    token = kubectl("create", "token", sa, "-n", NS, "--duration", "2h", *bound).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [
            {"name": sa, "context": {"cluster": admin["clusters"][0]["name"], "user": sa}}
        ],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


PLUGIN_SA = "pcipt-node-plugin"


@pytest.fixture(scope="module")
def plugin_tokens(
    cluster: LocalCluster, kubectl: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Per node, a kubeconfig with the node plugin's token bound to a pod on that node, as the
    DaemonSet's pods get theirs. The Nodes and pods are API objects only: no kubelet runs
    them here (the real-pod tier, test_pods.py, does)."""
    work = tmp_path_factory.mktemp("plugin-tokens")
    out = {}
    for node in ("node-a", "node-b"):
        manifest = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": node,
                        "labels": {"kubernetes.io/hostname": node, "pcipt.io/passthrough": "true"},
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"plugin-{node}", "namespace": NS},
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": PLUGIN_SA,
                        "containers": [{"name": "plugin", "image": "localhost/pcipt:dev"}],
                    },
                },
            ],
        }
        kubectl("apply", "-f", "-", input=json.dumps(manifest))
        out[node] = _sa_kubeconfig(cluster, kubectl, PLUGIN_SA, work / node, pod=f"plugin-{node}")
    out["unbound"] = _sa_kubeconfig(cluster, kubectl, PLUGIN_SA, work / "unbound")
    return out


def _device(node: str, address: str = "0000:ff:1f.7", claim: bool = False) -> str:
    spec: dict[str, Any] = {"nodeName": node, "address": address}
    if claim:
        spec["claimRef"] = {"namespace": "t", "name": "vm", "uid": "u-1", "request": "gpus"}
    name = f"{node}.{address.replace(':', '-').replace('.', '-')}"
    return json.dumps(
        {
            "apiVersion": "pcipt.io/v1alpha1",
            "kind": "PciDevice",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_each_node_plugin_is_confined_to_its_node(
    kubectl: Any, plugin_tokens: dict[str, Path]
) -> None:
    """Real pod-bound tokens against the chart's ValidatingAdmissionPolicy: each plugin may
    write its own node's devices, Lease and VM status, never another node's, never a claim."""

    def as_(node: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return kubectl("--kubeconfig", str(plugin_tokens[node]), *args, input=input, check=False)

    def refused(proc: subprocess.CompletedProcess[str], why: str) -> None:
        assert proc.returncode != 0, proc.stdout
        assert "ValidatingAdmissionPolicy 'pcipt-node-plugin'" in proc.stderr, proc.stderr
        assert why in proc.stderr, proc.stderr

    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"namespace": NS},
        "spec": {"holderIdentity": "x"},
    }
    for own, other in (("node-a", "node-b"), ("node-b", "node-a")):
        own_dev = f"{own}.0000-ff-1f-7"
        other_dev = f"{other}.0000-ff-1f-7"
        # Its own node's device: create, label, status, delete.
        assert as_(own, "create", "-f", "-", input=_device(own)).returncode == 0
        assert as_(own, "label", "pcidev", own_dev, "t=1").returncode == 0
        ok = as_(
            own,
            "patch",
            "pcidev",
            own_dev,
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status": {"health": "Healthy"}}',
        )
        assert ok.returncode == 0, ok.stderr
        # Another node's: not even create, and not touch the one the admin made.
        refused(
            as_(own, "create", "-f", "-", input=_device(other)),
            f"node plugin of {own} may only write PciDevices of its own node, not of {other}",
        )
        kubectl("create", "-f", "-", input=_device(other))
        refused(as_(own, "label", "pcidev", other_dev, "t=1"), "may only write PciDevices")
        refused(
            as_(
                own,
                "patch",
                "pcidev",
                other_dev,
                "--subresource=status",
                "--type=merge",
                "-p",
                '{"status": {"health": "Unhealthy"}}',
            ),
            "may only write PciDevices",
        )
        refused(as_(own, "delete", "pcidev", other_dev), "may only write PciDevices")
        kubectl("delete", "pcidev", other_dev)
        # Claims are the controller's: never set, changed or cleared, not even on its own node.
        claim = json.loads(_device(own, claim=True))["spec"]["claimRef"]
        refused(
            as_(
                own,
                "patch",
                "pcidev",
                own_dev,
                "--type=merge",
                "-p",
                json.dumps({"spec": {"claimRef": claim}}),
            ),
            "may not set, change or clear spec.claimRef",
        )
        kubectl(
            "patch",
            "pcidev",
            own_dev,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"claimRef": claim}}),
        )
        refused(
            as_(
                own,
                "patch",
                "pcidev",
                own_dev,
                "--type=merge",
                "-p",
                '{"spec": {"claimRef": {"name": "thief", "uid": "u-2"}}}',
            ),
            "may not set, change or clear spec.claimRef",
        )
        refused(
            as_(
                own,
                "patch",
                "pcidev",
                own_dev,
                "--type=json",
                "-p",
                '[{"op": "remove", "path": "/spec/claimRef"}]',
            ),
            "may not set, change or clear spec.claimRef",
        )
        refused(as_(own, "delete", "pcidev", own_dev), "may not delete a claimed PciDevice")
        kubectl("delete", "pcidev", own_dev)
        refused(
            as_(own, "create", "-f", "-", input=_device(own, claim=True)),
            "may not create a claimed PciDevice",
        )
        # Its own Lease only.
        mine = json.dumps(lease | {"metadata": {"namespace": NS, "name": f"pcipt-node-{own}"}})
        theirs = json.dumps(lease | {"metadata": {"namespace": NS, "name": f"pcipt-node-{other}"}})
        assert as_(own, "apply", "--server-side", "-f", "-", input=mine).returncode == 0
        refused(
            as_(own, "apply", "--server-side", "-f", "-", input=theirs),
            f"may only renew its own Lease pcipt-node-{own}, not pcipt-node-{other}",
        )
        kubectl("delete", "lease", f"pcipt-node-{own}", "-n", NS)

    # VM status: only of a VM scheduled to the plugin's node, and never moved elsewhere.
    vm_ns = "confinement-test"
    kubectl("create", "namespace", vm_ns)
    kubectl("apply", "-n", vm_ns, "-f", str(EX / "vm-2gpu.yaml"))
    kubectl(
        "patch",
        "ptvm",
        "trainer",
        "-n",
        vm_ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"nodeName": "node-a", "phase": "Scheduled"}}',
    )
    status = ["patch", "ptvm", "trainer", "-n", vm_ns, "--subresource=status", "--type=merge"]
    ok = as_("node-a", *status, "-p", '{"status": {"phase": "Starting"}}')
    assert ok.returncode == 0, ok.stderr
    refused(
        as_("node-b", *status, "-p", '{"status": {"phase": "Running"}}'),
        "node plugin of node-b may only write the status of VMs scheduled to its node; "
        "this VM is scheduled to node-a",
    )
    refused(
        as_("node-a", *status, "-p", '{"status": {"nodeName": "node-b"}}'),
        "may not be moved to node-b",
    )
    # A live migration to node-b: its plugin may answer in the VM's status (Ready), not move it.
    migration = {"id": "m1", "fromNode": "node-a", "toNode": "node-b", "live": True,
                 "phase": "Preparing"}  # fmt: skip
    kubectl(*status, "-p", json.dumps({"status": {"migration": migration}}))
    ok = as_("node-b", *status, "-p", '{"status": {"migration": {"phase": "Ready"}}}')
    assert ok.returncode == 0, ok.stderr
    refused(
        as_("node-b", *status, "-p", '{"status": {"nodeName": "node-b"}}'),
        "may not be moved to node-b",
    )
    kubectl(*status, "-p", '{"status": {"migration": {"live": false}}}')
    refused(
        as_("node-b", *status, "-p", '{"status": {"migration": {"phase": "Transferred"}}}'),
        "may only write the status of VMs scheduled to its node",
    )
    kubectl("delete", "namespace", vm_ns, "--wait=false")
    # A token that is not bound to a pod names no node: refused, whatever it asks.
    refused(
        as_("unbound", "create", "-f", "-", input=_device("node-a")),
        "must authenticate with the token of its own pod",
    )


@pytest.fixture(scope="module")
def lab(
    cluster: LocalCluster,
    kubectl: Any,
    plugin_tokens: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    """The controller and two node plugins, each authenticated as the chart's ServiceAccount
    (the plugins with tokens bound to a pod on their node, as in the DaemonSet)."""
    work = tmp_path_factory.mktemp("chart-lab")
    ctl = _sa_kubeconfig(cluster, kubectl, "pcipt-controller", work / "controller.kubeconfig")
    webhook_port, liveness_port = free_port(), free_port()
    lab = Lab(
        work,
        REPO_ROOT / "demo" / "hardware.yaml",
        REPO_ROOT / "demo" / "node-config.yaml",
        install_crds=False,
        namespace=NS,
        kubeconfigs={
            "controller": ctl,
            "node-node-a": plugin_tokens["node-a"],
            "node-node-b": plugin_tokens["node-b"],
        },
        controller_args=[
            "--leader-elect",
            "--identity=pcipt-controller-0",
            "--webhook=serve",
            "--webhook-addr=127.0.0.1",
            f"--webhook-port={webhook_port}",
            "--webhook-secret=pcipt-webhook-tls",
            "--webhook-config=pcipt-webhook",
            "--webhook-service=pcipt-webhook",
            # As the chart's liveness probe calls it (there on 0.0.0.0:8081).
            f"--liveness=http://127.0.0.1:{liveness_port}/healthz",
        ],
        plugin_args=["--rescan-interval", "2", "--lease-interval", "1", "--resync-interval", "1"],
    )
    lab.start(cluster)
    lab.metrics_ports["webhook"] = webhook_port
    lab.metrics_ports["liveness"] = liveness_port
    try:
        yield lab
    finally:
        for p in lab.procs.values():
            p.terminate()
        for p in lab.procs.values():
            p.wait(timeout=20)
        lab.procs.clear()  # the cluster is the module's: leave it running


VM_MANIFEST = (EX / "vm-2gpu.yaml").read_text()
# How Argo CD or Flux apply: server-side, as their own field manager.
GITOPS = ["--server-side", "--field-manager=argocd-controller", "-n", TENANT, "-f", "-"]


def test_components_run_with_exactly_the_charts_rbac(lab: Lab, kubectl: Any) -> None:
    for f in ("namespace-gpu-tenant.yaml", "flavor-gpu-a100.yaml", "flavor-nic-vf.yaml"):
        kubectl("apply", "-f", str(EX / f))
    lab.wait_for("{.status.total}", "4", "pciflavor", "a100", timeout=90)
    # As a GitOps tool applies: server-side, with its own field manager.
    kubectl("apply", *GITOPS, input=VM_MANIFEST)
    lab.wait_for("{.status.phase}", "Running", "ptvm", "trainer", "-n", TENANT, timeout=90)
    kubectl("apply", "-n", TENANT, "-f", str(EX / "vm-sriov-vlan.yaml"))
    lab.wait_for("{.status.phase}", "Running", "ptvm", "router", "-n", TENANT, timeout=90)
    kubectl("delete", "ptvm", "router", "-n", TENANT, "--wait=true", "--timeout=60s")
    lab.wait_for("{.status.free}", "8", "pciflavor", "e810-vf-physnet2", timeout=60)
    leases = kubectl("get", "leases", "-n", NS, "-o", "name").stdout.split()
    assert {
        "lease.coordination.k8s.io/pcipt-node-node-a",
        "lease.coordination.k8s.io/pcipt-node-node-b",
    } <= set(leases)
    election = json.loads(
        kubectl("get", "lease", "pcipt-controller", "-n", NS, "-o", "json").stdout
    )
    assert election["spec"]["holderIdentity"] == "pcipt-controller-0"  # created, and it leads
    # The probes the chart points the kubelet at answer.
    for port, path in (
        (lab.metrics_ports["liveness"], "/healthz"),
        (lab.metrics_ports["controller"], "/readyz"),
    ):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            assert resp.status == 200, path
    for name in lab.procs:
        log = lab.log(name).read_text()
        assert "forbidden" not in log.lower(), f"{name} was refused something:\n{log[-3000:]}"
        assert lab.alive()[name], f"{name} exited:\n{log[-3000:]}"


def test_the_webhook_serves_a_certificate_the_configuration_trusts(
    lab: Lab, kubectl: Any, tmp_path: Path
) -> None:
    secret = json.loads(
        kubectl("get", "secret", "pcipt-webhook-tls", "-n", NS, "-o", "json").stdout
    )
    ca = base64.b64decode(secret["data"]["ca.crt"])
    vwc = json.loads(
        kubectl("get", "validatingwebhookconfiguration", "pcipt-webhook", "-o", "json").stdout
    )
    assert base64.b64decode(vwc["webhooks"][0]["clientConfig"]["caBundle"]) == ca
    (tmp_path / "ca.crt").write_bytes(ca)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    # The API server reaches it as <service>.<namespace>.svc: the name must verify.
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3a1e",
            "kind": {"group": "pcipt.io", "version": "v1alpha1", "kind": "PassthroughVM"},
            "resource": {"group": "pcipt.io", "version": "v1alpha1", "resource": "passthroughvms"},
            "operation": "CREATE",
            "namespace": "default",
            "userInfo": {"username": "tenant"},
            "object": yaml.safe_load(VM_MANIFEST)
            | {"metadata": {"name": "x", "namespace": "default"}},
        },
    }
    body = json.dumps(review).encode()
    with (
        socket.create_connection(("127.0.0.1", lab.metrics_ports["webhook"]), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=f"pcipt-webhook.{NS}.svc") as tls_sock,
    ):
        req = (
            f"POST /passthroughvms HTTP/1.1\r\nHost: pcipt-webhook.{NS}.svc\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        tls_sock.sendall(req + body)
        reply = b""
        while chunk := tls_sock.recv(65536):
            reply += chunk
    answer = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    # The gpu-a100 flavor admits only labelled tenant namespaces: `default` is refused, by name.
    assert answer["response"]["allowed"] is False
    assert "a100" in answer["response"]["status"]["message"]


def test_gitops_reapply_sees_no_drift(lab: Lab, kubectl: Any) -> None:
    """The controller writes labels, a finalizer and status, never spec: re-applying the same
    manifest changes nothing, and the tool's field ownership is untouched."""

    def snapshot() -> dict[str, Any]:
        return json.loads(
            kubectl(
                "get", "ptvm", "trainer", "-n", TENANT, "--show-managed-fields", "-o", "json"
            ).stdout
        )

    before = snapshot()
    assert before["status"]["phase"] == "Running"
    diff = kubectl("diff", *GITOPS, input=VM_MANIFEST, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    kubectl("apply", *GITOPS, input=VM_MANIFEST)
    after = snapshot()
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # a no-op

    def owned(obj: dict[str, Any], manager: str) -> list[dict[str, Any]]:
        return [m for m in obj["metadata"]["managedFields"] if m["manager"] == manager]

    assert owned(after, "argocd-controller") == owned(before, "argocd-controller")
    for m in after["metadata"]["managedFields"]:
        if m["manager"] != "argocd-controller":
            assert "f:spec" not in m.get("fieldsV1", {}), f"{m['manager']} owns spec fields"


def test_upgrade_with_changed_values(helm_bin: str, kenv: dict[str, str], kubectl: Any) -> None:
    ca_before = kubectl(
        "get",
        "validatingwebhookconfiguration",
        "pcipt-webhook",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ).stdout
    run(
        [
            helm_bin,
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            NS,
            "-f",
            str(VALUES),
            "--set",
            "controller.replicas=3",
            "--set",
            "nodePlugin.logLevel=DEBUG",
            "--set",
            "webhook.timeoutSeconds=10",
            "--set",
            "metrics.serviceMonitor.enabled=false",
        ],
        kenv,
    )
    status = json.loads(run([helm_bin, "status", RELEASE, "-n", NS, "-o", "json"], kenv).stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"
    assert (
        kubectl(
            "get", "deploy", "pcipt-controller", "-n", NS, "-o", "jsonpath={.spec.replicas}"
        ).stdout
        == "3"
    )
    args = json.loads(
        kubectl(
            "get",
            "ds",
            "pcipt-node-plugin",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ).stdout
    )
    assert "--log-level=DEBUG" in args
    vwc = json.loads(
        kubectl("get", "validatingwebhookconfiguration", "pcipt-webhook", "-o", "json").stdout
    )
    assert vwc["webhooks"][0]["timeoutSeconds"] == 10
    # helm's three-way merge keeps the CA the controller injected (fields the chart never sets).
    assert vwc["webhooks"][0]["clientConfig"].get("caBundle") == ca_before != ""
    secret = json.loads(
        kubectl("get", "secret", "pcipt-webhook-tls", "-n", NS, "-o", "json").stdout
    )
    assert set(secret.get("data") or {}) == {"ca.crt", "tls.crt", "tls.key"}


def test_uninstall_keeps_crds_and_vms_and_a_reinstall_adopts_them(
    helm_bin: str, kenv: dict[str, str], kubectl: Any
) -> None:
    run([helm_bin, "uninstall", RELEASE, "-n", NS], kenv)
    crds = set(kubectl("get", "crd", "-o", "name").stdout.split())
    assert {
        f"customresourcedefinition.apiextensions.k8s.io/{n}"
        for n in (
            "pcidevices.pcipt.io",
            "pciflavors.pcipt.io",
            "passthroughvms.pcipt.io",
        )
    } <= crds
    assert (
        kubectl("get", "ptvm", "trainer", "-n", TENANT, "-o", "jsonpath={.status.phase}").stdout
        == "Running"
    )
    for kind, name in (
        ("deploy", "pcipt-controller"),
        ("ds", "pcipt-node-plugin"),
        ("clusterrole", "pcipt-controller"),
        ("validatingwebhookconfiguration", "pcipt-webhook"),
    ):
        gone = kubectl("get", kind, name, "-n", NS, check=False)
        assert gone.returncode != 0 and "NotFound" in gone.stderr, (kind, name)
    run([helm_bin, "install", RELEASE, str(CHART), "-n", NS, "-f", str(VALUES)], kenv)
    assert (
        kubectl("get", "ptvm", "trainer", "-n", TENANT, "-o", "jsonpath={.status.phase}").stdout
        == "Running"
    )
