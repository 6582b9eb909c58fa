"""The model contract: what a model declares, and the only things the runtime asks of it.

A model never schedules, batches or names a rank. It declares its nodes and their engines,
its walks, its KV layout and weights, and three host-side functions: `process_prompt` (in a
data worker, before anything runs), `next_walk` (in the conductor, at walk boundaries, on
small control values only) and `postprocess` (in a data worker, turning raw outputs into
client events).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import msgspec
import torch

from mstar.graph.primitives import Partition, StreamingGraphEdge, Walk
from mstar.model.forward import ExtraSpec, OutputAt, Segment

if TYPE_CHECKING:
    from torch import nn

    from mstar import events
    from mstar.chat.prompt import ChatPrompt
    from mstar.media import Audio
    from mstar.model.sampling import SamplingParams
    from mstar.weights.spec import WeightSpec

EngineType = Literal["kv_cache", "stateless"]


@dataclass(frozen=True)
class KVSpec:
    """What the KV-cache engine needs to know about a node.

    The cache is sized from `num_layers`, `num_kv_heads`, `head_dim` and `dtype`; `labels`
    are the KV labels the node's sequences may use (branch nodes' labels included).
    `position_axes` is 1 for 1-D RoPE or A for multi-axis positions. `extras` are the extra
    inputs the node's forward reads from `ForwardBatch.extras`; `outputs` maps each named
    output to where it is taken (`"last"`, `"all"`, `"segment:k"`, k may be negative:
    `"segment:-1"` is the chunk's last segment). An output named
    `logits` is sampled by the core sampler into `token_ids`. `num_heads` is the query
    heads (None: as many as `num_kv_heads`): not for the cache, but so that config
    validation refuses a `tp_size` that does not divide them before anything is built.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    labels: tuple[str, ...] = ("main",)
    position_axes: int = 1
    extras: tuple[ExtraSpec, ...] = ()
    outputs: Mapping[str, OutputAt] = field(default_factory=lambda: {"logits": "last"})
    num_heads: int | None = None

    @property
    def query_heads(self) -> int:
        """The query heads (`num_heads`, else `num_kv_heads`)."""
        return self.num_kv_heads if self.num_heads is None else self.num_heads

    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class BuildContext:
    """What `build_submodule` gets: where and how the node runs."""

    node: str
    device: torch.device
    dtype: torch.dtype
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # torch.distributed group when tp_size > 1


class Fork(msgspec.Struct, frozen=True):
    """Share the first `length` tokens (all when None) of a sequence copy-on-write into
    another label and/or child: CFG branches, `n` completions, CEM candidates. (A msgspec
    struct: it travels as is in control messages.)"""

    node: str
    length: int | None = None
    label: str = "main"
    child: int = 0
    src_label: str = "main"
    src_child: int = 0


@dataclass
class WalkStep:
    """Run `walk` next. `inputs` are new environment values: host values or handles of
    results of earlier walks, and tensors in a plan's first walks only (`next_walk` runs in
    the conductor, which has no tensor transport: a tensor there fails the request);
    `forks` run before it starts; `children` runs the walk once per child
    (0..children-1), each with its own environment copy."""

    walk: str
    inputs: dict[str, Any] = field(default_factory=dict)
    forks: list[Fork] = field(default_factory=list)
    children: int = 1


@dataclass(frozen=True)
class Done:
    """What `next_walk` returns instead of a `WalkStep`: the request (or this partition's
    part of it) is done, for `reason`. Not the client's `mstar.events.Finished` event, which
    the runtime sends once every partition is done."""

    reason: str = "stop"


#: The earlier name of `Done`, kept so plugins written against it still import.
Finished = Done


@dataclass
class RequestPlan:
    """What `process_prompt` returns: the first walk of each partition the request uses
    (partitions not named are never touched), request-wide host values (visible to every
    walk's environment: `max_tokens`, `num_steps`, `guidance_scale`, …), sampling
    parameters per site (`"default"` applies where a site has none), and the seed (drawn at
    admission when None). `prompt_detail` says what the prompt's tokens are made of (a
    model's media expand into many), added to the error of a prompt past `max_seq_len`."""

    first_walks: dict[str, WalkStep]
    params: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, SamplingParams] = field(default_factory=dict)
    seed: int | None = None
    prompt_tokens: int = 0
    prompt_detail: str = ""


@dataclass
class RequestState:
    """What `next_walk` sees: the request's host values, which partition/child/walk just
    ended, and `store`, a small dict the model may keep across walks (host values only)."""

    request_id: str
    params: dict[str, Any]
    partition: str
    walk: str
    child: int = 0
    walks_done: list[str] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputState:
    """What `postprocess` sees for one lane (`child`) of a request: its host values, a
    `store` for incremental state (e.g. undecoded bytes) and core's incremental detokenizer
    (None until the OpenAI layer brings it)."""

    request_id: str
    params: dict[str, Any]
    child: int = 0
    store: dict[str, Any] = field(default_factory=dict)
    detokenizer: Any = None


