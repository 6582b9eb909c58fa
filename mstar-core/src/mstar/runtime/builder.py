"""Building a rank's nodes: the module from the model, its weights, its engine."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mstar.config.deployment import DeploymentConfig
from mstar.config.devices import node_dtype
from mstar.config.validate import NodePlacement
from mstar.engine.kv_cache import KVCacheManager, PagePool, device_kv_budget, plan_capacity
from mstar.engine.kv_engine import KVEngine
from mstar.engine.kv_profile import DeviceMemory, cuda_memory, profile_peak
from mstar.engine.stateless_engine import StatelessEngine
from mstar.model.contract import BuildContext, Model
from mstar.plugins.registry import ModelSpec
from mstar.weights import (
    WeightSourceError,
    checkpoint_files,
    init_dummy_weights,
    iter_checkpoint,
    load_weights,
    materialize,
    read_checkpoint_config,
    resolve_source,
)
from mstar.weights.cache import WeightCache, resolve_cache_dir
from mstar.weights.download import is_url
from mstar.weights.sources import is_hub_repo

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadOptions:
    """Where weights come from. `load_format="dummy"` gives seeded random weights of the
    real shapes (no files needed); `"auto"` reads the checkpoint (`model_path`, else each
    weight source's hub repo through huggingface_hub, or its URL). `revisions`: the hub
    revision per weight source name (`--revision`); a name the model does not have is an
    error here, at start."""

    load_format: str = "auto"
    model_path: str | None = None
    weight_sources: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    revisions: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        names = sorted({"default", *self.weight_sources})
        for source in self.revisions:
            if source not in names:
                raise ValueError(f"--revision names weight source {source!r}, which the "
                                 f"model does not have; its sources: {', '.join(names)}")
            if is_url(self.weight_sources.get(source, "")):
                raise ValueError(f"--revision {source}=...: weight source {source!r} is a "
                                 "URL to one file, which has no revisions")

    @classmethod
    def of(cls, spec: ModelSpec, **fields: Any) -> LoadOptions:
        """The options for `spec` (its weight sources, `HF_TOKEN` from the environment, the
        cache directory resolved once: `resolve_cache_dir`), as `mstar.load` and `mstar
        serve` both make them; a server's children get these, so all use one cache."""
        fields["cache_dir"] = str(resolve_cache_dir(fields.get("cache_dir")))
        return cls(weight_sources=dict(spec.weight_sources),
                   token=os.environ.get("HF_TOKEN"), **fields)

    def hub_repos(self) -> dict[str, tuple[str, str | None]]:
        """The weight sources read from the hub, by name: (repo, revision asked for)."""
        if self.load_format == "dummy":
            return {}
        found = {}
        for name in sorted({"default", *self.weight_sources}):
            if name == "default" and "default" not in self.weight_sources:
                continue
            location = checkpoint_location(name, self)
            if is_hub_repo(location):
                found[name] = (location, self.revisions.get(name))
        return found

    def at_commits(self) -> LoadOptions:
        """These options with each hub source's revision resolved to its commit, so that
        every process started with them loads the same snapshot (and a server leases
        exactly that one)."""
        cache = WeightCache(self.cache_dir)
        commits = {name: cache.resolve(repo, revision, token=self.token)
                   for name, (repo, revision) in self.hub_repos().items()}
        return dataclasses.replace(self, revisions={**self.revisions, **commits})

    def fetch(self, source: str, patterns: Sequence[str], subfolder: str | None = None) -> Path:
        """The local directory (or file) of weight source `source` (a name, a hub repo id,
        a path or a URL) holding `patterns`, fetched at the source's revision."""
        return resolve_source(checkpoint_location(source, self), patterns=patterns,
                              subfolder=subfolder, cache_dir=self.cache_dir,
                              revision=self.revisions.get(source), token=self.token)


def make_model(spec: ModelSpec, model_kwargs: Mapping[str, Any] | None, *,
               preset: str | None, options: LoadOptions) -> Model:
    """The model instance: its config from `preset`, else from the checkpoint's
    config.json and declared `config_files` (`model_path` or the hub), updated with the
    deployment's `model_kwargs`; given the directories of the `host_files` it declares
    (tokenizer, processor configs), each from its own weight source."""
    model = _configured_model(spec, model_kwargs, preset=preset, options=options)
    if model.host_files:
        model.use_checkpoint_files({source: _host_directory(source, patterns, options)
                                    for source, patterns in model.host_files.items()})
    return model


def _host_directory(source: str, patterns: Sequence[str], options: LoadOptions) -> Path | None:
    """Where `source`'s host files are; with dummy weights only a local checkpoint's
    (`--model-path` or its `<source>` subfolder), never a download."""
    if options.load_format == "dummy" and not (
            options.model_path is not None
            and Path(checkpoint_location(source, options)).is_relative_to(options.model_path)):
        return None
    return options.fetch(source, patterns)


def _configured_model(spec: ModelSpec, model_kwargs: Mapping[str, Any] | None, *,
                      preset: str | None, options: LoadOptions) -> Model:
    cls = spec.load_class()
    if preset is None:
        if options.load_format == "dummy" and not options.model_path:
            raise ValueError(f"load_format 'dummy' needs a preset (one of {list(spec.presets)}) "
                             "or a model path holding config.json")
        if not cls.checkpoint_has_config:  # the class's defaults are the checkpoint's sizes
            return cls(cls.make_config(model_kwargs=model_kwargs))
        path = options.fetch("default", ["config.json", *cls.config_files])
        checkpoint_config = read_checkpoint_config(path, cls.config_files)
        if not checkpoint_config:
            raise ValueError(f"no config.json in {path}: pass a checkpoint directory that has "
                             f"one, or a preset (one of {list(spec.presets)})")
        return cls(cls.make_config(checkpoint_config=checkpoint_config,
                                   model_kwargs=model_kwargs))
    return cls(cls.make_config(preset=preset, model_kwargs=model_kwargs))


def checkpoint_location(source: str, options: LoadOptions) -> str:
    """Where a weight source is: `--model-path` for the default one, and for another a
    subfolder of that path named after it when there is one (a local checkpoint of a model
    whose codec ships in its own repo: `<model path>/snac`), else the source's repo or URL
    (a source not among the model's weight sources is itself a repo id, path or URL,
    except "default": a model that names no main checkpoint has none to fetch, which is
    said)."""
    if options.model_path:
        if source == "default":
            return options.model_path
        inside = Path(options.model_path) / source
        if inside.is_dir():
            return str(inside)
    if source == "default" and source not in options.weight_sources:
        raise WeightSourceError(
            "the model names no hub repo for its weight source 'default': pass a local "
            "checkpoint with --model-path, or use --load-format dummy with a --preset")
    return options.weight_sources.get(source, source)


def build_module(model: Model, node: str, placement: NodePlacement, rank: int,
                 options: LoadOptions, device: torch.device,
                 tp_group: Any = None) -> torch.nn.Module:
    dtype = DTYPES[node_dtype(placement.dtype, str(device))]
    tp_rank, tp_size = placement.ranks.index(rank), placement.tp_size
    ctx = BuildContext(node=node, device=device, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size,
                       tp_group=tp_group if tp_size > 1 else None)
    if options.load_format == "dummy":
        def load(module: torch.nn.Module) -> list[str]:
            return init_dummy_weights(module, seed=options.seed, tp_rank=tp_rank,
                                      tp_size=tp_size,
                                      adjust=functools.partial(model.adjust_dummy_weight, node))
    elif options.load_format == "auto":
        ws = model.weight_spec(node)
        files = checkpoint_files(options.fetch(ws.source, ws.patterns, ws.subfolder),
                                 ws.patterns)

        def load(module: torch.nn.Module) -> list[str]:
            tensors = iter_checkpoint(files, ws.format, device, safe_globals=ws.safe_globals)
            return load_weights(module, tensors, ws, tp_rank=tp_rank, tp_size=tp_size,
                                dtype=ws.dtype or dtype).loaded
    else:
        raise ValueError(f"unknown load format {options.load_format!r}; use 'auto' or 'dummy'")
    # Built on meta (no memory), then allocated once, on the rank's device, by the loader.
    with torch.device("meta"):
        module = model.build_submodule(node, ctx)
    materialize(module, device, dtype, load)
    return module.eval()


def parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """What a rank holds of a node: (bytes of all its parameters, bytes of those split
    across a tensor-parallel group, i.e. marked with a `tp_shard_dim`). At tp_size t each
    rank holds 1/t of the split ones (padded up to whole rows) and all of the others."""
    held = sharded = 0
    for param in module.parameters():
        size = param.numel() * param.element_size()
        held += size
        if getattr(param, "tp_shard_dim", None) is not None:
            sharded += size
    return held, sharded


def tp_group_ranks(nodes: dict[str, NodePlacement]) -> tuple[int, ...]:
    """The ranks of this rank's tensor-parallel group (one group per rank), or ()."""
    groups = {p.ranks for p in nodes.values() if p.tp_size > 1}
    if len(groups) > 1:
        raise ValueError(f"a rank may belong to one tensor-parallel group, not {sorted(groups)}")
    return next(iter(groups), ())


def same_pages_in_group(pages: dict[str, int], nodes: dict[str, NodePlacement],
                        tp_group: Any, device: torch.device) -> dict[str, int]:
    """`pages` with each tensor-parallel node's count the smallest over its group: its
    followers take the very pages their leader allocates, so every rank needs them all (a
    budget planned from memory may differ between ranks)."""
    tp = sorted(n for n in pages if nodes[n].tp_size > 1)
    if not tp or tp_group is None:
        return pages
    import torch.distributed as dist

    counts = torch.tensor([pages[n] for n in tp], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MIN, group=tp_group)
    return {**pages, **dict(zip(tp, counts.tolist()))}


def build_engines(model: Model, config: DeploymentConfig, nodes: dict[str, NodePlacement],
                  rank: int, options: LoadOptions, *, device: torch.device,
                  ranks_sharing_device: int, eos_token_ids: tuple[int, ...] = (),
                  tp_group: Any = None, enable_nvtx: bool = False,
                  memory: DeviceMemory | None = None):
    """Every engine of one rank, by node name. `tp_group`: the torch.distributed group of
    this rank's tensor-parallel nodes (processes only). On the CPU the KV budget is a share
    of free host memory measured before the modules load. With `memory` (on CUDA, the
    device's allocator figures; a test injects its own) and KV pages planned from
    `memory_fraction`, the modules load first, every KV node runs one profile step at the
    scheduler's token budget (`kv_profile.profile_peak`), and the budget is
    `device_kv_budget` of the weights and the largest of those peaks."""
    engine_types = model.node_engine_types()
    kv_nodes = {  # a tensor-parallel rank holds its share of the KV heads, in its dtype
        n: dataclasses.replace(model.kv_spec(n),
                               num_kv_heads=model.kv_spec(n).num_kv_heads // p.tp_size,
                               dtype=DTYPES[node_dtype(p.dtype, str(device))])
        for n, p in nodes.items() if engine_types[n] == "kv_cache"}
    if memory is None and device.type == "cuda":
        memory = cuda_memory(device)
    modules, budget = {}, None
    if memory is not None and kv_nodes and config.kv_cache.num_pages is None:
        modules = {n: build_module(model, n, p, rank, options, device, tp_group)
                   for n, p in nodes.items()}
        weights = memory.allocated()
        peak = max(profile_peak(n, modules[n], spec, memory, scheduler=config.scheduler,
                                max_seq_len=config.max_seq_len,
                                page_size=config.kv_cache.page_size, device=device)
                   for n, spec in kv_nodes.items())
        budget = device_kv_budget(
            memory.total(), memory_fraction=config.kv_cache.memory_fraction,
            ranks_sharing_device=ranks_sharing_device, weights_bytes=weights,
            peak_activation_bytes=peak)
        log.info("rank %d KV budget on %s: %.2f GiB (weights %.2f GiB, profiled forward "
                 "peak %.2f GiB)", rank, device, budget / 2**30, weights / 2**30,
                 peak / 2**30)
    pages = plan_capacity(kv_nodes, max_seq_len=config.max_seq_len,
                          page_size=config.kv_cache.page_size,
                          num_pages=config.kv_cache.num_pages,
                          memory_fraction=config.kv_cache.memory_fraction,
                          ranks_sharing_device=ranks_sharing_device,
                          shares=config.kv_cache.shares, device=device,
                          max_num_seqs=config.scheduler.max_num_seqs,
                          budget_bytes=budget) if kv_nodes else {}
    if config.kv_cache.num_pages is None:
        pages = same_pages_in_group(pages, nodes, tp_group, device)
    engines: dict[str, KVEngine | StatelessEngine] = {}
    cacheable = model.cacheable_nodes()
    for node, placement in nodes.items():
        module = modules[node] if node in modules else build_module(
            model, node, placement, rank, options, device, tp_group)
        if node in kv_nodes:
            pool = PagePool(kv_nodes[node], pages[node], config.kv_cache.page_size, device)
            engines[node] = KVEngine(node, module, kv_nodes[node], KVCacheManager(pool),
                                     max_seq_len=config.max_seq_len,
                                     scheduler=config.scheduler, eos_token_ids=eos_token_ids,
                                     device=device, tokenizer=model.tokenizer,
                                     # tensor-parallel nodes too: their followers adopt
                                     # what the leader's step says (`kv_runner.tp_step`)
                                     prefix_caching=config.kv_cache.enable_prefix_caching)
            if placement.tp_size > 1:
                engines[node].tp_ranks, engines[node].tp_group = placement.ranks, tp_group
        else:
            engines[node] = StatelessEngine(
                node, module, max_batch=config.scheduler.max_num_seqs,
                cache_bytes=config.encoder_cache_bytes if node in cacheable else 0,
                device=device)
    for engine in engines.values():
        engine.nvtx = enable_nvtx
    return engines
