"""Eviction planning (`plan_eviction`): least recently used first, by each limit, never a
pinned, leased or never-used entry."""

from __future__ import annotations

from pathlib import Path

from mstar.weights.cache import CacheEntry
from mstar.weights.eviction import EvictionPolicy, plan_eviction
from mstar.weights.index import Lease

GB = 10**9


def entry(name: str, last_used: float | None, size: int = GB, *, pinned: bool = False,
          leased: bool = False) -> CacheEntry:
    leases = (Lease("a server", 1, "host", 0.0, 0.0),) if leased else ()
    return CacheEntry(repo=f"owner/{name}", revision=name[0] * 40, refs=("main",),
                      size_bytes=size, last_used=last_used, pinned=pinned, leases=leases,
                      path=Path("/cache") / name)


def names(plan: list[CacheEntry]) -> list[str]:
    return [e.repo.removeprefix("owner/") for e in plan]


def test_over_the_size_limit_the_least_recently_used_go_first_until_it_fits() -> None:
    entries = [entry("c", 30.0), entry("a", 10.0), entry("b", 20.0), entry("d", 40.0)]
    plan = plan_eviction(entries, EvictionPolicy(max_size_bytes=2 * GB), 100 * GB, 50.0)
    assert names(plan) == ["a", "b"]
    assert plan_eviction(entries, EvictionPolicy(max_size_bytes=4 * GB), 100 * GB, 50.0) == []


def test_free_space_and_model_count_limits() -> None:
    entries = [entry("a", 10.0), entry("b", 20.0), entry("c", 30.0)]
    low_disk = EvictionPolicy(min_free_space_bytes=3 * GB)
    assert names(plan_eviction(entries, low_disk, GB // 2, 50.0)) == ["a", "b", "c"]
    assert names(plan_eviction(entries, low_disk, 2 * GB, 50.0)) == ["a"]
    assert names(plan_eviction(entries, EvictionPolicy(max_models=1), 100 * GB, 50.0)) == [
        "a", "b"]


def test_unused_longer_than_the_threshold_goes_whatever_the_limits() -> None:
    entries = [entry("a", 10.0), entry("b", 60.0), entry("c", 95.0)]
    week = EvictionPolicy(unused_threshold=50.0)
    assert names(plan_eviction(entries, week, 100 * GB, now=100.0)) == ["a"]
    assert names(plan_eviction(entries, week, 100 * GB, now=200.0)) == ["a", "b", "c"]


def test_pinned_leased_and_never_used_entries_stay_but_count_towards_the_limits() -> None:
    entries = [entry("a", 10.0, pinned=True), entry("b", 20.0, leased=True),
               entry("c", None), entry("d", 40.0), entry("e", 50.0)]
    plan = plan_eviction(entries, EvictionPolicy(max_size_bytes=GB, unused_threshold=1.0),
                         100 * GB, now=1000.0)
    assert names(plan) == ["d", "e"]
    assert names(plan_eviction(entries, EvictionPolicy(max_models=4), 100 * GB, 60.0)) == ["d"]
