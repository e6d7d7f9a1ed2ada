"""Administrative settings of an SR-IOV VF, made on its PF with `ip link`: spoof checking and
trust always; VLAN and MAC too in macvtap mode (in hostdev mode libvirt sets those itself from
the domain's `<interface type='hostdev'>`).

Commands go through a runner: the real one runs `ip`; simulated hosts record them.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("pcipt.nodeplugin.sriov")


class CommandRunner(Protocol):
    def run(self, argv: list[str]) -> None: ...

    def output(self, argv: list[str]) -> str:
        """Run a command that only reads, and return what it printed."""
        ...


class SriovError(RuntimeError):
    """A VF setting was refused; the message carries the command's own words."""


class IpRunner:
    """Runs the host's own tools (ip, nvme)."""

    def run(self, argv: list[str]) -> None:
        self.output(argv)

    def output(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SriovError(f"`{' '.join(argv)}` failed: {e}") from e
        if proc.returncode != 0:
            raise SriovError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout


@dataclass
class RecordingRunner:
    """Records commands instead of running them (tests, simulated hosts)."""

    commands: list[list[str]] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    """What a reading command prints, by its first three words."""

    def run(self, argv: list[str]) -> None:
        self.commands.append(list(argv))

    def output(self, argv: list[str]) -> str:
        self.commands.append(list(argv))
        return self.answers.get(" ".join(argv[:3]), "")


def vf_commands(
    pf_netdev: str,
    vf_index: int,
    *,
    spoof_check: bool,
    trusted: bool,
    mac: str | None = None,
    vlan: int | None = None,
    macvtap: bool = False,
    min_tx_rate: int | None = None,
    max_tx_rate: int | None = None,
    link_state: str | None = None,
) -> list[list[str]]:
    base = ["ip", "link", "set", "dev", pf_netdev, "vf", str(vf_index)]
    cmds = [
        # A VF's settings live on its PF, and libvirt refuses to set a VF's MAC or VLAN while
        # the PF is down ("the PF is not online"): found on the hardware lab's igb.
        ["ip", "link", "set", "dev", pf_netdev, "up"],
        [*base, "spoofchk", "on" if spoof_check else "off", "trust", "on" if trusted else "off"],
    ]
    if macvtap:
        cmds.append([*base, "vlan", str(vlan or 0)])
        if mac:
            cmds.append([*base, "mac", mac])
    if min_tx_rate or max_tx_rate:
        # Both in one command (the kernel takes them as one setting); 0 is "none". Only when
        # asked: a driver without rate limiting (most refuse min_tx_rate) fails only VMs that
        # ask for it.
        cmds.append(
            [*base, "min_tx_rate", str(min_tx_rate or 0), "max_tx_rate", str(max_tx_rate or 0)]
        )
    if link_state in ("auto", "enable", "disable"):
        cmds.append([*base, "state", link_state])
    return cmds


LINK_SETTLE_SECONDS = 5.0
"""How long a rate setting is retried after the PF was brought up: drivers refuse a VF's rate
while the port's link is still down (igb answers EINVAL; found in the hardware lab, where the
first try right after `ip link set dev PF up` failed and one 0.4 s later took)."""


def configure_vf(
    runner: CommandRunner,
    pf_netdev: str,
    vf_index: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
    **settings: object,
) -> None:
    for argv in vf_commands(pf_netdev, vf_index, **settings):  # type: ignore[arg-type]
        if "max_tx_rate" in argv:
            _retry_while_link_settles(runner, argv, sleep)
        else:
            runner.run(argv)
        if "vf" in argv:
            log.info("configured vf pf=%s vf=%d: %s", pf_netdev, vf_index, " ".join(argv[7:]))


def _retry_while_link_settles(
    runner: CommandRunner, argv: list[str], sleep: Callable[[float], None]
) -> None:
    waited = 0.0
    while True:
        try:
            runner.run(argv)
            return
        except SriovError:
            if waited >= LINK_SETTLE_SECONDS:
                raise
            sleep(0.5)
            waited += 0.5
