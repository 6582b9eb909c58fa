"""The weight cache's plumbing without a hub: where the cache is (`resolve_cache_dir`),
the SQLite index under concurrent writers, and leases that expire with their server."""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mstar.plugins.registry import ModelSpec
from mstar.runtime.builder import LoadOptions
from mstar.weights.cache import WeightCache, resolve_cache_dir
from mstar.weights.index import CacheIndex

_CACHE_ENV = ("MSTAR_CACHE_DIR", "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


# -- where the cache is ------------------------------------------------------------------------


def test_the_cache_dir_is_resolved_in_order_from_the_environment_at_call_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert resolve_cache_dir() == tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
    assert resolve_cache_dir() == tmp_path / "hf_hub_cache"
    monkeypatch.setenv("MSTAR_CACHE_DIR", "~/mstar-cache")
    assert resolve_cache_dir() == tmp_path / "home" / "mstar-cache"
    assert resolve_cache_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert WeightCache(tmp_path / "cli").cache_dir == tmp_path / "cli"


def test_load_options_carry_the_resolved_cache_dir_to_every_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's options go to its children as they are: the directory is resolved
    once, in the launcher, so a child with another environment still uses the same."""
    spec = ModelSpec(name="m", model_class="x:Y", weight_sources={"default": "owner/model"})
    monkeypatch.setenv("MSTAR_CACHE_DIR", str(tmp_path / "env"))
    assert LoadOptions.of(spec).cache_dir == str(tmp_path / "env")
    assert LoadOptions.of(spec, cache_dir=str(tmp_path / "cli")).cache_dir == str(tmp_path / "cli")
    assert LoadOptions.of(spec).hub_repos() == {"default": ("owner/model", None)}
    assert LoadOptions.of(spec, load_format="dummy").hub_repos() == {}
    local = LoadOptions.of(spec, model_path=str(tmp_path))
    assert local.hub_repos() == {}


# -- the index ---------------------------------------------------------------------------------


def _write_rows(path: str, worker: int, count: int, start: Any) -> None:
    index = CacheIndex(path)
    start.wait()
    for k in range(count):
        index.finish_pull(f"owner/repo{worker}", f"{k:040x}", float(k))
        index.release(index.add_leases(f"server{worker}", [("owner/any", "main")], ttl=60.0,
                                       now=float(k)))
        index.touch("owner/shared", "0" * 40, float(k))


def test_two_processes_write_the_index_at_once_and_none_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / ".mstar" / "index.sqlite")
    CacheIndex(path)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2, timeout=60)
    procs = [ctx.Process(target=_write_rows, args=(path, w, 60, start)) for w in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0]
    rows = CacheIndex(path).rows()
    for worker in range(2):
        assert all(rows[(f"owner/repo{worker}", f"{k:040x}")].complete for k in range(60))
    assert rows[("owner/shared", "0" * 40)].last_used == 59.0
    assert CacheIndex(path).live_leases(now=60.0) == []
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_lease_expires_when_its_process_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from mstar.weights.cache import WeightCache
        WeightCache({str(tmp_path)!r}).lease([("owner/model", "main")], "test server")
        print("leased", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "leased\n"
        (live,) = WeightCache(tmp_path).index.live_leases()
        assert (live.repo, live.revision, live.lease.server, live.lease.pid) == (
            "owner/model", "main", "test server", holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert WeightCache(tmp_path).index.live_leases() == []


def test_a_lease_expires_without_heartbeats_and_a_heartbeat_renews_it(tmp_path: Path) -> None:
    index = CacheIndex(tmp_path / "index.sqlite")
    (mine,) = index.add_leases("here", [("owner/model", "a" * 40)], ttl=30.0, now=100.0)
    # a server on another host: its pid cannot be checked here, only its heartbeat
    index.add_leases("there", [("owner/model", "a" * 40)], ttl=30.0, now=100.0,
                     pid=2**22 + 7, host="another-host")
    assert {r.lease.server for r in index.live_leases(now=129.0)} == {"here", "there"}
    assert index.heartbeat([mine], now=125.0) == 1
    assert [r.lease.server for r in index.live_leases(now=140.0)] == ["here"]
    assert index.live_leases(now=156.0) == []
    assert index.heartbeat([mine], now=157.0) == 0  # gone for good: the server is told


def test_what_a_lease_holds_is_in_use_until_released(tmp_path: Path) -> None:
    index = CacheIndex(tmp_path / "index.sqlite")
    index.finish_pull("owner/model", "a" * 40, now=10.0)
    index.finish_pull("owner/other", "b" * 40, now=10.0)
    ids = index.add_leases("server", [("owner/model", "a" * 40)], ttl=30.0, now=10.0)
    index.heartbeat(ids, now=20.0)
    index.release(ids, now=30.0)
    rows = index.rows()
    assert rows[("owner/model", "a" * 40)].last_used == 30.0
    assert rows[("owner/other", "b" * 40)].last_used == 10.0
