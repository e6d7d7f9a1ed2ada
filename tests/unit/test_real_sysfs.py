"""Smoke test on this machine's real /sys: discovery must agree with lspci -Dnk (Debian's
pciutils) on every function's address, IDs, class and driver."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nodeplugin.discovery import discover

SYS = Path("/sys")


def lspci() -> dict[str, dict[str, str | None]]:
    exe = shutil.which("lspci")
    assert exe, "lspci is missing: install pciutils (hack/install-system-deps.sh does)"
    out = subprocess.run([exe, "-Dnk"], capture_output=True, text=True, check=True).stdout
    found: dict[str, dict[str, str | None]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(
            r"^([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) ([0-9a-f]{4}): ([0-9a-f]{4}):([0-9a-f]{4})",
            line,
        )
        if m:
            current = m.group(1)
            found[current] = {
                "class": m.group(2),
                "vendor": m.group(3),
                "product": m.group(4),
                "driver": None,
            }
        elif current and (d := re.match(r"^\s+Kernel driver in use: (\S+)", line)):
            found[current]["driver"] = d.group(1)
    return found


@pytest.mark.skipif(
    not any((SYS / "bus/pci/devices").glob("*")),
    reason="this machine exposes no PCI devices in /sys",
)
def test_discovery_agrees_with_lspci_on_this_machine() -> None:
    expected = lspci()
    functions = discover(SYS).by_address()
    assert set(functions) == set(expected)
    for address, want in expected.items():
        f = functions[address]
        assert (f.vendor_id, f.product_id) == (want["vendor"], want["product"]), address
        assert f.class_code[:4] == want["class"], address
        assert f.driver == want["driver"], address
