"""The hardware lab in `make test`: every scenario of tests/hwlab/run.py on a real kernel under
QEMU (an emulated IOMMU, NVMe and igb with SR-IOV), as `make hwlab` runs them, the end-to-end
one included (the controller here, the node plugin and nested guests in the lab host). The
runner prints each scenario's result; this asserts they all ran and passed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# Slow by nature: six lab hosts booted under TCG, two nested guests.
pytestmark = pytest.mark.timeout(1500)


def test_every_hardware_lab_scenario_passes_on_a_real_kernel() -> None:
    got = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "hwlab" / "run.py")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    print(got.stdout)
    last = got.stdout.strip().splitlines()[-1] if got.stdout.strip() else ""
    assert got.returncode == 0 and last.endswith(" failed") and " 0 failed" in last, (
        got.stdout[-6000:] + got.stderr[-3000:]
    )
    for scenario in ("discovery", "vfio", "vfiofail", "vfcount", "sriov", "e2e"):
        assert f"PASS {scenario} " in got.stdout, got.stdout[-3000:]
