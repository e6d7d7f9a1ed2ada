"""Riding out a sick API server: which errors are weather, how long to wait, and how much to say.

- `is_transient`: connection errors, timeouts, 429 and 5xx. Anything else (a 4xx answer, a bug)
  is not retried blindly.
- `Backoff`: capped exponential delays with jitter, so replicas and nodes that lost the server
  together do not come back in step.
- `Health`: a loop's state, logged once per change: the first failure (and a new kind of
  failure) at WARNING, repeats at DEBUG, the recovery at INFO with how many attempts failed.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp

from pcipt.kubeclient import ApiError

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def is_transient(e: BaseException) -> bool:
    if isinstance(e, ApiError):
        return e.status in TRANSIENT_STATUS
    return isinstance(e, aiohttp.ClientError | OSError | asyncio.TimeoutError | TimeoutError)


_RNG = random.Random()
"""Shared: seeding a generator per Backoff (one per pending VM) cost more than the backoff."""


class Backoff:
    """Delays base, 2*base, 4*base ... up to cap; each drawn from its upper half (so never
    shorter than half the nominal delay), reset after a success."""

    def __init__(
        self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or _RNG

    def next(self) -> float:
        nominal = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return float(nominal / 2 + self._rng.uniform(0, nominal / 2))

    def reset(self) -> None:
        self.attempt = 0


class Health:
    """What one loop (a watch, a lease renewal, the audit) says about its failures."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.failures = 0
        self._said: str | None = None

    def failed(self, e: BaseException, retry_in: float | None = None) -> None:
        self.failures += 1
        said = f"{type(e).__name__}: {e}"
        after = f"; retrying in {retry_in:.1f}s" if retry_in is not None else ""
        level = logging.DEBUG if said == self._said else logging.WARNING
        self.log.log(level, "%s failing: %s%s", self.what, said, after)
        self._said = said

    def ok(self) -> None:
        if self.failures:
            self.log.info("%s recovered after %d failed attempt(s)", self.what, self.failures)
        self.failures = 0
        self._said = None
