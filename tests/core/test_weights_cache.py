"""Which cached models go, decided without a hub: `plan_eviction` evicts least recently
used first, by each limit of the policy alone and only as much as it needs, and never a
pinned, leased or never-used snapshot (though they count towards the limits). (Where the
cache is: `test_weights_index.py`; eviction of a real cache: `e2e/test_weights_hub.py`.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from mstar.weights.cache import CacheEntry, Lease
from mstar.weights.eviction import EvictionPolicy, plan_eviction

NOW = 1_000_000.0
DAY = 86400.0
SERVER = Lease(server="srv-1", pid=1, host="h", started=NOW, heartbeat=NOW)


def entry(repo: str, size: int, days_unused: float | None, *, pinned: bool = False,
          leased: bool = False) -> CacheEntry:
    return CacheEntry(repo=repo, revision="0" * 40, refs=("main",), size_bytes=size,
                      last_used=None if days_unused is None else NOW - days_unused * DAY,
                      pinned=pinned, leases=(SERVER,) if leased else (), path=Path(repo))


#: oldest first: a (10 days unused), b (5), c (2), d (1); then the ones never evicted
CACHE = [entry("c", 300, 2), entry("a", 100, 10), entry("d", 400, 1), entry("b", 200, 5),
         entry("pinned", 1000, 30, pinned=True), entry("leased", 1000, 30, leased=True),
         entry("foreign", 1000, None)]
KEPT = 3000  # bytes of the three never evicted


@pytest.mark.parametrize("policy, free, evicted", [
    (EvictionPolicy(), 0, []),
    (EvictionPolicy(max_size_bytes=KEPT + 600), 0, ["a", "b", "c"]),   # 4000 -> 3400 <= 3600
    (EvictionPolicy(max_size_bytes=KEPT + 1000), 0, []),
    (EvictionPolicy(max_size_bytes=0), 0, ["a", "b", "c", "d"]),       # pinned etc. stay
    (EvictionPolicy(min_free_space_bytes=650), 300, ["a", "b", "c"]),  # 300 -> 900 free
    (EvictionPolicy(min_free_space_bytes=300), 300, []),
    (EvictionPolicy(unused_threshold=3 * DAY), 0, ["a", "b"]),
    (EvictionPolicy(max_models=5), 0, ["a", "b"]),
    (EvictionPolicy(max_models=0), 0, ["a", "b", "c", "d"]),
])
def test_each_limit_evicts_least_recently_used_first_and_only_what_it_needs(policy, free,
                                                                            evicted):
    assert [e.repo for e in plan_eviction(CACHE, policy, free, NOW)] == evicted


def test_limits_combine_and_the_plan_is_pure():
    policy = EvictionPolicy(unused_threshold=7 * DAY, max_models=5)
    assert [e.repo for e in plan_eviction(CACHE, policy, 0, NOW)] == ["a", "b"]
    assert [e.repo for e in plan_eviction(CACHE, policy, 0, NOW + 7 * DAY)] == ["a", "b", "c",
                                                                                "d"]
    assert [e.repo for e in CACHE][:2] == ["c", "a"]  # the input is not reordered
