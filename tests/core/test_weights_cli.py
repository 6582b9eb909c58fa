"""`mstar weights` over a cache the test fills from the local hub (`tests/hub_server.py`):
a model name pulls every hub repo of its weight sources, `list` shows size, users and pins,
`path` the snapshot, `verify` names a corrupt file, `rm` is refused while a server holds a
lease, `pin` keeps a revision from `gc`, whose limits come from the same layers as
serving. Every bad input is one message and exit status 1, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mstar.cli.main import main
from mstar.plugins import model_registry
from mstar.weights.cache import WeightCache
from mstar.weights.download import cached_path

LM, SNAC = "canopylabs/orpheus-3b-0.1-ft", "hubertsiuzdak/snac_24khz"  # Orpheus' sources
LM_FILES = {"config.json": b'{"hidden_size": 8}', "model.safetensors": b"L" * 3000}
SNAC_FILES = {"config.json": b'{"sampling_rate": 24000}', "pytorch_model.bin": b"S" * 1200}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("MSTAR_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def orpheus(hub) -> dict[str, str]:
    """Orpheus' two repos on the local hub; repo -> commit of main."""
    return {LM: hub.repo(LM).commit(LM_FILES), SNAC: hub.repo(SNAC).commit(SNAC_FILES)}


def weights(capsys, cache: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["weights", *argv, "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def listed(capsys, cache: Path) -> dict[str, dict]:
    code, out, _ = weights(capsys, cache, "list", "--json")
    assert code == 0
    return {entry["repo"]: entry for entry in json.loads(out)["repos"]}


def test_pulling_a_model_name_pulls_every_hub_repo_of_its_weight_sources(
        hub, orpheus, cache, capsys):
    code, out, err = weights(capsys, cache, "pull", "orpheus", "-q")
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert [p.name for p in paths] == [orpheus[LM], orpheus[SNAC]]
    assert (paths[0] / "model.safetensors").read_bytes() == LM_FILES["model.safetensors"]
    assert (paths[1] / "pytorch_model.bin").read_bytes() == SNAC_FILES["pytorch_model.bin"]
    entries = listed(capsys, cache)
    assert set(entries) == {LM, SNAC}
    lm = entries[LM]
    assert (lm["revision"], lm["refs"], lm["pinned"], lm["in_use_by"]) == (
        orpheus[LM], ["main"], False, [])
    assert lm["size_bytes"] == sum(len(data) for data in LM_FILES.values())
    code, out, _ = weights(capsys, cache, "list")
    header, *rows = out.splitlines()
    assert header.split() == ["REPO", "REVISION", "SIZE", "LAST", "USED", "IN", "USE", "BY",
                              "PINNED"]
    assert rows[0].startswith(LM) and orpheus[LM][:12] in rows[0]
    assert rows[1].startswith(SNAC) and rows[2].startswith("2 revision(s), 0 URL file(s)")
    code, out, _ = weights(capsys, cache, "path", "orpheus")
    assert code == 0 and [Path(line) for line in out.splitlines()] == paths


def test_a_revision_per_weight_source_and_a_repo_id(hub, orpheus, cache, capsys):
    snac = hub.repo(SNAC)
    tagged = snac.tag("v1")
    newer = snac.commit({**SNAC_FILES, "pytorch_model.bin": b"T" * 1200})
    code, out, err = weights(capsys, cache, "pull", "orpheus", "--revision", "snac=v1", "-q")
    assert code == 0, err
    assert [Path(line).name for line in out.splitlines()] == [orpheus[LM], tagged]
    code, out, err = weights(capsys, cache, "pull", SNAC, "-q")
    assert code == 0 and Path(out.strip()).name == newer
    code, out, _ = weights(capsys, cache, "path", SNAC, "--revision", tagged)
    assert code == 0 and Path(out.strip()).name == tagged


def test_verify_names_the_corrupt_file(hub, orpheus, cache, capsys):
    assert weights(capsys, cache, "pull", "orpheus", "-q")[0] == 0
    code, out, _ = weights(capsys, cache, "verify")
    assert code == 0 and out.count(": ok") == 2
    blob = (WeightCache(cache).path(LM) / "model.safetensors").resolve()
    blob.write_bytes(b"X" * 3000)  # same size, other bytes
    code, out, _ = weights(capsys, cache, "verify", "orpheus")
    assert code == 1
    bad = [line for line in out.splitlines() if not line.endswith(": ok")]
    assert len(bad) == 1 and LM in bad[0] and "model.safetensors" in bad[0]


def test_rm_is_refused_while_a_server_uses_the_revision(hub, orpheus, cache, capsys):
    assert weights(capsys, cache, "pull", LM, "-q")[0] == 0
    lease = WeightCache(cache).lease([(LM, orpheus[LM])], "srv-a")
    try:
        entry = listed(capsys, cache)[LM]
        assert [user["server"] for user in entry["in_use_by"]] == ["srv-a"]
        code, _, err = weights(capsys, cache, "rm", LM)
        assert code == 1 and err.startswith("error: ") and "srv-a" in err
        assert listed(capsys, cache)[LM]["path"]
    finally:
        lease.release()
    code, out, err = weights(capsys, cache, "rm", LM)
    assert code == 0, err
    assert out.startswith(f"removed {LM}") and LM not in listed(capsys, cache)
    assert not (cache / "models--canopylabs--orpheus-3b-0.1-ft" / "snapshots" /
                orpheus[LM]).exists()


def test_gc_takes_its_limits_from_the_layers_and_spares_pinned_revisions(
        hub, orpheus, cache, capsys, monkeypatch, tmp_path):
    assert weights(capsys, cache, "pull", "orpheus", "-q")[0] == 0
    code, out, _ = weights(capsys, cache, "gc", "--dry-run")
    assert code == 0 and "no cache limits set" in out
    code, out, _ = weights(capsys, cache, "gc", "--dry-run", "--cache-max-models", "1")
    assert code == 0 and len([line for line in out.splitlines()
                              if line.startswith("would remove ")]) == 2  # one, then total
    assert set(listed(capsys, cache)) == {LM, SNAC}  # a dry run removes nothing
    assert weights(capsys, cache, "pin", LM)[0] == 0
    assert listed(capsys, cache)[LM]["pinned"]
    config = tmp_path / "deploy.yaml"
    config.write_text("model: orpheus\nserver: {cache_max_models: 5}\n")
    monkeypatch.setenv("MSTAR_CACHE_MAX_MODELS", "1")  # env outranks the YAML
    code, out, err = weights(capsys, cache, "gc", "--config", str(config))
    assert code == 0, err
    assert out.startswith(f"removed {SNAC}@") and set(listed(capsys, cache)) == {LM}
    assert weights(capsys, cache, "unpin", LM)[0] == 0
    code, out, _ = weights(capsys, cache, "gc", "--cache-max-size", "1KB")
    assert code == 0 and out.startswith(f"removed {LM}@") and listed(capsys, cache) == {}


@pytest.mark.parametrize(("argv", "message"), [
    (["pull", "no/such/thing"], "neither an installed model"),
    (["pull", "nosuchmodel!"], "neither an installed model"),
    (["pull", "orpheus", "--revision", "codec=v1"], "no weight source 'codec'"),
    (["pull", "owner/missing", "-q"], "owner/missing"),
    (["pull", LM, "--revision", "nope", "-q"], "nope"),
    (["path", SNAC], SNAC),
    (["rm", LM], LM),
    (["pin", LM], LM),
    (["gc", "--cache-unused-threshold", "soon"], "--cache-unused-threshold: "),
])
def test_bad_input_is_one_message_and_exit_1(argv, message, hub, orpheus, cache, capsys):
    code, out, err = weights(capsys, cache, *argv)
    assert code == 1 and err.startswith("error: ") and message in err, err


def test_a_url_source_is_listed_located_and_removed(cache, capsys):
    (url,) = model_registry().get("vjepa2_ac").weight_sources.values()  # one .pt file
    file = cached_path(url, cache)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"P" * 2500)
    code, out, _ = weights(capsys, cache, "list", "--json")
    assert json.loads(out) == {"repos": [], "url_files": [{"path": str(file),
                                                           "size_bytes": 2500}]}
    code, out, _ = weights(capsys, cache, "list")
    assert "mstar-urls/" in out and "0 revision(s), 1 URL file(s), 2.5KB" in out
    code, out, _ = weights(capsys, cache, "path", "vjepa2_ac")
    assert code == 0 and out == f"{file}\n"
    code, _, err = weights(capsys, cache, "pin", "vjepa2_ac")
    assert code == 1 and "a URL file, not a hub repo" in err
    code, out, _ = weights(capsys, cache, "rm", "vjepa2_ac")
    assert code == 0 and out.startswith(f"removed {url}") and not file.exists()
    code, _, err = weights(capsys, cache, "path", "vjepa2_ac")
    assert code == 1 and "is not in the cache" in err
