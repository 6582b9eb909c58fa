"""Deployment configs: loading (files, packaged names, overrides), schema errors, and the
checks against a model with the placement they resolve to."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest

from mstar.config import (
    ConfigError,
    DeploymentConfig,
    load_config,
    parse_overrides,
    placement,
    validate_for_model,
)
from mstar.graph import GraphNode, Loop, Parallel, Sequential, Walk
from mstar.model.contract import KVSpec, Model


@dataclass(frozen=True)
class TinyConfig:
    hidden_size: int = 16
    num_kv_heads: int = 4
    num_heads: int = 8
    action_horizon: int = 8


class Tiny(Model):
    """A BAGEL-shaped model: an encoder, a KV-cache LLM with a CFG branch, a decoder."""

    config_class = TinyConfig
    presets = {"tiny": {}}

    def node_engine_types(self):
        return {"vit_encoder": "stateless", "LLM": "kv_cache", "vae_decoder": "stateless"}

    def tp_nodes(self):
        return {"LLM"}

    def kv_spec(self, node):
        assert node == "LLM"
        return KVSpec(num_layers=2, num_kv_heads=self.config.num_kv_heads, head_dim=4,
                      num_heads=self.config.num_heads, labels=("main", "cfg_text"))

    def graph_walks(self):
        llm = GraphNode("LLM", inputs=("embeds",), outputs=("logits",))
        denoise = Parallel(
            GraphNode("LLM", inputs=("latents",), outputs=("velocity",)),
            GraphNode("LLM_cfg_text", inputs=("latents",), outputs=("velocity",),
                      alias_of="LLM", label="cfg_text", rename={"velocity": "v_text"}))
        return {
            "prefill": Walk(Sequential(GraphNode("vit_encoder", ("pixels",), ("embeds",)), llm)),
            "decode": Walk(llm, control=("token_ids",)),
            "image_gen": Walk(Sequential(Loop(denoise, times="num_steps", carry=["latents"]),
                                         GraphNode("vae_decoder", ("latents",), ("image",)))),
        }


@pytest.fixture
def model() -> Tiny:
    return Tiny(Tiny.make_config(preset="tiny"))


SINGLE_YAML = """\
model: "tiny"
max_seq_len: 4096
node_groups:
  - {node_names: [vit_encoder], ranks: [0]}
  - {node_names: [vae_decoder], ranks: [0]}
  - {node_names: [LLM], ranks: [0]}
model_kwargs:
  action_horizon: 15
