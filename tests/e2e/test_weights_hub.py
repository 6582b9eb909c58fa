"""The real download code against a local hub (`tests/hub_server.py`), offline.

A model whose weight sources are hub repos (Orpheus: its LM and its SNAC codec, two repos)
loads through the hub path and speaks as it does from the same files on disk; hub sources
resolve at a branch, a tag or a commit and fetch only the files their patterns name. The
weight cache (`mstar.weights.cache`) pulls at any revision, resumes a cut transfer, never
lists a pull killed midway, lets N concurrent pullers download once, names a corrupt or
truncated file (and serving refuses both), evicts by each limit but never a
pinned or leased snapshot, holds a running server's lease until the server dies, and
fails clearly on a full or read-only disk. Unknown repos and revisions are refused by
name."""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, hub_env, read_tree
from serving_harness import Server, children, shm_segments

import mstar
from mstar import events
from mstar.weights import WeightSourceError, resolve_source
from mstar.weights.cache import WeightCache, WeightsError, WeightsInUse
from mstar.weights.eviction import EvictionPolicy

pytestmark = pytest.mark.timeout(120)

LM_REPO, SNAC_REPO = "canopylabs/orpheus-3b-0.1-ft", "hubertsiuzdak/snac_24khz"


@pytest.fixture(scope="module")
def orpheus_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mstar_orpheus.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("orpheus") / "ckpt", speaking=True)


def upload_orpheus(hub: HubServer, ckpt: Path) -> None:
    """The tiny checkpoint as the hub has Orpheus: the LM repo, and the codec in its own."""
    lm = {path: data for path, data in read_tree(ckpt).items() if not path.startswith("snac/")}
    hub.repo(LM_REPO).commit(lm)
    hub.repo(SNAC_REPO).commit(read_tree(ckpt / "snac"))


def speech(deployment) -> torch.Tensor:
    evs = list(deployment.generate({"input": "Hello there", "voice": "tara",
                                    "max_tokens": 7 * 4, "seed": 3}))
    assert isinstance(evs[-1], events.Finished), evs[-1]
    return torch.cat([e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)])


def test_orpheus_loads_both_repos_from_the_hub_and_speaks_as_from_disk(hub, orpheus_ckpt,
                                                                       tmp_path):
    upload_orpheus(hub, orpheus_ckpt)
    with mstar.load("orpheus", preset="tiny", cache_dir=str(tmp_path), max_seq_len=256) as served:
        from_hub = speech(served)
    with mstar.load("orpheus", preset="tiny", model_path=str(orpheus_ckpt),
                    max_seq_len=256) as local:
        from_disk = speech(local)
    assert from_hub.numel() > 0 and torch.equal(from_hub, from_disk)
    # each weight file crossed the wire once, though config and weights are fetched apart
    assert hub.gets[f"{LM_REPO}/model.safetensors"] == 1
    assert hub.gets[f"{SNAC_REPO}/pytorch_model.bin"] == 1
    assert (tmp_path / "models--canopylabs--orpheus-3b-0.1-ft" / "snapshots").is_dir()


def test_a_hub_source_resolves_at_a_branch_a_tag_or_a_commit(hub, tmp_path):
    repo = hub.repo("mstar-tests/lm")
    first = repo.commit({"config.json": b'{"v": 1}', "model.safetensors": b"one",
                         "notes.txt": b"not weights"})
    repo.tag("v1")
    second = repo.commit({"config.json": b'{"v": 2}', "model.safetensors": b"two"})
    for revision, sha, weights in ((None, second, b"two"), ("v1", first, b"one"),
                                   (first, first, b"one")):
        path = resolve_source("mstar-tests/lm", patterns=["*.safetensors"],
                              cache_dir=tmp_path, revision=revision)
        assert path.name == sha and (path / "model.safetensors").read_bytes() == weights
    assert hub.gets["mstar-tests/lm/notes.txt"] == 0  # only the patterns and config.json


