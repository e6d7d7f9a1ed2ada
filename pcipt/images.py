"""The image catalog: what admins declare each VM image supports, and whether a VM's image
supports the devices it asks for.

Images are referenced in a PassthroughVM by URL or host path (`spec.disks[].image`, and the
kernel of `spec.kernelBoot`); the catalog matches those strings with globs, the way Glance
keeps properties on an image. It lives in ConfigMaps labelled `pcipt.io/image-catalog=true` in
the operator's namespace (the chart's `imageCatalog` value writes one), each holding
`images.yaml`:

    images:
      - match: "https://images.example.com/ubuntu-22.04-*.qcow2"
        deviceTypes: [gpu, nic]          # the flavor's deviceType
        vendorIDs: ["10de", "15b3"]      # every vendor the flavor selects must be here
        classCodes: ["0302", "0207"]     # every class prefix the flavor selects must start so
        guestDrivers: [nvidia, mlx5_core]

A VM's image is the one it boots: its first disk's, or its kernel's with kernelBoot. An image
is marked when an entry matches it; a marked image supports a flavor when one of its entries
does (each list given must admit the flavor; an absent list admits anything; the flavor's
guestDrivers must all be listed). An unmarked image supports every flavor, except a flavor
with `imageSupport: Required`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from pcipt.api.v1alpha1 import PassthroughVM, PciFlavor

CATALOG_LABEL = "pcipt.io/image-catalog"
CATALOG_KEY = "images.yaml"


class ImageSupport(BaseModel):
    """One entry: the images it matches and the devices they support."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    match: str = Field(min_length=1, max_length=2048)
    """A glob over the image a VM boots (its first disk's image, or its kernelBoot.kernel),
    e.g. https://images.example.com/ubuntu-22.04-*.qcow2."""
    device_types: list[str] | None = None
    """Flavor deviceTypes these images support (gpu, nic, nvme, fpga, accelerator, other);
    absent: any."""
    vendor_ids: list[str] | None = Field(default=None, alias="vendorIDs")
    """PCI vendor IDs these images support: every vendor a flavor's selector names must be
    listed (a flavor naming none is not covered); absent: any."""
    class_codes: list[str] | None = None
    """PCI class-code prefixes: every class a flavor's selector names must start with one
    (a flavor naming none is not covered); absent: any."""
    guest_drivers: list[str] = Field(default_factory=list)
    """Drivers the images carry: a flavor's guestDrivers must all be listed."""
    description: str = ""
    """For people (kubectl pcipt images)."""

    def matches(self, image: str) -> bool:
        return fnmatchcase(image, self.match)

    def why_not(self, flavor: PciFlavor) -> str | None:
        """Why this entry does not cover the flavor's devices; None when it does."""
        spec, sel = flavor.spec, flavor.spec.selector
        if self.device_types is not None and spec.device_type not in self.device_types:
            return f"deviceTypes {', '.join(self.device_types)}"
        if self.vendor_ids is not None:
            wanted = [v.lower() for v in sel.vendor_ids or []]
            listed = {v.lower() for v in self.vendor_ids}
            if not wanted or not set(wanted) <= listed:
                return f"vendorIDs {', '.join(self.vendor_ids)}"
        if self.class_codes is not None:
            wanted = [x.lower() for x in sel.class_codes or []]
            if not wanted or not all(
                any(w.startswith(p.lower()) for p in self.class_codes) for w in wanted
            ):
                return f"classCodes {', '.join(self.class_codes)}"
        missing = [d for d in spec.guest_drivers if d not in self.guest_drivers]
        if missing:
            return f"guestDrivers {', '.join(self.guest_drivers) or 'none'}"
        return None


class ImageCatalog(BaseModel):
    """The `images.yaml` of an image catalog ConfigMap."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    images: list[ImageSupport] = Field(default_factory=list)
    """Entries; an image is marked when one matches it."""

    @classmethod
    def parse(cls, text: str) -> ImageCatalog:
        """From a ConfigMap's images.yaml; ValueError naming what is wrong."""
        try:
            data = yaml.safe_load(text) or {}
            return cls.model_validate(data)
        except yaml.YAMLError as e:
            raise ValueError(f"{CATALOG_KEY} is not YAML: {e}") from e
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ValueError(f"{CATALOG_KEY}: {where}: {first['msg']}") from e

    @classmethod
    def merged(cls, catalogs: Iterable[ImageCatalog]) -> ImageCatalog:
        return cls(images=[e for cat in catalogs for e in cat.images])

    def entries_for(self, image: str) -> list[ImageSupport]:
        return [e for e in self.images if e.matches(image)]


def boot_image(vm: PassthroughVM) -> str | None:
    """The image the VM boots: its kernel with kernelBoot, else its first disk's."""
    if vm.spec.kernel_boot is not None:
        return vm.spec.kernel_boot.kernel
    return vm.spec.disks[0].image if vm.spec.disks else None


def image_problem(
    vm: PassthroughVM, request: str, flavor: PciFlavor, catalog: ImageCatalog | None
) -> str | None:
    """Why the VM's image does not support the request's flavor; None when it does."""
    image = boot_image(vm)
    entries = catalog.entries_for(image) if catalog is not None and image else []
    name = flavor.metadata.name
    if not entries:
        if flavor.spec.image_support == "Required":
            what = f"image {image}" if image else "the VM boots no image, and"
            return (
                f"request {request}: flavor {name} requires an image marked as supporting it; "
                f"{what} is in no entry of the image catalog"
            )
        return None
    reasons = [why for e in entries if (why := e.why_not(flavor)) is not None]
    if len(reasons) < len(entries):
        return None
    device = _describe(flavor)
    return (
        f"image {image} does not support request {request} (flavor {name}: {device}): its "
        f"image catalog {'entry lists' if len(entries) == 1 else 'entries list'} "
        + "; ".join(dict.fromkeys(reasons))
    )


def _describe(flavor: PciFlavor) -> str:
    sel = flavor.spec.selector
    parts: list[str] = [flavor.spec.device_type]
    if sel.vendor_ids:
        parts.append(f"vendor {', '.join(sel.vendor_ids)}")
    if sel.class_codes:
        parts.append(f"class {', '.join(sel.class_codes)}")
    if flavor.spec.guest_drivers:
        parts.append(f"guest driver {', '.join(flavor.spec.guest_drivers)}")
    return ", ".join(parts)


def supported_flavors(entry: ImageSupport, flavors: Mapping[str, PciFlavor]) -> list[str]:
    """The flavors whose devices an entry's images support (for `kubectl pcipt images`)."""
    return sorted(n for n, f in flavors.items() if entry.why_not(f) is None)
