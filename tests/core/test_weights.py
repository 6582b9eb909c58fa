"""Weight sources, checkpoint reading and loading, and dummy weights, on files written here in
the Hugging Face layout (safetensors, sharded with an index, and `.pt`/`.bin`)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from mstar.weights import (
    WeightLoadError,
    WeightSourceError,
    WeightSpec,
    checkpoint_files,
    init_dummy_weights,
    iter_checkpoint,
    load_weights,
    read_checkpoint_config,
    resolve_source,
)
from mstar.weights.loader import full_shape

VOCAB, HIDDEN, INTER = 11, 8, 12


class Block(nn.Module):
    def __init__(self, tp_rank: int, tp_size: int):
        super().__init__()
        tp = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = ColumnParallelLinear(HIDDEN, HIDDEN, bias=True, **tp)
        self.self_attn.o_proj = RowParallelLinear(HIDDEN, HIDDEN, **tp)
        self.mlp = GatedMLP(HIDDEN, INTER, **tp)


class TinyLM(nn.Module):
    """HF Llama-like names; one persistent and one non-persistent buffer."""

    def __init__(self, tp_rank: int = 0, tp_size: int = 1, *, norm_offset: float = 0.0):
        super().__init__()
        tp = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(VOCAB, HIDDEN, **tp)
        self.model.layers = nn.ModuleList([Block(tp_rank, tp_size)])
        self.model.norm = RMSNorm(HIDDEN, offset=norm_offset)
        self.lm_head = ParallelLMHead(VOCAB, HIDDEN, **tp)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _hf_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full checkpoint in TinyLM's (HF) key layout, random values."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in TinyLM().state_dict().items()}


def _load(module: nn.Module, files: list[Path], spec: WeightSpec = WeightSpec(), **kw):
    return load_weights(module, iter_checkpoint(files, spec.format), spec, **kw)


def _assert_loaded(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert sorted(state) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(state[key], value), key


# -- sources and reading -----------------------------------------------------------------------


def test_safetensors_checkpoint_loads_through_a_local_source(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": HIDDEN}))

    path = resolve_source(str(ckpt), patterns=("*.safetensors",))
    assert path == ckpt
    assert read_checkpoint_config(path) == {"hidden_size": HIDDEN}
    files = checkpoint_files(path, ("*.safetensors",))
    model = TinyLM()
    report = _load(model, files)
    _assert_loaded(model, sd)
    assert sorted(report.loaded) == sorted(sd) and report.ignored == []


def test_index_json_decides_the_shards(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:4],
              "model-00002-of-00002.safetensors": keys[4:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # A consolidated copy some repos ship beside the shards: the index leaves it out.
    save_file({"stray.weight": torch.zeros(1)}, str(tmp_path / "consolidated.safetensors"))

    files = checkpoint_files(tmp_path, ("*.safetensors",))
    assert [f.name for f in files] == sorted(shards)
    model = TinyLM()
    _load(model, files)
    _assert_loaded(model, sd)


@pytest.mark.parametrize("layout", ["state_dict", "model_nested", "flat_legacy"])
def test_torch_files_load_wrapped_nested_or_legacy(tmp_path: Path, layout: str) -> None:
    sd = _hf_state_dict()
    path = tmp_path / ("model.pt" if layout != "model_nested" else "pytorch_model.bin")
    if layout == "state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif layout == "model_nested":
        nested: dict = {}
        for key, value in sd.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        torch.save({"model": nested}, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    files = checkpoint_files(tmp_path, ("*.pt", "*.bin"))
    model = TinyLM()
    _load(model, files, WeightSpec(patterns=("*.pt", "*.bin"), format="torch"))
    _assert_loaded(model, sd)


def test_source_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(WeightSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), patterns=("*.safetensors",))
    with pytest.raises(WeightSourceError, match="no subfolder 'vae'"):
        resolve_source(str(tmp_path), patterns=("*.safetensors",), subfolder="vae")
    (tmp_path / "vae").mkdir()
    assert resolve_source(str(tmp_path), patterns=("*",), subfolder="vae") == tmp_path / "vae"
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        checkpoint_files(tmp_path, ("*.safetensors",))
    assert read_checkpoint_config(tmp_path) == {}


def test_unknown_hub_repo_offline_gives_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    attempts: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: attempts.append(addr))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightSourceError) as err:
        resolve_source("mstar-tests/no-such-model", patterns=("*.safetensors",),
                       cache_dir=tmp_path)
    message = str(err.value)
    assert "'mstar-tests/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert "--model-path" in message and "--load-format dummy" in message
    assert attempts == []


# -- key mapping and problems ------------------------------------------------------------------


def test_key_map_strip_prefixes_and_ignore_rules(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    # A training checkpoint: wrapped in "module.", GPT-style layer names, extra rotary buffers.
    renamed = {}
    for key, value in sd.items():
        key = key.replace("model.layers.", "transformer.h.")
        renamed["module." + key] = value
    renamed["module.transformer.h.0.self_attn.rotary.inv_freq"] = torch.ones(4)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    spec = WeightSpec(
        strip_prefixes=("module.",),
        key_map=((r".*\.rotary\.inv_freq", None),
                 (r"transformer\.h\.(\d+)\.(.*)", r"model.layers.\1.\2"),
                 (r"transformer\.h\.0\.mlp\..*", "never.used")))
    model = TinyLM()
    report = _load(model, [tmp_path / "model.safetensors"], spec)
    _assert_loaded(model, sd)
    assert report.ignored == ["module.transformer.h.0.self_attn.rotary.inv_freq"]
    assert spec.map_key("module.lm_head.weight") == "lm_head.weight"


def _save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> list[Path]:
    save_file(sd, str(tmp_path / "model.safetensors"))
    return [tmp_path / "model.safetensors"]


def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    del sd["model.norm.weight"]
    with pytest.raises(WeightLoadError, match=r"missing parameters \(1\)") as err:
        _load(TinyLM(), _save(tmp_path, sd))
    assert err.value.missing == ["model.norm.weight"]
    assert "model.norm.weight" in str(err.value)


def test_extra_key_is_named(tmp_path: Path) -> None:
    sd = _hf_state_dict() | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 8)}
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        _load(TinyLM(), _save(tmp_path, sd))


def test_wrong_shape_names_key_parameter_and_both_full_shapes(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(HIDDEN, INTER + 2)
    # At tp_size 2 the expected shape reported is still the full one.
    with pytest.raises(WeightLoadError) as err:
        _load(TinyLM(1, 2), _save(tmp_path, sd), tp_rank=1, tp_size=2)
    message = str(err.value)
    assert ("checkpoint key 'model.layers.0.mlp.down_proj.weight' -> parameter "
            "'model.layers.0.mlp.down_proj.weight': checkpoint shape [8, 14], expected [8, 12]"
            in message)
    assert err.value.missing == []  # reported as a mismatch only


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    del sd["model.norm.weight"]
    del sd["scale"]
    sd["extra.bias"] = torch.zeros(3)
    sd["lm_head.weight"] = torch.zeros(VOCAB + 1, HIDDEN)
    spec = WeightSpec(key_map=((r"extra\.(.*)", r"lm_head.\1"),))
    with pytest.raises(WeightLoadError) as err:
        _load(TinyLM(), _save(tmp_path, sd), spec)
    e = err.value
    assert sorted(e.missing) == ["model.norm.weight", "scale"]
    assert e.unexpected == ["extra.bias"]
    assert e.mismatched == [("lm_head.weight", "lm_head.weight", (12, 8), (11, 8))]


def test_two_keys_for_one_parameter_are_reported(tmp_path: Path) -> None:
    sd = _hf_state_dict() | {"norm_copy.weight": torch.zeros(HIDDEN)}
    spec = WeightSpec(key_map=((r"norm_copy\.weight", "model.norm.weight"),))
    with pytest.raises(WeightLoadError, match="'model.norm.weight' and 'norm_copy.weight' "
                                              "both map to 'model.norm.weight'"):
        _load(TinyLM(), _save(tmp_path, sd), spec)


def test_dtype_converts_floating_parameters_only(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    model = TinyLM()
    _load(model, _save(tmp_path, sd), WeightSpec(dtype=torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.scale.dtype == torch.float32  # buffers keep theirs
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].to(torch.bfloat16))


# -- TP shards from a checkpoint -----------------------------------------------------------------


def _recombine(shards: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The full tensors implied by each rank's shards (padding cut)."""
    full: dict[str, torch.Tensor] = {}
    params = [dict(s.named_parameters()) for s in shards]
    for name, p in params[0].items():
        dim = getattr(p, "tp_shard_dim", None)
        if dim is None:
            assert all(torch.equal(r[name], p) for r in params)
            full[name] = p.detach()
        else:
            whole = torch.cat([r[name].detach() for r in params], dim=dim)
            full[name] = whole.narrow(dim, 0, full_shape(p, len(shards))[dim])
    return full


