"""A server's upkeep of the weight cache (`mstar.serving.cache_upkeep`): it leases what it
serves, so its own background eviction (and anyone's `rm`) leaves that alone, and
releases it at stop. The snapshots are laid out as huggingface_hub lays them out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mstar.serving.cache_upkeep import CacheUpkeep
from mstar.weights.cache import WeightCache, WeightsInUse
from mstar.weights.eviction import EvictionPolicy


def cached_snapshot(cache: Path, repo: str, commit: str, content: bytes) -> None:
    """`repo` at `commit` (its main branch) holding model.safetensors = `content`."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    blob = hashlib.sha256(content).hexdigest()
    (storage / "blobs").mkdir(parents=True)
    (storage / "blobs" / blob).write_bytes(content)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{blob}")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)


def test_a_server_keeps_what_it_serves_through_its_own_eviction(tmp_path: Path) -> None:
    cached_snapshot(tmp_path, "owner/served", "a" * 40, b"served weights")
    cached_snapshot(tmp_path, "owner/idle", "b" * 40, b"idle weights")
    cache = WeightCache(tmp_path)
    cache.touch("owner/served", "main")
    cache.touch("owner/idle", "main")
    upkeep = CacheUpkeep(cache, [("owner/served", None)], "test server",
                         check_interval=3600.0, policy=EvictionPolicy(max_models=0))
    try:
        assert upkeep.collected.wait(timeout=60)
        (kept,) = cache.entries()
        assert kept.repo == "owner/served" and kept.leases[0].server == "test server"
        with pytest.raises(WeightsInUse, match="test server"):
            cache.remove("owner/served")
    finally:
        upkeep.stop()
    assert cache.entries()[0].leases == ()
    assert cache.remove("owner/served") == len(b"served weights")
    assert cache.entries() == []
