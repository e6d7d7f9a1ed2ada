"""Whether a released device may be offered again: the rule the controller schedules by and
the kubectl plugin shows, in one place. Pure."""

from __future__ import annotations

from pcipt.api.v1alpha1 import PciDevice

HELD_SCRUBBING = "being scrubbed after release"
HELD_SCRUB_FAILED = "whose scrub after release failed"
HELD_QUARANTINE = "in quarantine after release"


def held_back(dev: PciDevice, now: float) -> str | None:
    """Why a released device is not offered yet, or None: the node plugin has not answered
    its release with a scrub, its scrub failed, or its quarantine lasts (`now`: epoch s)."""
    rel = dev.spec.release
    if rel is None or dev.spec.claim_ref is not None:
        return None
    scrub = dev.status.scrub
    if rel.scrub and (scrub is None or scrub.release_id != rel.id):
        return HELD_SCRUBBING
    if rel.scrub and scrub is not None and scrub.phase != "Done":
        return HELD_SCRUB_FAILED
    if rel.quarantine_until is not None and rel.quarantine_until.timestamp() > now:
        return HELD_QUARANTINE
    return None
