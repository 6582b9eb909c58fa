"""Which cached models to evict: a pure plan over the cache's entries, so that `mstar
weights gc --dry-run`, a server's background eviction and the tests all decide alike.

Least recently used first. An entry goes when it has been unused longer than
`unused_threshold`, or while the cache is over `max_size_bytes`, its disk has less than
`min_free_space_bytes` free, or it holds more than `max_models` snapshots. A pinned or
leased (in use by a running server) entry never goes, nor one mstar has never used
(`last_used` None: a snapshot another tool put in the shared Hugging Face cache is not
mstar's to delete); all of them still count towards the limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mstar.weights.cache import CacheEntry


@dataclass
class EvictionPolicy:
    """The cache's limits; None: no such limit. `check_interval`: seconds between a
    server's background evictions (its leases expire after three of them)."""

    max_size_bytes: int | None = None
    min_free_space_bytes: int | None = None
    unused_threshold: float | None = None
    max_models: int | None = None
    check_interval: float = 3600.0


def evictable(entry: CacheEntry) -> bool:
    return not entry.pinned and not entry.leases and entry.last_used is not None


def plan_eviction(entries: Sequence[CacheEntry], policy: EvictionPolicy, free_bytes: int,
                  now: float) -> list[CacheEntry]:
    """The entries to evict, in eviction order (least recently used first). `free_bytes`:
    the free space on the cache's disk now; `now`: the time `unused_threshold` counts
    from."""
    size = sum(e.size_bytes for e in entries)
    count = len(entries)
    plan = []
    for entry in sorted(filter(evictable, entries), key=lambda e: e.last_used or 0.0):
        stale = (policy.unused_threshold is not None
                 and now - (entry.last_used or 0.0) > policy.unused_threshold)
        over = ((policy.max_size_bytes is not None and size > policy.max_size_bytes)
                or (policy.min_free_space_bytes is not None
                    and free_bytes < policy.min_free_space_bytes)
                or (policy.max_models is not None and count > policy.max_models))
        if not (stale or over):
            continue
        plan.append(entry)
        size -= entry.size_bytes
        free_bytes += entry.size_bytes
        count -= 1
    return plan