@pytest.mark.parametrize("repo, revision, named", [
    ("mstar-tests/absent", None, "mstar-tests/absent"),
    ("mstar-tests/lm", "v9", "mstar-tests/lm.*v9"),
])
def test_an_unknown_repo_or_revision_is_refused_naming_it(hub, tmp_path, repo, revision, named):
    hub.repo("mstar-tests/lm").commit({"config.json": b"{}"})
    with pytest.raises(WeightSourceError, match=named):
        resolve_source(repo, patterns=["*.safetensors"], cache_dir=tmp_path, revision=revision)
    assert not any(p.is_file() for p in tmp_path.rglob("*.safetensors"))


def test_an_unknown_repo_stops_a_load_naming_it(hub, tmp_path):
    with pytest.raises(WeightSourceError, match=LM_REPO):
        mstar.load("orpheus", preset="tiny", cache_dir=str(tmp_path))


# -- the weight cache (mstar.weights.cache) over the local hub -------------------------------

#: Over huggingface_hub's 10 MiB download chunk: a resume keeps only whole chunks written.
BIG = bytes(range(251)) * (46 * 1024)
PULL = ("import sys\n"
        "from mstar.weights.cache import WeightCache\n"
        "print(WeightCache(sys.argv[1]).pull(sys.argv[2], progress=False), flush=True)\n")
def python(hub: HubServer, script: str, *args: str) -> subprocess.Popen[str]:
    """A process running `script` with `args`, its hub the local one."""
    return subprocess.Popen([sys.executable, "-c", script, *args], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, **hub_env(hub)})


def model_repo(hub: HubServer, name: str, weights: bytes = b"w" * 1000) -> str:
    """A repo holding a config and one weight file (in LFS); its commit."""
    return hub.repo(name).commit({"config.json": b'{"model": "%s"}' % name.encode(),
                                  "model.safetensors": weights})


def blob(cache: WeightCache, repo: str, file: str) -> Path:
    return (cache.path(repo) / file).resolve()


def test_pull_at_a_branch_a_tag_or_a_commit_lists_each(hub, tmp_path):
    cache = WeightCache(tmp_path)
    first = model_repo(hub, "mstar-tests/lm", b"one" * 100)
    hub.repo("mstar-tests/lm").tag("v1")
    second = model_repo(hub, "mstar-tests/lm", b"two" * 100)
    assert cache.pull("mstar-tests/lm", progress=False).name == second
    assert cache.pull("mstar-tests/lm", "v1", progress=False).name == first
    assert cache.pull("mstar-tests/lm", first, progress=False).name == first
    listed = {(e.repo, e.revision): e for e in cache.entries()}
    assert set(listed) == {("mstar-tests/lm", first), ("mstar-tests/lm", second)}
    assert listed["mstar-tests/lm", first].refs == ("v1",)
    assert listed["mstar-tests/lm", second].refs == ("main",)
    assert cache.path("mstar-tests/lm", "v1") == listed["mstar-tests/lm", first].path
    assert (cache.path("mstar-tests/lm") / "model.safetensors").read_bytes() == b"two" * 100
    assert hub.gets["mstar-tests/lm/model.safetensors"] == 2  # the third pull reused the first


@pytest.mark.parametrize("repo, revision, named", [
    ("mstar-tests/absent", None, "mstar-tests/absent"),
    ("mstar-tests/lm", "v9", "v9"),
])
def test_pull_of_an_unknown_repo_or_revision_is_refused_naming_it(hub, tmp_path, repo,
                                                                   revision, named):
    model_repo(hub, "mstar-tests/lm")
    cache = WeightCache(tmp_path)
    with pytest.raises(WeightsError, match=named):
        cache.pull(repo, revision, progress=False)
    assert cache.entries() == []
    with pytest.raises(WeightsError, match=repo):
        cache.path(repo, revision)


def test_a_cut_transfer_is_resumed_with_a_range_request(hub, tmp_path):
    model_repo(hub, "mstar-tests/big", BIG)
    hub.cut["mstar-tests/big/model.safetensors"] = len(BIG) - 1000
    cache = WeightCache(tmp_path)
    snapshot = cache.pull("mstar-tests/big", progress=False)
    [(key, start)] = hub.ranges
    assert key == "mstar-tests/big/model.safetensors" and 0 < start < len(BIG) - 1000
    assert (snapshot / "model.safetensors").read_bytes() == BIG
    assert [e.repo for e in cache.entries()] == ["mstar-tests/big"]


