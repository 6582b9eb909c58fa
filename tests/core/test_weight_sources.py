"""Where weights and the files around them come from: a URL source downloaded once into the
cache by a local HTTP server started here (404, a dropped connection and a checksum mismatch
leave nothing behind), per-source hub revisions (resolved offline in a hub cache laid out
here), host files and config files a model declares, and pickled checkpoints holding
objects other than tensors (refused, naming the type, unless allowlisted)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

import mstar
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, make_model
from mstar.weights import (
    UnsafeCheckpointError,
    WeightSourceError,
    WeightSpec,
    checkpoint_files,
    iter_checkpoint,
    resolve_source,
)


class FileServer:
    """A static file server on 127.0.0.1 in a thread; counts GETs per path. `drop` lists
    paths answered with half their body and a Content-Length for all of it."""

    def __init__(self, root: Path):
        self.root, self.gets, self.drop = root, collections.Counter[str](), set[str]()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets[self.path] += 1
                if self.path in server.drop:
                    body = (server.root / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    return
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def cached_files(cache: Path) -> list[Path]:
    """Files in the cache but the download locks."""
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- URL sources -------------------------------------------------------------------------------


def test_a_url_source_is_downloaded_once_and_then_read_from_the_cache(files, tmp_path,
                                                                      monkeypatch):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(weights, files.root / "release.pt")
    cache = tmp_path / "cache"
    source = files.url("release.pt") + "#sha256=" + sha256(files.root / "release.pt")

    path = resolve_source(source, patterns=("*.pt",), cache_dir=cache)
    assert path.is_file() and path.name == "release.pt" and path.is_relative_to(cache)
    assert {k: v for k, v in iter_checkpoint(checkpoint_files(path, ("*.pt",)))}.keys() == {"w"}
    assert resolve_source(source, patterns=("*.pt",), cache_dir=cache) == path
    assert files.gets == {"/release.pt": 1}
    assert cached_files(cache) == [path]
    # Offline, the cached file is used; a URL never fetched fails saying so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source(source, patterns=("*.pt",), cache_dir=cache) == path
    with pytest.raises(WeightSourceError, match="HF_HUB_OFFLINE is set .* not in the cache"):
        resolve_source(files.url("other.pt"), patterns=("*.pt",), cache_dir=cache)
    assert files.gets == {"/release.pt": 1}


@pytest.mark.parametrize("failure", ["404", "checksum", "dropped"])
def test_a_failed_download_is_a_clear_error_leaving_nothing_in_the_cache(files, tmp_path,
                                                                         failure):
    (files.root / "model.safetensors").write_bytes(b"x" * 4096)
    cache = tmp_path / "cache"
    source = {"404": files.url("missing.safetensors"),
              "checksum": files.url("model.safetensors") + "#sha256=" + "0" * 64,
              "dropped": files.url("model.safetensors")}[failure]
    if failure == "dropped":
        files.drop.add("/model.safetensors")
    with pytest.raises(WeightSourceError) as err:
        resolve_source(source, patterns=("*.safetensors",), cache_dir=cache)
    expected = {"404": "HTTP Error 404", "checksum": "does not match the declared 0000",
                "dropped": "closed after 2048 of 4096 bytes"}[failure]
    assert expected in str(err.value) and "127.0.0.1" in str(err.value)
    assert cached_files(cache) == []


def test_url_sources_must_be_https_except_on_loopback(tmp_path):
    for source in ("http://example.com/model.pt", "ftp://127.0.0.1/model.pt"):
        with pytest.raises(WeightSourceError, match="use https"):
            resolve_source(source, patterns=("*.pt",), cache_dir=tmp_path)
    with pytest.raises(WeightSourceError, match="sha256=<64 hex digits>"):
        resolve_source("https://example.com/model.pt#md5=00", patterns=("*.pt",),
                       cache_dir=tmp_path)
    with pytest.raises(WeightSourceError, match="revision or subfolder applies to hub"):
        resolve_source("https://example.com/model.pt", patterns=("*.pt",), revision="v1")
    assert cached_files(tmp_path) == []


# -- per-source revisions ----------------------------------------------------------------------


def hub_repo(cache: Path, repo: str, revisions: dict[str, str]) -> None:
    """A repo in the hub cache's layout: `main` points at the first revision; each
    revision's snapshot holds a config.json naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    for i, (name, sha) in enumerate(revisions.items()):
        snapshot = root / "snapshots" / sha
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"revision": name}))
        (snapshot / "model.safetensors").write_bytes(b"")
        if i == 0:
            (root / "refs" / "main").write_text(sha)


def test_each_weight_source_is_fetched_at_its_own_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old, new = "a" * 40, "b" * 40
    hub_repo(tmp_path, "mstar-tests/lm", {"main": old, "v2": new})
    hub_repo(tmp_path, "mstar-tests/codec", {"main": old, "v2": new})
    options = LoadOptions(weight_sources={"default": "mstar-tests/lm",
                                          "snac": "mstar-tests/codec"},
                          cache_dir=str(tmp_path), revisions={"snac": new})

    def revision_of(source: str) -> str:
        path = options.fetch(source, ["*.safetensors"])
        return json.loads((path / "config.json").read_text())["revision"]

    assert (revision_of("default"), revision_of("snac")) == ("main", "v2")


