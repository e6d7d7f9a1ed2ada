"""The benchmarks keep working: each runs end to end at a tiny size against its real components
and writes every figure its docstring promises. Speed is never asserted here; the figures in
docs/performance.md come from the full-size runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

# Slow by nature: each benchmark runs a control plane and a burst.
pytestmark = pytest.mark.timeout(1200)


def run_bench(tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    out = tmp_path / "figures.json"
    got = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), *args, "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def positive(*values: float) -> bool:
    return all(v > 0 for v in values)


def test_bind_benchmark_reports_every_phase(tmp_path: Path) -> None:
    f = run_bench(
        tmp_path,
        "bind.py",
        *("--nodes", "4", "--devices", "4", "--rate", "5", "--steady", "1"),
        *("--waiting", "3", "--r-seconds", "0.5"),
    )
    assert set(f["R_conditional_patches_per_s"]) == {"1", "8", "32"}
    fill = f["fill"]
    assert fill["vms"] == 8 and positive(fill["binds_per_s"], fill["fraction_of_R_over_w"])
    # Every bind writes the claim, the VM's status and one Event: no more (the finalizer came
    # with the VM's creation, and no label is written). The window is the fill's; on a loaded
    # machine an Event or a flavor's status from the pre-fill can land in it too (both are
    # written behind the binds), so those two are bounded, not exact.
    writes = fill["writes_by_kind"]
    for kind in ("PATCH/pcidevices", "PATCH/passthroughvms/status"):
        assert writes[kind] == 8, writes
    # Behind the binds: Events, flavor counts, every device's count for inventory.
    late = {"POST/events", "PATCH/pciflavors/status", "PUT/configmaps", "POST/configmaps"}
    assert set(writes) <= {"POST/passthroughvms", "PATCH/pcidevices",
                           "PATCH/passthroughvms/status", *late}, writes  # fmt: skip
    assert 8 <= writes["POST/events"] <= 16, writes
    assert fill["controller_writes_per_bind"] >= 3
    assert f["controller_ready_s"] > 0 and f["controller_memory_ready_mib"]["rss"] > 0
    assert fill["controller_memory_mib"]["peak"] >= fill["controller_memory_mib"]["rss"] > 0
    assert f["inventory_cli"]["rows"] >= 4 and f["inventory_cli"]["seconds"] > 0
    assert f["inventory_cli"]["counted_by"] == "kubectl-pcipt"  # 500 nodes or fewer
    assert f["inventory_cli_recount"]["rows"] == f["inventory_cli"]["rows"]
    assert f["release"]["vms"] == 5 and positive(f["release"]["releases_per_s"])
    assert f["steady"]["vms"] == 5
    assert f["requeue"]["waiting"] == 3
    assert (
        0
        < f["requeue"]["release_to_scheduled_s"]["p50"]
        <= f["requeue"]["release_to_scheduled_s"]["max"]
    )


def test_end_to_end_benchmark_runs_vms_on_simulated_hosts(tmp_path: Path) -> None:
    f = run_bench(tmp_path, "e2e.py", "--hosts", "2", "--gpus", "3", "--vms", "3")
    for run in ("burst", "paced"):
        assert f[run]["vms"] == 3 and 0 < f[run]["p50_s"] <= f[run]["p99_s"], f[run]


def test_discovery_benchmark_publishes_then_writes_nothing(tmp_path: Path) -> None:
    f = run_bench(tmp_path, "discovery.py", "--pfs", "2", "--vfs", "4", "--rounds", "2")
    assert f["functions"] == 10 and f["offered"] == 8
    assert f["first_rescan"]["devices"] == 8 and f["first_rescan"]["writes"] == 16
    assert f["quiet_rescan"]["writes"] == 0 and f["quiet_plan_writes"] == 0
    mem = f["nodeplugin_memory_mib"]
    assert 0 < mem["published"]["rss"] <= mem["published"]["peak"] <= mem["after_rescans"]["peak"]


def test_node_benchmark_starts_and_tears_down_a_node(tmp_path: Path) -> None:
    f = run_bench(tmp_path, "node.py", "--runs", "1", "--no-chart")
    assert f["runs"] == 1
    assert positive(f["node_ready_s_median"], f["teardown_s_median"], f["rss_mib_node_only_median"])


def test_schedule_benchmark_times_every_kind_of_decision(tmp_path: Path) -> None:
    f = run_bench(tmp_path, "schedule.py", "--nodes", "20", "--runs", "3")
    assert f["packing_placed"] is True
    for key in ("one_gpu_indexed", "one_gpu_every_node", "packing", "dedicated"):
        assert 0 < f[key]["p50_ms"] <= f[key]["p99_ms"], (key, f[key])
    assert f["refusal_from_memo"]["p50_ms"] > 0 and f["refusal_every_node"]["p50_ms"] > 0


def test_lifecycle_benchmark_evacuates_every_vm(tmp_path: Path) -> None:
    f = run_bench(tmp_path, "lifecycle.py", "--vms", "4")
    ev = f["evacuation"]
    assert f["vms"] == 4 and positive(ev["all_placed_again_s"], ev["vms_per_s"])
    assert 0 < ev["taint_to_placed_s"]["p50"] <= ev["taint_to_placed_s"]["max"]
    # Per VM: its unplaced status, the release, and the new bind's claim, metadata and status.
    assert ev["writes_by_kind"]["PATCH/pcidevices"] >= 8, ev["writes_by_kind"]
    assert ev["writes_per_vm"] >= 5


def test_peer_dra_benchmark_fills_with_the_real_kube_scheduler(tmp_path: Path) -> None:
    """The peer (issue 14): kube-scheduler allocating DRA ResourceClaims to pods, same sizes."""
    f = run_bench(tmp_path, "peer_dra.py", "--nodes", "4", "--devices", "4")
    fill = f["fill"]
    assert fill["pods"] == 8 and positive(fill["pods_per_s"], fill["time_to_bound_s"]["p99"])
    # The scheduler's own writes per placement: at least the claim's allocation and the bind.
    writes = fill["writes_by_kind"]
    assert writes.get("POST/pods/binding") == 8, writes
    assert fill["scheduler_writes_per_placement"] >= 2, writes


def test_peer_comparison_runs_both_sides_and_says_what_bounds_them(tmp_path: Path) -> None:
    """bench/peer_compare.py at the smallest size: both sides in turn, the ratio, and each
    side's writes and CPU per placement with the rate that CPU allows on this machine."""
    f = run_bench(tmp_path, "peer_compare.py", "--nodes", "2", "--devices", "4", "--rounds", "1")
    assert f["pcipt_over_dra_raised"] > 0 and f["pcipt_over_dra_defaults"] > 0
    for side in ("pcipt", "dra-raised", "dra-defaults"):
        (r,) = f["rounds"][side]
        assert r["per_s"] > 0 and r["cpu_bound_per_s"] > 0, (side, r)
        assert sum(r["cpu_ms_per_placement"].values()) > 0, (side, r)
    assert f["rounds"]["pcipt"][0]["writes_per_placement"] >= 3  # claim, status, Event
