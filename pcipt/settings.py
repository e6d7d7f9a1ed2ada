"""Every command-line setting of the components has an environment twin, PCIPT_<NAME>, so
the chart can set it; this is the one place that spells the prefix."""

from __future__ import annotations

import os

PREFIX = "PCIPT_"


def env(name: str, default: str) -> str:
    """The value of PCIPT_<name>, or default when it is unset."""
    return os.environ.get(PREFIX + name, default)
