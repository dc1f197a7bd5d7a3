"""Per-key rate limit: a token bucket per API key, in this process's memory.

Each key gets ``burst`` tokens that refill at ``rate_per_s``; a request takes one. The buckets
live in one gateway process: N instances behind a load balancer allow a key up to N times the
rate (documented in settings.py). A shared limit would need Redis or similar, which Harbour
does not run; per-instance limits still bound what one key can do to one instance.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucketLimiter:
    """``acquire(key)`` returns 0 when the request may go, else the seconds until it could.

    Buckets are kept in LRU order and capped at ``max_keys`` (an evicted bucket starts full
    again, which only ever errs towards allowing a request).
    """

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str) -> float:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))  # float ok: token bucket
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)  # float ok
        if tokens >= 1.0:
            self._remember(key, tokens - 1.0, now)
            return 0.0
        self._remember(key, tokens, now)
        return (1.0 - tokens) / self.rate_per_s

    def _remember(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