def test_a_revision_for_a_source_the_model_lacks_is_refused_listing_its_sources():
    sources = {"default": "mstar-tests/lm", "snac": "mstar-tests/codec",
               "release": "https://example.com/release.pt"}
    with pytest.raises(ValueError, match="'snca', which the model does not have; its "
                                         "sources: default, release, snac"):
        LoadOptions(weight_sources=sources, revisions={"snca": "v1"})
    with pytest.raises(ValueError, match="'release' is a URL to one file"):
        LoadOptions(weight_sources=sources, revisions={"release": "v1"})
    assert LoadOptions(weight_sources=sources, revisions={"default": "v1", "snac": "v2"})


# -- host files and config files ---------------------------------------------------------------

MODEL = '''
import dataclasses

from mstar.plugins import ModelSpec, hookimpl
from mstar_testvla.model import TestVLA


class Declaring(TestVLA):
    """TestVLA reading its layer count from llm_config.json and a tokenizer file from
    another source."""

    config_files = ("llm_config.json",)
    host_files = {"default": ("notes.txt",), "tok": ("tokenizer.model",)}

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config):
        config = super().config_from_checkpoint(checkpoint_config)
        llm = checkpoint_config["llm_config.json"]
        return dataclasses.replace(config, num_hidden_layers=llm["num_hidden_layers"])

    def use_checkpoint_files(self, directories):
        self.host_directories = dict(directories)


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name="declaring", model_class="mstar_declaring:Declaring",
                           presets=("tiny",), weight_sources={"tok": "{tok}"}))
'''


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from mstar_testvla.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path / "ckpt", "tiny")


def test_config_files_and_host_files_of_several_sources_reach_the_model(
        plugin_dir, checkpoint, tmp_path):
    tok = tmp_path / "tokenizer-repo"
    tok.mkdir()
    (tok / "tokenizer.model").write_text("spm")
    (checkpoint / "notes.txt").write_text("hi")
    (checkpoint / "llm_config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    plugin_dir.add("mstar-declaring", "mstar_declaring",
                   {"__init__.py": MODEL.replace("{tok}", str(tok))})
    spec = model_registry().get("declaring")

    model = make_model(spec, None, preset=None,
                       options=LoadOptions.of(spec, model_path=str(checkpoint)))
    assert model.config.num_hidden_layers == 3
    assert model.host_directories == {"default": checkpoint, "tok": tok}
    # Dummy weights fetch nothing that is not local: another repo's directory is None.
    dummy = make_model(spec, None, preset="tiny",
                       options=LoadOptions.of(spec, load_format="dummy"))
    assert dummy.host_directories == {"default": None, "tok": None}
    local = make_model(spec, None, preset="tiny", options=LoadOptions.of(
        spec, load_format="dummy", model_path=str(checkpoint)))
    assert local.host_directories == {"default": checkpoint, "tok": None}
    (checkpoint / "llm_config.json").unlink()
    with pytest.raises(WeightSourceError, match="has no llm_config.json"):
        make_model(spec, None, preset=None,
                   options=LoadOptions.of(spec, model_path=str(checkpoint)))


# -- pickled checkpoints -----------------------------------------------------------------------


@dataclasses.dataclass
class TrainingState:
    step: int
    lr: float


Versions = collections.namedtuple("Versions", "torch code")


def test_a_pickle_holding_other_objects_is_refused_naming_the_type_until_allowlisted(tmp_path):
    weights = {"w": torch.ones(2, 2)}
    path = tmp_path / "model.pt"
    torch.save({"state_dict": weights, "state": TrainingState(10, 1e-4),
                "versions": Versions("2.5", "abc")}, path)

    def read(spec: WeightSpec) -> dict[str, torch.Tensor]:
        return dict(iter_checkpoint([path], spec.format, safe_globals=spec.safe_globals))

    with pytest.raises(UnsafeCheckpointError) as err:
        read(WeightSpec(format="torch"))
    assert err.value.type_name == f"{__name__}.TrainingState"
    message = str(err.value)
    assert f"type {__name__}.TrainingState" in message and "safe_globals" in message
    assert "weights_only=False" in message  # only to say it is never done
    with pytest.raises(UnsafeCheckpointError, match=f"type {__name__}.Versions"):
        read(WeightSpec(format="torch", safe_globals=(TrainingState,)))
    loaded = read(WeightSpec(format="torch", safe_globals=(TrainingState, Versions)))
    assert loaded.keys() == {"w"} and torch.equal(loaded["w"], weights["w"])


# -- a model served from a URL source ----------------------------------------------------------

URL_MODEL = '''
from mstar.plugins import ModelSpec, hookimpl


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name="vla-url", model_class="mstar_testvla.model:TestVLA",
                           presets=("tiny",), weight_sources={"default": "{url}"}))
'''


def test_a_model_served_from_a_url_source_answers_as_from_its_local_checkpoint(
        plugin_dir, files, checkpoint, tmp_path):
    shutil.copy(checkpoint / "model.safetensors", files.root)
    url = files.url("model.safetensors") + "#sha256=" + sha256(checkpoint / "model.safetensors")
    plugin_dir.add("mstar-vla-url", "mstar_vla_url",
                   {"__init__.py": URL_MODEL.replace("{url}", url)})
    request = {"prompt": "the cup", "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    def tokens(deployment: mstar.LocalDeployment) -> list[int]:
        return [t for e in deployment.generate(request) if isinstance(e, mstar.events.TextDelta)
                for t in e.token_ids]

    with mstar.load("testvla", model_path=str(checkpoint), max_seq_len=64) as local:
        want = tokens(local)
    with mstar.load("vla-url", preset="tiny", cache_dir=str(tmp_path / "cache"),
                    max_seq_len=64) as served:
        assert tokens(served) == want and len(want) == 6
    assert files.gets == {"/model.safetensors": 1}
