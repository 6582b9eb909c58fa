"""The local hub (`tests/hub_server.py`) answers the installed huggingface_hub as the hub
does: snapshots at a branch, a tag or a commit land in its cache layout with the blob
names (sha256 for LFS files, git sha1 otherwise) the hub gives them, its 404s come back as
huggingface_hub's own errors, and a transfer cut short is resumed with a Range request."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hub_server import git_blob_sha1
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

WEIGHTS = bytes(range(256)) * 64
#: Over huggingface_hub's 10 MiB download chunk: a resume keeps only whole chunks written.
BIG = bytes(range(251)) * (46 * 1024)


def test_snapshots_at_branch_tag_and_commit_use_the_hub_cache_layout(hub, tmp_path):
    repo = hub.repo("mstar-tests/tiny")
    first = repo.commit({"config.json": b'{"v": 1}', "model.safetensors": WEIGHTS})
    repo.tag("v1")
    second = repo.commit({"config.json": b'{"v": 2}', "model.safetensors": WEIGHTS[::-1]})
    for revision, sha in (("main", second), ("v1", first), (first, first)):
        snap = Path(snapshot_download("mstar-tests/tiny", revision=revision, cache_dir=tmp_path))
        assert snap.name == sha
        assert (snap / "config.json").read_bytes() == repo.commits[sha]["config.json"].data
    blobs = {p.name for p in (tmp_path / "models--mstar-tests--tiny" / "blobs").iterdir()}
    assert hashlib.sha256(WEIGHTS).hexdigest() in blobs  # LFS: named by sha256
    assert git_blob_sha1(b'{"v": 1}') in blobs             # regular: named by git sha1
    refs = tmp_path / "models--mstar-tests--tiny" / "refs"
    assert (refs / "main").read_text() == second and (refs / "v1").read_text() == first


def test_unknown_repo_revision_and_file_are_the_hub_errors(hub, tmp_path):
    hub.repo("mstar-tests/tiny").commit({"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("mstar-tests/absent", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("mstar-tests/tiny", revision="v9", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("mstar-tests/tiny", "model.safetensors", cache_dir=tmp_path)


def test_a_cut_transfer_resumes_with_a_range_request(hub, tmp_path):
    hub.repo("mstar-tests/tiny").commit({"model.safetensors": BIG})
    hub.cut["mstar-tests/tiny/model.safetensors"] = len(BIG) - 1000
    path = hf_hub_download("mstar-tests/tiny", "model.safetensors", cache_dir=tmp_path)
    assert Path(path).read_bytes() == BIG
    [(key, start)] = hub.ranges
    assert key == "mstar-tests/tiny/model.safetensors" and 0 < start < len(BIG) - 1000
    assert hub.gets["mstar-tests/tiny/model.safetensors"] == 2