def token_list(value: Any) -> list[int]:
    """A `token_ids` output (a tensor of any shape, or a list) as a flat list of ints.

    Why not `torch.as_tensor(v).reshape(-1).tolist()`: each torch call there lets another
    thread take the GIL, and in one process (`mstar.load`) the worker then waits to get it
    back, once per token; a 1-D tensor's `tolist()` keeps it."""
    if isinstance(value, torch.Tensor):
        flat = value.tolist() if value.dim() == 1 else value.reshape(-1).tolist()
        return flat
    return [int(v) for v in value]


def text_delta(outputs: Mapping[str, Any], state: OutputState) -> events.TextDelta:
    """The client event of a lane's sampled `token_ids`: their text through the lane's
    incremental detokenizer, and the `logprobs` the worker emits beside them (rows of
    (token, log-prob, top alternatives)) when the request asked for them."""
    from mstar.events import TextDelta, TokenLogprob

    ids = token_list(outputs["token_ids"])
    rows = outputs.get("logprobs")
    logprobs = None if rows is None else [
        TokenLogprob(int(tok), float(lp), [(int(i), float(v)) for i, v in top])
        for tok, lp, top in rows]
    return TextDelta(text=state.detokenizer.push(ids), token_ids=ids, index=state.child,
                     logprobs=logprobs)


C = TypeVar("C")


