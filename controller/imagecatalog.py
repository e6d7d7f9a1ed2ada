"""The image catalog as the controller sees it: every ConfigMap labelled
`pcipt.io/image-catalog=true` in the operator's namespace, watched, parsed and merged into the
inventory (pcipt/images.py says what the entries mean). A ConfigMap that does not parse is
left out, with a warning naming it and what is wrong, and its last good content is kept, so
a typo never opens or closes images by accident."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from controller.inventory import Inventory
from pcipt.images import CATALOG_KEY, CATALOG_LABEL, ImageCatalog
from pcipt.informer import Informer
from pcipt.kubeclient import KubeClient

log = logging.getLogger("pcipt.controller.images")


class ImageCatalogWatch:
    def __init__(
        self, api: KubeClient, namespace: str, inventory: Inventory, changed: Callable[[], None]
    ) -> None:
        self.inventory = inventory
        self.changed = changed
        """Called when what images support changed: waiting VMs are looked at again."""
        self.catalogs: dict[str, ImageCatalog] = {}
        self.errors: dict[str, str] = {}
        """ConfigMap name -> why its content is not used (for logs and tests)."""
        self.configmaps = Informer(
            api,
            f"/api/v1/namespaces/{namespace}/configmaps",
            label_selector=f"{CATALOG_LABEL}=true",
            on_event=self._event,
            name="image-catalog",
        )

    def parse_all(self, items: list[dict[str, Any]]) -> ImageCatalog:
        """The catalog as these ConfigMaps say it (one that does not parse: its last good
        content here, as the watch keeps it)."""
        out: list[ImageCatalog] = []
        for obj in sorted(items, key=lambda o: o["metadata"]["name"]):
            try:
                out.append(ImageCatalog.parse((obj.get("data") or {}).get(CATALOG_KEY, "")))
            except ValueError:
                if (last := self.catalogs.get(obj["metadata"]["name"])) is not None:
                    out.append(last)
        return ImageCatalog.merged(out)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.catalogs.pop(name, None)
            self.errors.pop(name, None)
        else:
            text = (obj.get("data") or {}).get(CATALOG_KEY, "")
            try:
                self.catalogs[name] = ImageCatalog.parse(text)
                self.errors.pop(name, None)
            except ValueError as e:
                if self.errors.get(name) != str(e):
                    log.warning(
                        "image catalog configmap=%s not used (%s); %s", name, e,
                        "its last good content stays" if name in self.catalogs else "it is empty",
                    )  # fmt: skip
                self.errors[name] = str(e)
                return
        merged = ImageCatalog.merged(self.catalogs[n] for n in sorted(self.catalogs))
        if merged != self.inventory.images:
            self.inventory.images = merged
            log.info(
                "image catalog: %d entries from %d configmap(s)",
                len(merged.images),
                len(self.catalogs),
            )
            self.changed()