"""

SINGLE = {"model": "tiny", "node_groups": [
    {"node_names": ["vit_encoder"], "ranks": [0]},
    {"node_names": ["vae_decoder"], "ranks": [0]},
    {"node_names": ["LLM"], "ranks": [0]},
]}


def _config(**changes: Any) -> DeploymentConfig:
    """SINGLE with top-level keys replaced, or `group<i>` entries replaced, added or (None)
    removed."""
    data = copy.deepcopy(SINGLE)
    for key, value in changes.items():
        if key.startswith("group"):
            index = int(key[5:])
            groups = data["node_groups"]
            groups[index:index + 1] = [value] if value else []
        else:
            data[key] = value
    return DeploymentConfig.model_validate(data)


def _problems(config: DeploymentConfig, model: Model) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_for_model(config, model)
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def test_seed_style_yaml_loads_validates_and_places_everything_on_rank_0(tmp_path, model):
    path = tmp_path / "tiny_single_gpu.yaml"
    path.write_text(SINGLE_YAML)
    config = load_config(str(path))
    assert config.model == "tiny" and config.max_seq_len == 4096
    assert config.model_kwargs == {"action_horizon": 15}
    validate_for_model(config, model)

    placed = placement(config, model)
    assert placed.ranks() == [0]
    assert sorted(placed.nodes_on(0)) == ["LLM", "vae_decoder", "vit_encoder"]
    branch = placed.get("image_gen", "LLM_cfg_text")
    assert branch.module == "LLM" and branch.ranks == (0,)
    with pytest.raises(KeyError, match="'decode' does not run node 'vae_decoder'"):
        placed.get("decode", "vae_decoder")


def test_no_node_groups_means_everything_on_rank_0(model):
    placed = placement(DeploymentConfig(model="tiny"), model)
    assert placed.ranks() == [0]
    assert {(w, n) for w, n in placed.nodes} == {
        ("prefill", "vit_encoder"), ("prefill", "LLM"), ("decode", "LLM"),
        ("image_gen", "LLM"), ("image_gen", "LLM_cfg_text"), ("image_gen", "vae_decoder")}


def test_disaggregated_walks_and_branches(model):
    config = _config(group2={"node_names": ["LLM"], "ranks": [0], "graph_walks": ["prefill"]})
    config.node_groups += DeploymentConfig.model_validate({"model": "tiny", "node_groups": [
        {"node_names": ["LLM"], "ranks": [1], "graph_walks": ["decode"]},
        {"node_names": ["LLM"], "ranks": [2], "graph_walks": ["image_gen"]},
        {"node_names": ["LLM_cfg_text"], "ranks": [3], "dtype": "bfloat16"},
    ]}).node_groups
    placed = placement(config, model)
    assert placed.ranks() == [0, 1, 2, 3]
    assert placed.get("decode", "LLM").ranks == (1,)
    assert placed.get("image_gen", "LLM").ranks == (2,)
    branch = placed.get("image_gen", "LLM_cfg_text")
    assert (branch.module, branch.ranks, branch.dtype) == ("LLM", (3,), "bfloat16")
    assert list(placed.nodes_on(3)) == ["LLM"]
    assert sorted(placed.nodes_on(0)) == ["LLM", "vae_decoder", "vit_encoder"]


def test_tensor_parallel_group(model):
    config = _config(group2={"node_names": ["LLM"], "ranks": [0, 1], "tp_size": 2})
    placed = placement(config, model)
    on_1 = placed.nodes_on(1)
    assert list(on_1) == ["LLM"] and on_1["LLM"].ranks == (0, 1) and on_1["LLM"].tp_size == 2
    assert placed.get("image_gen", "LLM_cfg_text").tp_size == 2


LLM = "node_groups.2"


@pytest.mark.parametrize("changes, expected", [
    ({"group2": {"node_names": ["LLM", "vit"], "ranks": [0]}},
     f"{LLM}.node_names.1: unknown node 'vit'; allowed: LLM, LLM_cfg_text, vae_decoder, "
     "vit_encoder"),
    ({"group1": None}, "node_groups: node 'vae_decoder' is placed nowhere for walk(s) image_gen"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0], "graph_walks": ["prefill", "decode"]}},
     "node 'LLM' is placed nowhere for walk(s) image_gen"),
    ({"group3": {"node_names": ["LLM"], "ranks": [0], "graph_walks": ["decode"]}},
     "node_groups.3.graph_walks: node 'LLM' is placed again for walk(s) decode "
     "(already by node_groups.2)"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0],
                 "graph_walks": ["prefill", "decode", "image_gen", "prefil"]}},
     f"{LLM}.graph_walks.3: unknown walk 'prefil'; allowed: decode, image_gen, prefill"),
    ({"group2": {"node_names": ["LLM"], "ranks": [2]}},
     "node_groups.*.ranks: ranks must be numbered 0..2 without gaps; unused: 1"),
    ({"group2": {"node_names": ["LLM"], "ranks": [-1]}},
     f"{LLM}.ranks.0: rank -1 is negative"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0, 0], "tp_size": 2}},
     f"{LLM}.ranks.1: rank 0 is listed twice"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0, 1]}},
     f"{LLM}.tp_size: 1 with 2 rank(s); tp_size must equal the number of ranks (2)"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0], "tp_size": 2}},
     f"{LLM}.tp_size: 2 with 1 rank(s)"),
    ({"group0": {"node_names": ["vit_encoder"], "ranks": [0, 1], "tp_size": 2}},
     "node_groups.0.tp_size: node 'vit_encoder' cannot be sharded (tp_size 2); nodes "
     "allowing tp_size > 1: LLM"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0, 1, 2], "tp_size": 3}},
     f"{LLM}.tp_size: 3 does not divide node 'LLM''s 8 query heads and 4 KV heads (each "
     "rank holds whole heads of both); allowed: 1, 2, 4"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0], "dtype": "fp8"}},
     f"{LLM}.dtype: unknown dtype 'fp8'; allowed: float32, float16, bfloat16"),
    ({"model_kwargs": {"horizon": 3}},
     "model_kwargs.horizon: not a field of TinyConfig; allowed: action_horizon, hidden_size, "
     "num_heads, num_kv_heads"),
    ({"kv_cache": {"shares": {"vit_encoder": 1.0}}},
     "kv_cache.shares.vit_encoder: not a KV-cache node; allowed: LLM"),
    ({"max_seq_len": 512, "kv_cache": {"num_pages": 24}},
     "kv_cache.num_pages: 24 pages of 16 tokens hold 384 tokens, less than one sequence of "
     "max_seq_len=512 (32 pages); raise kv_cache.num_pages to at least 32 or lower "
     "max_seq_len"),
    ({"group2": {"node_names": ["LLM"], "ranks": [0], "graph_walks": ["decode"],
                 "dtype": "bfloat16"},
      "group3": {"node_names": ["LLM"], "ranks": [0], "graph_walks": ["prefill", "image_gen"]}},
     "node 'LLM' on rank 0 is placed with different layouts"),
])
def test_each_invalid_field_is_named_with_what_is_allowed(model, changes, expected):
    problems = _problems(_config(**changes), model)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_tp_size_must_divide_the_query_heads_too():
    """Query heads are checked with the KV heads, before anything is built: 6 query heads
    over 4 ranks fail although the 4 KV heads would split."""
    model = Tiny(Tiny.make_config(preset="tiny", model_kwargs={"num_heads": 12}))
    config = _config(group2={"node_names": ["LLM"], "ranks": [0, 1, 2, 3], "tp_size": 4})
    validate_for_model(config, model)
    model = Tiny(Tiny.make_config(preset="tiny", model_kwargs={"num_heads": 6}))
    assert _problems(config, model) == [
        "node_groups.2.tp_size: 4 does not divide node 'LLM''s 6 query heads and 4 KV heads "
        "(each rank holds whole heads of both); allowed: 1, 2"]


def test_pi05_refuses_tp_size_2_for_its_single_kv_head():
    from mstar.plugins import load_model_class

    pi05 = load_model_class("pi05")
    model = pi05(pi05.make_config(preset="tiny"))
    others = [n for n in model.node_engine_types() if n != "LLM"]
    config = DeploymentConfig.model_validate({"model": "pi05", "node_groups": [
        {"node_names": ["LLM"], "ranks": [0, 1], "tp_size": 2},
        {"node_names": others, "ranks": [0]}]})
    assert _problems(config, model) == [
        "node_groups.0.tp_size: 2 does not divide node 'LLM''s 8 query heads and 1 KV heads "
        "(each rank holds whole heads of both); allowed: 1"]


def test_every_problem_is_reported_at_once(model):
    config = _config(
        group0={"node_names": ["vit"], "ranks": [0]},
        group1={"node_names": ["vae_decoder"], "ranks": [0, 1], "dtype": "float64"},
        group2={"node_names": ["LLM"], "ranks": [0], "tp_size": 2,
                "graph_walks": ["prefill", "decode", "image_gen", "nope"]},
        model_kwargs={"hidden": 1})
    problems = _problems(config, model)
    fields = [p.split(":")[0] for p in problems]
    assert fields == [
        "node_groups.0.node_names.0", "node_groups.1.tp_size", "node_groups.1.dtype", "node_groups.2.graph_walks.3", "node_groups.2.tp_size",
        "model_kwargs.hidden", "node_groups"]
    assert "'vit_encoder' is placed nowhere for walk(s) prefill" in problems[-1]


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("model: tiny\nnode_groups:\n  - {node_names: [LLM], ranks: [0]\n",
     ["yaml (line 4, column 1): expected ',' or '}', but got '<stream end>'"]),
    ("- model: tiny\n", ["config: expected a mapping of keys (model, node_groups, ...), got list"]),
    ("", ["config: expected a mapping of keys (model, node_groups, ...), got NoneType"]),
    ("max_seq_len: 10\n", ["model: required"]),
    ("model: tiny\nnode_group: []\n",
     ["node_group: unknown key; allowed: model, max_seq_len, node_groups, devices, "
      "model_kwargs, kv_cache, scheduler, max_concurrent_requests, max_children, "
      "encoder_cache_bytes, request_timeout"]),
    ("model: tiny\nnode_groups:\n  - {node_names: [LLM], ranks: [0]}\n"
     "  - {node_names: [vit_encoder], rank: [0], tp_size: 0}\n"
     "kv_cache: {page_sise: 8, memory_fraction: 2}\n",
     ["node_groups.1.ranks: required",
      "node_groups.1.tp_size: Input should be greater than or equal to 1 (got 0)",
      "node_groups.1.rank: unknown key; allowed: node_names, ranks, graph_walks, tp_size, dtype",
      "kv_cache.memory_fraction: Input should be less than or equal to 1 (got 2)",
      "kv_cache.page_sise: unknown key; allowed: page_size, num_pages, memory_fraction, shares, "
      "enable_prefix_caching"]),
])
def test_yaml_and_schema_errors_list_every_bad_field(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == expected
    assert str(info.value).startswith(f"invalid config {path}: {len(expected)} problem(s)")


def test_overrides_apply_dotted_paths_before_validation(tmp_path, model):
    path = _write(tmp_path, SINGLE_YAML)
    config = load_config(path, overrides=parse_overrides([
        "max_seq_len=8192", "node_groups.2.ranks=[0, 1]", "node_groups.2.tp_size=2",
        "node_groups.2.dtype=bfloat16", "kv_cache.num_pages=512", "model_kwargs.action_horizon=3"]))
    assert config.max_seq_len == 8192 and config.kv_cache.num_pages == 512
    assert config.node_groups[2].ranks == [0, 1] and config.node_groups[2].tp_size == 2
    assert config.node_groups[2].dtype == "bfloat16"
    assert config.model_kwargs == {"action_horizon": 3}
    assert placement(config, model).get("decode", "LLM").ranks == (0, 1)

    with pytest.raises(ConfigError, match=r"node_groups\.2\.tp_size: Input should be greater"):
        load_config(path, overrides={"node_groups.2.tp_size": 0})
    with pytest.raises(ConfigError, match=r"node_groups\.9: no such entry \(the list has 3\)"):
        load_config(path, overrides={"node_groups.9.ranks": [0]})
    with pytest.raises(ConfigError, match=r"max_seq_len\.x: max_seq_len is a int"):
        load_config(path, overrides={"max_seq_len.x": 1})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["max_seq_len"])


PACKAGED_PLUGIN = '''
from mstar.plugins import ModelSpec, hookimpl


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name="tiny", model_class="tinyplug.model:Tiny",
                           configs={"tiny_single_gpu": "tinyplug:configs/tiny_single_gpu.yaml",
                                    "tiny_lost": "tinyplug:configs/missing.yaml"},
                           default_config="tiny_single_gpu"))
'''


def test_packaged_config_names_resolve_through_the_registry(plugin_dir, tmp_path, monkeypatch):
    plugin_dir.add("tiny-plugin", "tinyplug", {
        "__init__.py": PACKAGED_PLUGIN, "configs/tiny_single_gpu.yaml": SINGLE_YAML})
    monkeypatch.chdir(tmp_path)  # no configs/ directory here
    by_name = load_config("tiny_single_gpu")
    assert by_name.model == "tiny" and len(by_name.node_groups) == 3
    # A seed-000 style path that does not exist here falls back to the packaged copy.
    assert load_config("configs/tiny_single_gpu.yaml", overrides={"max_seq_len": 7}) == \
        by_name.model_copy(update={"max_seq_len": 7})

    with pytest.raises(ConfigError, match="no packaged config named 'tiny_multi'; packaged "
                                          "configs: .*tiny_lost, tiny_single_gpu"):
        load_config("tiny_multi")
    with pytest.raises(ConfigError, match="cannot read packaged config "
                                          "'tinyplug:configs/missing.yaml'"):
        load_config("tiny_lost")
