"""The image catalog's meaning: which images are marked, and which flavors a marked image
supports (pcipt/images.py); and the refusal the scheduler and the webhook give."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from controller.scheduling import Refusal, request_problems, schedule
from pcipt.api.v1alpha1 import PassthroughVM
from pcipt.images import ImageCatalog, boot_image, image_problem
from tests.unit.schedfix import dev, flavor, inp, nic_flavor, vf

UBUNTU = "https://images.example.com/ubuntu-22.04-cuda.qcow2"
CATALOG = ImageCatalog.parse(
    """
images:
  - match: "https://images.example.com/ubuntu-*.qcow2"
    deviceTypes: [gpu, nic]
    vendorIDs: ["10de", "8086"]
    guestDrivers: [nvidia, iavf]
  - match: "file:///var/lib/pcipt/images/minimal-*"
    deviceTypes: [nic]
"""
)


def vm(
    image: str | None, devices: list[dict[str, Any]] | None = None, **spec: Any
) -> PassthroughVM:
    disks = [{"name": "root", "image": image}] if image else []
    return PassthroughVM.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "t", "uid": "u"},
            "spec": {"memory": "1Gi", "disks": disks, "devices": devices or [], **spec},
        }
    )


GPU = [{"name": "gpu", "flavor": "a100"}]


def test_the_image_is_the_first_disks_or_the_kernel() -> None:
    assert boot_image(vm(UBUNTU)) == UBUNTU
    kb = {"kernel": "file:///boot/vmlinuz-lab", "initrd": "file:///boot/initrd"}
    assert boot_image(vm(UBUNTU, kernelBoot=kb)) == "file:///boot/vmlinuz-lab"
    assert boot_image(vm(None)) is None


def test_a_marked_image_supports_what_an_entry_lists() -> None:
    a100 = flavor(guestDrivers=["nvidia"])
    assert image_problem(vm(UBUNTU, GPU), "gpu", a100, CATALOG) is None
    # A guest driver the image does not have.
    amd = flavor("mi300", guestDrivers=["amdgpu"])
    why = image_problem(vm(UBUNTU, GPU), "gpu", amd, CATALOG)
    assert why is not None and UBUNTU in why and "request gpu" in why
    assert "guest driver amdgpu" in why and "guestDrivers nvidia, iavf" in why
    # A vendor not listed; a flavor naming no vendor is not known to be supported either.
    assert "vendorIDs 10de, 8086" in (
        image_problem(vm(UBUNTU), "gpu", flavor("x", selector={"vendorIDs": ["1002"]}), CATALOG)
        or ""
    )
    assert image_problem(vm(UBUNTU), "gpu", flavor("any", selector={}), CATALOG) is not None
    # The minimal image is marked for NICs only.
    minimal = "file:///var/lib/pcipt/images/minimal-1.raw"
    why = image_problem(vm(minimal, GPU), "gpu", a100, CATALOG)
    assert why is not None and "deviceTypes nic" in why
    assert image_problem(vm(minimal), "net", nic_flavor(), CATALOG) is None


def test_an_unmarked_image_takes_anything_unless_the_flavor_requires_marking() -> None:
    other = "https://elsewhere.example.com/debian.qcow2"
    assert image_problem(vm(other, GPU), "gpu", flavor(), CATALOG) is None
    assert image_problem(vm(other, GPU), "gpu", flavor(), None) is None
    strict = flavor(imageSupport="Required")
    why = image_problem(vm(other, GPU), "gpu", strict, CATALOG)
    assert why is not None and "requires an image marked as supporting it" in why
    assert other in why
    assert image_problem(vm(UBUNTU, GPU), "gpu", strict, CATALOG) is None


def test_admission_and_the_scheduler_refuse_with_the_image_and_the_device() -> None:
    case = replace(
        inp(vm("file:///var/lib/pcipt/images/minimal-1.raw", GPU), [dev("a", "0000:3b:00.0")]),
        images=CATALOG,
    )
    got = schedule(case)
    assert isinstance(got, Refusal) and got.reason == "ImageNotSupported"
    assert "minimal-1.raw does not support request gpu" in got.message
    problems = request_problems(case.vm, case.flavors, {}, CATALOG)
    assert problems == [got.message]
    assert request_problems(case.vm, case.flavors, {}, None) == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("images: [{deviceTypes: [gpu]}]", "images.0.match: Field required"),
        ("images: [{match: x, colour: red}]", "images.0.colour"),
        ("images: [", "is not YAML"),
    ],
)
def test_a_bad_catalog_is_refused_naming_the_field(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("[", r"\[")):
        ImageCatalog.parse(text)


def test_vfs_of_a_marked_image_need_a_nic_entry() -> None:
    case = inp(
        vm(UBUNTU, networks=[{"name": "net", "flavor": "vf"}]),
        [vf("a", "0000:5e:02.0")],
        [nic_flavor()],
    )
    assert request_problems(case.vm, case.flavors, {}, CATALOG) == []
