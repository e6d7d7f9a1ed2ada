"""The tenant guide's table of refusal reasons is the code's: every form the scheduler can
give is listed there, every listed form is one the scheduler gives, and every reason a set
of refusing scenarios produces has one of those forms."""

from __future__ import annotations

import re

from controller.scheduling import REFUSAL_FORMS, NodeFacts, Placement, Refusal, schedule
from pcipt.api.v1alpha1 import HugepagesSpec, Migration, PassthroughVM
from pcipt.compute import NodeCompute, NumaCompute
from tests.conftest import REPO_ROOT
from tests.unit.schedfix import dev, flavor, inp, nic_flavor, other_claim, vf, vm

A = "node-a"
GUIDE = REPO_ROOT / "docs" / "tenant-guide.md"


def guide_forms() -> set[str]:
    text = GUIDE.read_text()
    table = text[text.index("<!-- reasons:") :].split("\n\n", 1)[0]
    return {
        m.group(1)
        for line in table.splitlines()
        if (m := re.match(r"\| `([^`]+)` \|", line)) and not line.startswith("| Reason")
    }


def refusing_scenarios() -> list[Refusal]:
    g = [{"name": "gpu", "flavor": "a100"}]
    out = [
        schedule(inp(vm(g), [dev(A, "0000:3b:00.0", claim=other_claim())])),
        schedule(inp(vm([{**g[0], "count": 2}]), [dev(A, "0000:3b:00.0")])),
        schedule(inp(vm([{**g[0], "address": "0000:3c:00.0"}]), [dev(A, "0000:3b:00.0")])),
        schedule(
            inp(
                vm([{**g[0], "count": 2, "numaPolicy": "required"}]),
                [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:3c:00.0", numa=-1)],
            )
        ),
        schedule(
            inp(
                vm(
                    [{"name": "a", "flavor": "a100"}, {"name": "b", "flavor": "a100"}],
                    same_numa=["a", "b"],
                ),
                [dev(A, "0000:3b:00.0", numa=0), dev(A, "0000:3c:00.0", numa=1)],
            )
        ),
        schedule(
            inp(
                vm(
                    [{"name": "a", "flavor": "a100"}, {"name": "b", "flavor": "a100"}],
                    same_root=["a", "b"],
                ),
                [
                    dev(A, "0000:3b:00.0", root="pci0000:3a"),
                    dev(A, "0000:af:00.0", root="pci0000:ae"),
                ],
            )
        ),
        # An alternative over its flavor's per-VM limit is passed over; the H100 is missing.
        schedule(
            inp(
                vm(
                    [
                        {
                            "name": "gpu",
                            "flavor": "h100",
                            "alternatives": [{"flavor": "a100", "count": 2}],
                        }
                    ]
                ),
                [dev(A, "0000:3b:00.0"), dev(A, "0000:3c:00.0")],
                [
                    flavor("h100", selector={"productIDs": ["2330"]}),
                    flavor(limits={"maxPerVM": 1}),
                ],
            )
        ),
        # A PF and its VF, both of the flavor: never both to one VM.
        schedule(
            inp(
                vm([{**g[0], "count": 2}]),
                [
                    dev(A, "0000:3b:00.0", group=1),
                    dev(A, "0000:3b:02.0", group=2, phys_fn="0000:3b:00.0"),
                ],
            )
        ),
        schedule(
            inp(
                vm(
                    [
                        {"name": "a", "flavor": "a100", "numaPolicy": "required"},
                        {"name": "b", "flavor": "a100", "numaPolicy": "required"},
                    ]
                ),
                [
                    dev(A, "0000:3b:00.0", numa=0, group=1, peers=("0000:3c:00.0",)),
                    dev(A, "0000:3c:00.0", numa=0, group=1, peers=("0000:3b:00.0",)),
                ],
            )
        ),
        schedule(inp(vm(g), [dev(A, "0000:3b:00.0")], nodes=[NodeFacts(A, alive=False)])),
        schedule(inp(vm(g), [dev(A, "0000:3b:00.0")], nodes=[NodeFacts(A, out_of_service=True)])),
        schedule(inp(migrating(vm(g), to="b"), [dev(A, "0000:3b:00.0")])),
        schedule(inp(migrating(vm(g), from_="a-node"), [dev(A, "0000:3b:00.0")])),
        schedule(inp(vm(g, node_selector={"zone": "b"}), [dev(A, "0000:3b:00.0")])),
        schedule(
            inp(
                vm(networks=[{"name": "n", "flavor": "vf", "trusted": True}]),
                [vf(A, "0000:5e:02.0", group=3)],
                [nic_flavor(networking={"allowTrusted": True}), flavor()],
            )
        ),
    ]
    out += compute_scenarios()
    assert all(isinstance(r, Refusal) for r in out)
    return [r for r in out if isinstance(r, Refusal)]


def migrating(
    the_vm: PassthroughVM, from_: str = "elsewhere", to: str | None = None
) -> PassthroughVM:
    the_vm.status.migration = Migration.model_validate(
        {
            "id": "m1",
            "fromNode": A if from_ == "a-node" else from_,
            "toNode": to,
            "phase": "Placing",
        }
    )
    return the_vm


def compute_scenarios() -> list[Refusal | Placement]:
    topo = NodeCompute(
        {0: NumaCompute((0, 1), ((0, 1),), 2048, {2048: 256}), 1: NumaCompute((2, 3), (), 2048)}
    )
    nodes = [NodeFacts(A, compute=topo)]

    def one(cores: int, memory: str, **cpu: object) -> Refusal | Placement:
        hugepages = cpu.pop("hugepages", None)
        local = cpu.pop("local", False)
        the_vm = vm([{"name": "gpu", "flavor": "a100", "numaPolicy": "required"}] if local else [])
        the_vm.spec.cpu = the_vm.spec.cpu.model_copy(update={"cores": cores, **cpu})
        the_vm.spec.memory = memory
        if hugepages:
            the_vm.spec.hugepages = HugepagesSpec(pageSize=hugepages)  # type: ignore[call-arg]
        return schedule(inp(the_vm, [dev(A, "0000:3b:00.0", numa=0)], nodes=nodes))

    return [
        one(1, "8Gi"),
        one(5, "1Gi"),
        one(3, "1Gi", policy="dedicated"),
        one(3, "1Gi", local=True),
        one(1, "3Gi", local=True),
        one(1, "1Gi", hugepages="2Mi", local=True),
    ]


def test_the_guide_lists_exactly_the_forms_the_code_gives() -> None:
    assert guide_forms() == set(REFUSAL_FORMS)


def test_every_reason_given_has_a_listed_form_and_every_form_is_given() -> None:
    used: set[str] = set()
    for refusal in refusing_scenarios():
        for node in refusal.nodes:
            for reason in node.reasons:
                forms = [f for f, rx in REFUSAL_FORMS.items() if re.fullmatch(rx, reason)]
                assert forms, f"{reason!r} has no form in REFUSAL_FORMS"
                used.update(forms)
    assert used == set(REFUSAL_FORMS), set(REFUSAL_FORMS) - used