def test_a_pull_killed_midway_is_not_listed_and_the_next_pull_completes_it(hub, tmp_path):
    model_repo(hub, "mstar-tests/big", BIG)
    key = "mstar-tests/big/model.safetensors"
    hub.hold[key] = threading.Event()
    puller = python(hub, PULL, str(tmp_path), "mstar-tests/big")
    assert hub.wait_until(lambda: hub.gets[key] == 1)
    puller.kill()
    puller.wait()
    cache = WeightCache(tmp_path)
    assert cache.entries() == []
    with pytest.raises(WeightsError, match="mstar-tests/big"):
        cache.path("mstar-tests/big")
    hub.hold[key].set()
    assert (cache.pull("mstar-tests/big", progress=False) / "model.safetensors").read_bytes() == BIG
    assert [e.repo for e in cache.entries()] == ["mstar-tests/big"]


def test_concurrent_pullers_download_each_file_once(hub, tmp_path):
    model_repo(hub, "mstar-tests/lm", BIG)
    key = "mstar-tests/lm/model.safetensors"
    # the first transfer waits until every puller has resolved the revision (the claim is
    # per commit): then all of them are at the claim while one downloads
    hub.hold[key] = threading.Event()
    pullers = [python(hub, PULL, str(tmp_path), "mstar-tests/lm") for _ in range(3)]
    assert hub.wait_until(lambda: hub.gets[key] == 1
                          and hub.api_calls["info mstar-tests/lm"] == 3)
    hub.hold[key].set()
    paths = {puller.communicate()[0].strip() for puller in pullers}
    assert [p.returncode for p in pullers] == [0, 0, 0]
    assert len(paths) == 1 and (Path(paths.pop()) / "model.safetensors").read_bytes() == BIG
    assert hub.gets[key] == 1 and hub.gets["mstar-tests/lm/config.json"] == 1
    # the others waited for the first and reused its snapshot: no listing, no metadata
    assert hub.api_calls["tree mstar-tests/lm"] == 1 and hub.heads[key] == 1


