"""The real download code against a local hub (`tests/hub_server.py`), offline: a model
whose weight sources are hub repos (Orpheus: its LM and its SNAC codec, two repos) loads
through the hub path and speaks as it does from the same files on disk; hub sources
resolve at a branch, a tag or a commit, fetch only the files their patterns name, and an
unknown repo or revision is refused naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_server import HubServer, read_tree

import mstar
from mstar import events
from mstar.weights import WeightSourceError, resolve_source

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
    ("mstar-tests/lm", "v9", "revision v9"),
])
def test_an_unknown_repo_or_revision_is_refused_naming_it(hub, tmp_path, repo, revision, named):
    hub.repo("mstar-tests/lm").commit({"config.json": b"{}"})
    with pytest.raises(WeightSourceError, match=named):
        resolve_source(repo, patterns=["*.safetensors"], cache_dir=tmp_path, revision=revision)
    assert not any(p.is_file() for p in tmp_path.rglob("*.safetensors"))


def test_an_unknown_repo_stops_a_load_naming_it(hub, tmp_path):
    with pytest.raises(WeightSourceError, match=LM_REPO):
        mstar.load("orpheus", preset="tiny", cache_dir=str(tmp_path))
