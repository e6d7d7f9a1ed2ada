"""Images that declare device support, against the real API server: the catalog ConfigMaps the
controller watches, the webhook refusing a VM whose image does not support a device, the
scheduler saying so where no webhook runs, and a catalog edit letting a waiting VM through."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from pcipt import constants as c
from pcipt.cli import kubectl_pcipt
from pcipt.images import CATALOG_KEY, CATALOG_LABEL
from tests.integration.conftest import KubeCluster
from tests.integration.ctlfix import OPERATOR_NS, ControllerProcess, LeaseKeeper, World, wait_for

pytestmark = pytest.mark.usefixtures("operator_namespace")

UBUNTU = "https://images.example.com/ubuntu-22.04-cuda.qcow2"
MINIMAL = "https://images.example.com/minimal-1.qcow2"


@pytest.fixture
def catalog(kube: KubeCluster, world: World) -> Iterator[Callable[[str], None]]:
    """Write this test's image catalog ConfigMap (created, then replaced)."""
    core = client.CoreV1Api(kube.api)
    name = f"images-{world.test_id}"

    def write(text: str) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, labels={CATALOG_LABEL: "true"}),
            data={CATALOG_KEY: text},
        )
        try:
            core.create_namespaced_config_map(OPERATOR_NS, body)
        except client.ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_config_map(name, OPERATOR_NS, body)

    yield write
    core.delete_namespaced_config_map(name, OPERATOR_NS)


def catalog_text(world: World, minimal_types: str) -> str:
    return f"""
images:
  - match: "https://images.example.com/ubuntu-*.qcow2"
    deviceTypes: [gpu]
    vendorIDs: ["10de"]
    guestDrivers: [nvidia]
  - match: "{MINIMAL}"
    deviceTypes: [{minimal_types}]
    description: test {world.test_id}
"""


def gpu_vm(world: World, name: str, image: str, flavor: str) -> dict[str, Any]:
    return world.vm(
        name,
        [{"name": "gpu", "flavor": flavor}],
        disks=[{"name": "root", "image": image}],
    )


def refusal_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except client.ApiException as e:
        return str(e.body)
    return ""


def test_the_webhook_refuses_an_image_that_does_not_support_a_device(
    kube: KubeCluster,
    world: World,
    *,
    leases: Callable[..., LeaseKeeper],
    catalog: Callable[[str], None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalog(catalog_text(world, "nic"))
    ctl = ControllerProcess(kube.kubeconfig, tmp_path, "--webhook", "dev").start()
    admission = client.AdmissionregistrationV1Api(kube.api)
    try:
        leases(world.node("a"))
        world.device("a", "0000:3b:00.0")
        world.device("a", "0000:3c:00.0")
        a100 = world.flavor("a100", guestDrivers=["nvidia"])
        strict = world.flavor("strict", imageSupport="Required")
        wait_for(
            lambda: any(
                w.metadata.name == f"validate.{c.GROUP}"
                for w in admission.list_validating_webhook_configuration().items
            ),
            what="webhook configuration",
        )
        msg = wait_for(
            lambda: refusal_of(lambda: gpu_vm(world, "minimal", MINIMAL, a100)),
            what="the webhook's refusal",
        )
        assert f"image {MINIMAL} does not support request gpu" in msg
        assert f"flavor {a100}: gpu, vendor 10de, guest driver nvidia" in msg
        assert "deviceTypes nic" in msg
        other = "https://elsewhere.example.com/debian.qcow2"
        msg = refusal_of(lambda: gpu_vm(world, "unmarked", other, strict))
        assert f"flavor {strict} requires an image marked as supporting it" in msg
        # Marked and supporting: admitted and placed; unmarked, with a flavor that does not
        # require marking: admitted too.
        gpu_vm(world, "ubuntu", UBUNTU, a100)
        gpu_vm(world, "debian", other, a100)
        for name in ("ubuntu", "debian"):
            wait_for(
                lambda n=name: world.get_vm(n).status.phase == "Scheduled", what=f"{name} placed"
            )
        # What `kubectl pcipt images` shows of it.
        argv = ["--kubeconfig", str(kube.kubeconfig), "images", "-o", "json"]
        assert kubectl_pcipt.main(argv) == 0
        shown = capsys.readouterr().out
        assert UBUNTU.replace("22.04-cuda", "*") in shown and a100 in shown
        assert strict in shown  # among the flavors that need a marked image
    finally:
        ctl.stop()
        for w in admission.list_validating_webhook_configuration().items:
            if w.metadata.name == f"validate.{c.GROUP}":
                admission.delete_validating_webhook_configuration(w.metadata.name)


def test_without_a_webhook_the_scheduler_refuses_and_a_catalog_edit_lets_it_through(
    kube: KubeCluster,
    world: World,
    leases: Callable[..., LeaseKeeper],
    catalog: Callable[[str], None],
    tmp_path: Path,
) -> None:
    catalog(catalog_text(world, "nic"))
    ctl = ControllerProcess(kube.kubeconfig, tmp_path).start()
    try:
        leases(world.node("a"))
        world.device("a", "0000:3b:00.0")
        a100 = world.flavor("a100")
        gpu_vm(world, "minimal", MINIMAL, a100)

        def refused() -> Any:
            vm = world.get_vm("minimal")
            cond = next((x for x in vm.status.conditions if x.type == c.COND_SCHEDULED), None)
            return cond is not None and cond.reason == c.REASON_IMAGE_NOT_SUPPORTED and cond

        cond = wait_for(refused, what="ImageNotSupported")
        assert f"image {MINIMAL} does not support request gpu" in cond.message
        catalog(catalog_text(world, "nic, gpu"))  # the admin marks it for GPUs too
        wait_for(
            lambda: world.get_vm("minimal").status.phase == "Scheduled",
            what="placed once the catalog says the image supports GPUs",
        )
    finally:
        ctl.stop()