def config_from_fields(cls: type[C], fields: Mapping[str, Any], **overrides: Any) -> C:
    """Config dataclass `cls` from a checkpoint's config dict: the keys that are fields of
    `cls`, by name (a checkpoint's other keys are ignored), then `overrides`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in fields.items() if k in names} | overrides)


class Model:
    """Base class of every model. Subclasses set `config_class` and `presets`, and
    implement the declarations below.

    `config_class` is a dataclass built from the checkpoint's `config.json` (and the
    `config_files` it declares, via `config_from_checkpoint`) or a preset, then updated
    with the deployment's `model_kwargs` (fixed at server start).
    """

    config_class: ClassVar[type]
    #: JSON files of the default checkpoint the config is built from besides config.json
    #: (BAGEL keeps its sizes in `llm_config.json` and `vit_config.json`): fetched with
    #: config.json and handed to `config_from_checkpoint` in its dict, each under its file
    #: name (`checkpoint_config["llm_config.json"]`).
    config_files: ClassVar[tuple[str, ...]] = ()
    #: False for checkpoints that ship no config.json (V-JEPA 2-AC's pickled release, built
    #: by the authors' code with fixed sizes): without a preset the config is then the
    #: class's defaults, updated with `model_kwargs`, and nothing is fetched for it.
    checkpoint_has_config: ClassVar[bool] = True
    #: Preset name -> config field overrides. `tiny` (CPU tests) and `small` (CPU
    #: benchmarks) are expected of every model; real sizes may be presets too.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Preset name -> the longest sequence that preset is meant for: a deployment with the
    #: preset gets min(config's `max_seq_len`, cap) unless `max_seq_len` is set explicitly
    #: (`--set max_seq_len=`, `mstar.load(max_seq_len=)`), so a tiny model does not inherit
    #: the real model's context length (and KV cache) from a packaged YAML.
    preset_max_seq_len: ClassVar[dict[str, int]] = {}

    def __init__(self, config: Any):
        self.config = config

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> Any:
        """Build the config dataclass from a checkpoint's config.json (with each of
        `config_files` under its file name). Default: pick the dataclass's fields by
        name."""
        return config_from_fields(cls.config_class, checkpoint_config)

    @classmethod
    def make_config(cls, *, preset: str | None = None,
                    checkpoint_config: dict[str, Any] | None = None,
                    model_kwargs: Mapping[str, Any] | None = None) -> Any:
        if preset is not None:
            if preset not in cls.presets:
                raise ValueError(f"unknown preset {preset!r} for {cls.__name__}; "
                                 f"available: {sorted(cls.presets)}")
            config = cls.config_class(**cls.presets[preset])
        elif checkpoint_config is not None:
            config = cls.config_from_checkpoint(checkpoint_config)
        else:
            config = cls.config_class()
        if model_kwargs:
            names = {f.name for f in dataclasses.fields(config)}
            unknown = sorted(set(model_kwargs) - names)
            if unknown:
                raise ValueError(f"unknown model_kwargs {unknown}; allowed: {sorted(names)}")
            config = dataclasses.replace(config, **dict(model_kwargs))
        return config

    # -- declarations --------------------------------------------------------------------
    def node_engine_types(self) -> dict[str, EngineType]:
        """Every graph node (branch nodes excluded) and its engine."""
        raise NotImplementedError

    def tp_nodes(self) -> set[str]:
        """Nodes whose weights may be sharded with `tp_size` > 1."""
        return set()

    def graph_walks(self) -> dict[str, Walk]:
        raise NotImplementedError

    def partitions(self) -> list[Partition]:
        """Disjoint node sets that run concurrently. Default: one partition, every node."""
        return [Partition("main", tuple(self.node_engine_types()))]

    def streaming_edges(self) -> list[StreamingGraphEdge]:
        return []

    def kv_spec(self, node: str) -> KVSpec:
        raise NotImplementedError(f"{type(self).__name__} has no KV spec for {node!r}")

    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        """Construct the node's module. The runtime calls this under `torch.device("meta")`
        and then allocates it on `ctx.device` in `ctx.dtype` itself (`mstar.weights.
        materialize`): do not move it. A buffer no checkpoint holds must be recomputable
        by its module's `reset_buffers()`."""
        raise NotImplementedError

    def weight_spec(self, node: str) -> WeightSpec:
        """Where the node's weights come from and how checkpoint keys map to parameters."""
        raise NotImplementedError

    def adjust_dummy_weight(self, node: str, name: str, weight: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
        """Dummy weights (`--load-format dummy`) that show the model's kind of output: a
        speech LM whose random tokens would never be audio codes can give its embedding and
        head a structure that makes them so. `weight` is the full (unsharded) tensor of
        parameter `name` of `node` as `mstar.weights.dummy` drew it (tied parameters once,
        under their first name); `generator` is seeded by (seed, name) and may draw more.
        The result is sharded and loaded. Default: unchanged."""
        return weight

    def stateless_inputs(self, node: str) -> tuple[str, ...]:
        """Optional: inputs of a stateless node (default: those its GraphNodes name)."""
        return ()

    def cacheable_nodes(self) -> set[str]:
        """Stateless nodes whose outputs are a pure function of their inputs (no noise, no
        state: vision and audio encoders). The engine keys each invocation by a hash of its
        inputs and serves repeats (the same image in another request) from a bounded cache
        (`encoder_cache_bytes`) without running the node."""
        return set()

    def unavailable_capabilities(self) -> set[str]:
        """Capabilities of the model's registered family (`ModelSpec.capabilities`) that
        this instance lacks: its config left the parts out (Qwen3-Omni without its Talker
        cannot speak). A deployment serves the family's capabilities less these, so the
        API refuses what it cannot do with a 400 naming the capability. Default: none."""
        return set()

    # -- host-side request handling ------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        raise NotImplementedError

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        raise NotImplementedError

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[events.Event]:
        raise NotImplementedError

    def tokenizer(self) -> Any:
        """The tokenizer core's detokenizer uses (None when the model emits no text)."""
        return None

    #: Files the host side needs (tokenizer, chat template, normaliser statistics,
    #: processor config) as glob patterns per weight source: `{"default": ("tokenizer.json",
    #: ...)}`, or another source when they live in another repo (Pi0.5's tokenizer).
    #: `make_model` fetches them and calls `use_checkpoint_files`.
    host_files: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def use_checkpoint_files(self, directories: Mapping[str, Path | None]) -> None:
        """Where the `host_files` are: the directory of each source `host_files` names;
        None for a source with no checkpoint (dummy weights without a model path holding
        it: the model falls back to what it ships, or fails clearly)."""

    # -- chat (the OpenAI layer; models with the "chat" capability) ----------------------
    def chat_template(self) -> str | None:
        """The Jinja chat template (a checkpoint's `chat_template`), rendered by
        `mstar.chat.render_chat` with HF-style messages; media parts appear as
        `{"type": "image" | "audio" | "video"}` and the template writes the model's marker
        for each. None: the model has no chat."""
        return None

    def process_chat(self, prompt: ChatPrompt, request: Mapping[str, Any]) -> RequestPlan:
        """`process_prompt` for a chat: `prompt` holds the rendered text and the decoded
        media (PIL images, `mstar.media.Audio`/`Video`) in marker order; `request` the
        sampling fields of `SamplingFields` (max_tokens, temperature, n, logprobs, ...).
        A chat asking for spoken output (models with the "audio_output" capability) also
        has `modalities: ["text", "audio"]` and, when the client named one, `voice` (the
        field the speech route fills too; an unknown voice is the model's `ValueError`
        or `RequestError` naming `voice`): the model then emits its text as `TextDelta`s
        (the transcript) and its speech as `AudioChunk`s."""
        raise NotImplementedError(f"{type(self).__name__} does not take chat requests")

    # -- audio input: chat audio parts, transcriptions ("transcription" capability) -------
    def audio_input_rate(self) -> int | None:
        """The sample rate (Hz) a chat's audio parts and a transcription's file are decoded
        at for this model (the data worker resamples to it); None: each file's own rate."""
        return None

    def process_transcription(self, audio: Audio, request: Mapping[str, Any]) -> RequestPlan:
        """`process_prompt` for `POST /v1/audio/transcriptions`: `audio` is the uploaded
        file decoded (mono, at `audio_input_rate()`); `request` holds `language` and
        `prompt` (each None when not given) and the sampling fields (`temperature`,
        `max_tokens`, `seed`, ...). The answer is the text the plan's walks emit."""
        from mstar.errors import RequestError

        raise RequestError(f"{type(self).__name__} does not transcribe audio", param="model")

    def default_segments(self, n: int) -> list[Segment]:
        return [Segment(n, "causal")]