def test_tp_shards_of_a_checkpoint_recombine_to_it(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    files = _save(tmp_path, sd)
    shards = [TinyLM(r, 2) for r in range(2)]
    for r, shard in enumerate(shards):
        _load(shard, files, tp_rank=r, tp_size=2)
    assert torch.equal(shards[1].model.embed_tokens.weight[-1], torch.zeros(HIDDEN))
    for name, value in _recombine(shards).items():
        assert torch.equal(value, sd[name]), name


class _Reads:
    """Wraps the real `safe_open` and records the shape of every tensor read from a file,
    by checkpoint key, and the device each file was opened on."""

    def __init__(self, real):
        self.real = real
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.devices: list[str] = []

    def __call__(self, path, framework, device):
        self.devices.append(device)
        return _SpyHandle(self.real(path, framework=framework, device=device), self)


class _SpyHandle:
    def __init__(self, handle, reads: _Reads):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def _got(self, key, tensor):
        self.reads.shapes.setdefault(key, []).append(tuple(tensor.shape))
        return tensor

    def get_tensor(self, key):
        return self._got(key, self.handle.get_tensor(key))

    def get_slice(self, key):
        sliced = self.handle.get_slice(key)
        handle = self

        class Slice:
            def get_shape(self):
                return sliced.get_shape()

            def __getitem__(self, index):
                return handle._got(key, sliced[index])

        return Slice()


def test_a_tp_rank_reads_only_its_shard_from_safetensors(tmp_path: Path, monkeypatch) -> None:
    """A sharded layer's full weight never leaves the file on a TP rank: each rank reads its
    rows (`get_slice`), onto the device it loads on, and ends with what the full read gives."""
    from mstar.weights import loader

    sd = _hf_state_dict()
    files = _save(tmp_path, sd)
    reads = _Reads(loader.safe_open)
    monkeypatch.setattr(loader, "safe_open", reads)
    for rank in range(2):
        reads.shapes.clear()
        sliced, full = TinyLM(rank, 2), TinyLM(rank, 2)
        _load(sliced, files, tp_rank=rank, tp_size=2)
        load_weights(full, sd.items(), WeightSpec(), tp_rank=rank, tp_size=2)
        params = dict(sliced.named_parameters())
        sharded = [n for n, p in params.items() if getattr(p, "tp_shard_dim", None) is not None]
        assert len(sharded) >= 5
        for name in sharded:
            p = params[name]
            [shape] = reads.shapes[name]
            want = list(p.shape)
            want[p.tp_shard_dim] = min(p.shape[p.tp_shard_dim], sd[name].shape[p.tp_shard_dim]
                                       - rank * p.shape[p.tp_shard_dim])  # the last is padded
            assert shape == tuple(want) != tuple(sd[name].shape), name
        assert reads.shapes["model.norm.weight"] == [(HIDDEN,)]  # replicated: read whole
        for name, value in full.state_dict().items():
            assert torch.equal(sliced.state_dict()[name], value), name
    assert reads.devices == ["cpu", "cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_safetensors_are_read_onto_the_device(tmp_path: Path) -> None:
    sd = _hf_state_dict()
    cuda = torch.device("cuda:0")
    for key, stored in iter_checkpoint(_save(tmp_path, sd), device=cuda):
        whole, rows = stored.read(), stored.narrow(0, 1, 1)
        assert whole.device == rows.device == cuda, key
        assert torch.equal(whole.cpu(), sd[key]) and torch.equal(rows.cpu(), sd[key][1:2])


# -- dummy weights -------------------------------------------------------------------------------


def test_dummy_weights_are_deterministic_and_follow_the_rule() -> None:
    a, b, c = TinyLM(), TinyLM(), TinyLM()
    init_dummy_weights(a, seed=0)
    init_dummy_weights(b, seed=0)
    init_dummy_weights(c, seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    assert torch.equal(a.model.norm.weight, torch.ones(HIDDEN))
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(HIDDEN))
    emb = a.model.embed_tokens.weight
    assert 0.01 < emb.std().item() < 0.03 and emb.abs().max().item() < 0.2
    assert 0 < a.model.layers[0].self_attn.q_proj.bias.abs().max().item() < 0.2
    assert not torch.equal(emb, a.lm_head.weight)  # distinct names, distinct draws

    gemma = TinyLM(norm_offset=1.0)
    init_dummy_weights(gemma)
    assert torch.equal(gemma.model.norm.weight, torch.zeros(HIDDEN))


def test_dummy_tp_shards_recombine_to_the_tp1_dummy() -> None:
    full = TinyLM()
    init_dummy_weights(full, seed=7)
    shards = [TinyLM(r, 2) for r in range(2)]
    for r, shard in enumerate(shards):
        init_dummy_weights(shard, seed=7, tp_rank=r, tp_size=2)
    assert torch.equal(shards[1].lm_head.weight[-1], torch.zeros(HIDDEN))
    recombined = _recombine(shards)
    for name, value in full.named_parameters():
        assert torch.equal(recombined[name], value.detach()), name


def test_a_models_dummy_adjustment_sees_full_tensors_and_is_sharded_after() -> None:
    """`Model.adjust_dummy_weight` (the `adjust` hook) gets every parameter's full tensor on
    every rank, with a generator seeded by (seed, name) that may draw more; what it returns
    is what each rank shards, so TP layouts still hold the same weights."""
    seen: dict[int, dict[str, tuple[int, ...]]] = {}

    def adjusting(rank: int):
        def adjust(name: str, full: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            seen.setdefault(rank, {})[name] = tuple(full.shape)
            return full + torch.randn(full.shape, generator=gen)
        return adjust

    plain, full = TinyLM(), TinyLM()
    init_dummy_weights(plain, seed=7)
    init_dummy_weights(full, seed=7, adjust=adjusting(-1))
    shards = [TinyLM(r, 2) for r in range(2)]
    for r, shard in enumerate(shards):
        init_dummy_weights(shard, seed=7, tp_rank=r, tp_size=2, adjust=adjusting(r))
    assert seen[0] == seen[1] == seen[-1] == {
        name: tuple(p.shape) for name, p in full.named_parameters()}
    recombined = _recombine(shards)
    for (name, value), before in zip(full.named_parameters(), plain.parameters()):
        assert torch.equal(recombined[name], value.detach()), name
        assert not torch.equal(value, before), name