def test_verify_names_a_corrupt_and_a_truncated_file(hub, tmp_path):
    model_repo(hub, "mstar-tests/lm")
    cache = WeightCache(tmp_path)
    cache.pull("mstar-tests/lm", progress=False)
    assert cache.verify("mstar-tests/lm") == []
    weights = blob(cache, "mstar-tests/lm", "model.safetensors")
    weights.write_bytes(b"x" + weights.read_bytes()[1:])  # same size, other bytes
    [problem] = cache.verify("mstar-tests/lm")
    assert "model.safetensors" in problem and "sha256" in problem
    config = blob(cache, "mstar-tests/lm", "config.json")
    config.write_bytes(config.read_bytes()[:-3])
    problems = cache.verify("mstar-tests/lm")
    assert len(problems) == 2 and "config.json" in problems[0]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_serve_refuses_a_damaged_weight_file_naming_it(hub, orpheus_ckpt, tmp_path, damage):
    """A truncated file fails the size check; one of the right size but other bytes (after
    the load that hashed it once) fails its sha256, since its modification time moved."""
    upload_orpheus(hub, orpheus_ckpt)
    cache = WeightCache(tmp_path)
    cache.pull(LM_REPO, progress=False)
    weights = blob(cache, LM_REPO, "model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:-100] if damage == "truncated" else data[:-1] + b"\x00")
    with pytest.raises((WeightsError, WeightSourceError),
                       match="model.safetensors.*" + ("bytes" if damage == "truncated"
                                                      else "sha256")):
        mstar.load("orpheus", preset="tiny", cache_dir=str(tmp_path), max_seq_len=256)


def filled_cache(hub: HubServer, cache: WeightCache, names: list[str]) -> dict[str, int]:
    """Pull a repo per name, used in that order (the first least recently); their sizes."""
    sizes = {}
    for i, name in enumerate(names):
        model_repo(hub, name, bytes([i]) * (1000 * (i + 1)))
        cache.pull(name, progress=False)
    for name in names:
        cache.touch(name, "main")
    for entry in cache.entries():
        sizes[entry.repo] = entry.size_bytes
    return sizes


@pytest.mark.parametrize("knob", ["max_size_bytes", "max_models", "unused_threshold"])
def test_gc_evicts_least_recently_used_by_each_knob_never_pinned_or_leased(hub, tmp_path,
                                                                           knob):
    cache = WeightCache(tmp_path)
    names = ["t/pinned", "t/leased", "t/old", "t/new"]
    sizes = filled_cache(hub, cache, names)
    cache.pin("t/pinned")
    limit = {"max_size_bytes": sizes["t/pinned"] + sizes["t/leased"] + sizes["t/new"],
             "max_models": 3, "unused_threshold": 0.0}[knob]
    policy = EvictionPolicy(**{knob: limit})
    with cache.lease([("t/leased", None)], "srv-a"):
        planned = cache.gc(policy, dry_run=True)
        assert [e.repo for e in planned] == (["t/old", "t/new"] if knob == "unused_threshold"
                                             else ["t/old"])
        assert {e.repo for e in cache.entries()} == set(names)  # a dry run removes nothing
        assert [e.repo for e in cache.gc(policy)] == [e.repo for e in planned]
    kept = {e.repo for e in cache.entries()}
    assert kept == set(names) - {e.repo for e in planned}


def test_a_running_server_leases_what_it_serves_until_it_is_killed(hub, orpheus_ckpt,
                                                                   tmp_path):
    upload_orpheus(hub, orpheus_ckpt)
    cache = WeightCache(tmp_path / "cache")
    server = Server(tmp_path, "--config", "orpheus_colocated", "--preset", "tiny",
                    "--cache-dir", str(cache.cache_dir), "--set", "max_seq_len=256",
                    env=hub_env(hub))
    try:
        server.wait_healthy()
        name = f"orpheus at 127.0.0.1:{server.port}"
        leases = {e.repo: [(lease.server, lease.pid) for lease in e.leases]
                  for e in cache.entries()}
        assert leases == {LM_REPO: [(name, server.proc.pid)],
                          SNAC_REPO: [(name, server.proc.pid)]}
        with pytest.raises(WeightsInUse, match=re.escape(name)):
            cache.remove(SNAC_REPO)
        assert cache.gc(EvictionPolicy(max_models=0)) == []
        workers = children(server.proc.pid)
    finally:
        server.proc.kill()  # no release: the lease must expire with the process
        server.proc.wait()
    assert all(e.leases == () for e in cache.entries())
    for pid in workers:  # they die with their parent (PR_SET_PDEATHSIG): wait for it
        assert wait_exit(pid)
    assert shm_segments(server.deployment_id + "_") == []
    assert cache.remove(SNAC_REPO) > 0


def wait_exit(pid: int, timeout: float = 60) -> bool:
    """Wait for a process that is not our child to exit (a pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (ENOSPC), mounted when this process may mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_pull_clearly_and_leaves_nothing_complete(hub, small_disk):
    model_repo(hub, "mstar-tests/big", BIG)
    cache = WeightCache(small_disk)
    with pytest.raises(WeightsError, match="(?i)space") as refused:
        cache.pull("mstar-tests/big", progress=False)
    assert str(small_disk) in str(refused.value)  # says which directory is full
    assert cache.entries() == []
    blobs = small_disk / "models--mstar-tests--big" / "blobs"
    assert not (blobs / hashlib.sha256(BIG).hexdigest()).exists()


def test_a_read_only_cache_dir_refuses_a_pull_naming_it_and_lists_and_serves_its_own(
        hub, small_disk):
    held = model_repo(hub, "mstar-tests/held")
    model_repo(hub, "mstar-tests/new")
    WeightCache(small_disk).pull("mstar-tests/held", progress=False)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        cache = WeightCache(small_disk)
        with pytest.raises(WeightsError, match=re.escape(str(small_disk))):
            cache.pull("mstar-tests/new", progress=False)
        assert [e.repo for e in cache.entries()] == ["mstar-tests/held"]
        path = resolve_source("mstar-tests/held", patterns=["*.safetensors"],
                              cache_dir=small_disk)
        assert path == cache.path("mstar-tests/held") and path.name == held
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
