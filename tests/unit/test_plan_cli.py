"""`pcipt-controller plan`: the scheduler from manifest files, without a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.cli import main
from tests.conftest import REPO_ROOT


def _device(node: str, address: str, numa: int = 0, **status: object) -> dict[str, object]:
    name = f"{node}.{address.replace(':', '-').replace('.', '-')}"
    return {
        "apiVersion": "pcipt.io/v1alpha1",
        "kind": "PciDevice",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "address": address},
        "status": {
            "vendorID": "10de",
            "productID": "20b0",
            "classCode": "030200",
            "numaNode": numa,
            "health": "Healthy",
            **status,
        },
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    devices = [
        _device("node-a", "0000:3b:00.0"),
        _device("node-a", "0000:3c:00.0"),
        _device("node-b", "0000:3b:00.0", numa=0),
        _device("node-b", "0000:af:00.0", numa=1),
    ]
    out = {
        # A `kind: List`, as `kubectl get -o yaml` writes it.
        "devices": tmp_path / "devices.yaml",
        "flavors": REPO_ROOT / "examples" / "flavor-gpu-a100.yaml",
        "vm": REPO_ROOT / "examples" / "vm-2gpu.yaml",
        "ns": tmp_path / "ns.yaml",
        "nodes": tmp_path / "nodes.yaml",
    }
    out["devices"].write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": devices})
    )
    out["ns"].write_text(yaml.safe_dump({"default": {"pcipt.io/gpu-tenant": "true"}}))
    out["nodes"].write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": "node-a"},
                    "status": {"conditions": [{"type": "Ready", "status": "False"}]},
                },
            ]
        )
    )
    return out


def test_plan_places_the_example_vm(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "plan",
            "--devices",
            str(files["devices"]),
            "--flavors",
            str(files["flavors"]),
            "--vm",
            str(files["vm"]),
            "--namespace-labels",
            str(files["ns"]),
            "-o",
            "json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["result"] == "Placed" and out["node"] == "node-a"
    assert [d["address"] for d in out["devices"]] == ["0000:3b:00.0", "0000:3c:00.0"]


def test_plan_explains_a_refusal_and_exits_2(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "plan",
            "--devices",
            str(files["devices"]),
            "--flavors",
            str(files["flavors"]),
            "--vm",
            str(files["vm"]),
            "--namespace-labels",
            str(files["ns"]),
            "--nodes",
            str(files["nodes"]),
        ]
    )
    out = yaml.safe_load(capsys.readouterr().out)
    assert code == 2 and out["result"] == "Refused" and out["reason"] == "Unschedulable"
    assert out["message"] == (
        "0/2 nodes are available: 1 node(s) cannot place gpus on a single NUMA node "
        "(at most 1 free a100 on one); 1 node(s) not alive."
    )


def test_plan_refuses_a_namespace_the_flavor_does_not_permit(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "plan",
            "--devices",
            str(files["devices"]),
            "--flavors",
            str(files["flavors"]),
            "--vm",
            str(files["vm"]),
        ]
    )
    out = yaml.safe_load(capsys.readouterr().out)
    assert code == 2 and out["reason"] == "NotPermitted"
    assert "namespace default may not use flavor a100" in out["message"]


def test_plan_names_the_file_and_object_of_a_bad_manifest(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_device("node-a", "0000:zz:00.0")))
    code = main(
        [
            "plan",
            "--devices",
            str(bad),
            "--flavors",
            str(files["flavors"]),
            "--vm",
            str(files["vm"]),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 1
        and str(bad) in err
        and "node-a.0000-zz-00-0" in err
        and "is not a PCI address" in err
    )


def test_plan_console_script_runs(files: dict[str, Path]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller",
            "plan",
            "--devices",
            str(files["devices"]),
            "--flavors",
            str(files["flavors"]),
            "--vm",
            str(files["vm"]),
            "--namespace-labels",
            str(files["ns"]),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "result: Placed" in proc.stdout


def test_the_readme_plan_example(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ex = REPO_ROOT / "examples"
    args = [
        "plan",
        "--devices",
        str(ex / "lab-devices.yaml"),
        "--flavors",
        str(ex / "flavor-gpu-a100.yaml"),
        "--vm",
        str(ex / "vm-2gpu.yaml"),
        "--namespace",
        "gpu-tenants",
        "--namespace-labels",
        str(ex / "namespace-gpu-tenant.yaml"),
    ]
    assert main(args) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["node"] == "node-a" and [d["address"] for d in out["devices"]] == [
        "0000:3b:00.0",
        "0000:3c:00.0",
    ]
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n"
        "status: {conditions: [{type: Ready, status: 'False'}]}\n"
    )
    assert main([*args, "--nodes", str(nodes)]) == 2
    out = yaml.safe_load(capsys.readouterr().out)
    assert (
        out["message"]
        == "0/2 nodes are available: 1 node(s) have only 1 free a100 (need 2); 1 node(s) not alive."
    )


def test_plan_shows_the_cpus_and_numa_node_chosen(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pcipt.compute import ANNOTATION, NodeCompute, NumaCompute

    topo = NodeCompute(
        {
            0: NumaCompute(
                tuple(range(2, 16)) + tuple(range(18, 32)),
                tuple((c, c + 16) for c in range(2, 16)),
                131072,
            )
        },
        reserved_cpus=(0, 1, 16, 17),
    )
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "pcipt-node-node-a", "annotations": {ANNOTATION: topo.to_json()}},
    }
    nodes = tmp_path / "leases.yaml"
    nodes.write_text(yaml.safe_dump(lease))
    vm = yaml.safe_load(files["vm"].read_text())
    vm["spec"]["cpu"]["policy"] = "dedicated"
    vm_file = tmp_path / "vm.yaml"
    vm_file.write_text(yaml.safe_dump(vm))
    args = ["plan", "--devices", str(files["devices"]), "--flavors", str(files["flavors"])]
    args += ["--namespace-labels", str(files["ns"]), "--nodes", str(nodes), "-o", "json"]
    code = main([*args, "--vm", str(vm_file)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["node"] == "node-a" and out["numaNode"] == 0
    assert out["cpusAndMemory"] == ("NUMA 0: 16 dedicated vCPUs on host CPUs 2-9,18-25, 65536 MiB")
    assert out["compute"]["numa"][0]["cpus"][:4] == [2, 18, 3, 19]
    # With a placed VM holding most of node-a's CPUs, node-b (no topology published: not
    # counted) gets it... but its GPUs are on two NUMA nodes, so it is refused, naming CPUs.
    placed = {
        "apiVersion": "pcipt.io/v1alpha1",
        "kind": "PassthroughVM",
        "metadata": {"name": "big", "namespace": "default"},
        "spec": {"memory": "1Gi"},
        "status": {"nodeName": "node-a", "compute": out["compute"]},
    }
    placed_file = tmp_path / "placed.yaml"
    placed_file.write_text(yaml.safe_dump(placed))
    code = main([*args, "--vm", str(vm_file), "--placed", str(placed_file)])
    out = json.loads(capsys.readouterr().out)
    assert code == 2
    assert "have only 12 free CPUs on NUMA node 0 for 16 dedicated vCPUs" in out["message"]
