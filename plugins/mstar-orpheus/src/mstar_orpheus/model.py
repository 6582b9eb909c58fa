"""Orpheus: the model contract (declarations and host-side functions).

Two partitions run side by side for a request:
- `lm`: `prefill` (the prompt through the LLM, sampling the first token), then `decode`
  (one token per iteration until the stop token, 128258, or `max_tokens`).
- `codec`: `snac_chunk`, a loop of `snac_decoder` over windows of the audio codes the LLM
  streams to it (`StreamingGraphEdge` LLM → snac_decoder).

Codes and frames (as the authors' decoder does it): a generated token is an audio code
when it is a custom token (id ≥ 128256) and code = id − 128266 − 4096·(n mod 7) is > 0,
where n counts the codes accepted so far (anything else is skipped and does not count;
the reference's `> 0` also skips code 0). Seven codes make a frame: level 0 takes position
0, level 1 positions 1 and 4, level 2 positions 2, 3, 5 and 6.

Streaming windows (unit = frame, 2048 samples each; `STREAM_POLICY`): as soon as 4
frames exist the first window decodes frames 0-3 and emits its first 2 frames' samples
[0:4096] (the reference drops frame 0's audio: we keep it); then each new frame k decodes
frames k-3..k and emits samples [2048:4096] of the window (frame k-2), exactly the
reference's chunk. When the LLM stops, the flush decodes each remaining frame with the
frames that exist around it (one before, up to two after) and emits it, so every frame's
2048 samples are emitted exactly once: nothing is lost at either end, nothing repeated. An
utterance shorter than 4 frames is decoded whole at the end. A partial frame (fewer than 7
codes) at the end is dropped, as the reference does. A window holding a code the codebook
does not have (> 4095) is silence (the reference skips that chunk's audio; we keep the
timing: 2048 samples per frame always).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from mstar.events import AudioChunk, Event, TensorData
from mstar.graph import ChunkPolicy, GraphNode, Loop, Partition, StreamingGraphEdge, Walk
from mstar.model import (
    BuildContext,
    Done,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    SamplingFields,
    WalkStep,
    config_from_fields,
    text_delta,
    validate_request,
)
from mstar.weights import WeightSpec
from mstar_orpheus.config import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    CODES_PER_FRAME,
    CUSTOM_TOKEN_BASE,
    DEFAULT_VOICE,
    END_OF_SPEECH,
    PRESET_MAX_SEQ_LEN,
    PRESETS,
    PROMPT_END,
    SAMPLES_PER_FRAME,
    START_OF_HUMAN,
    VOICES,
    OrpheusConfig,
    SnacConfig,
)

#: Level of each of a frame's 7 codes, and where each level's codes sit in the frame.
LEVEL_POSITIONS = ((0,), (1, 4), (2, 3, 5, 6))
WINDOW_FRAMES = 4


class FrameAssembler:
    """Per request: the LLM's tokens in, whole frames of codes out ([k, 7] rows; see the
    module docstring for which tokens count)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.frame: list[int] = []

    def push(self, rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        frames = []
        for token in rows["token_ids"].reshape(-1).tolist():
            if token < CUSTOM_TOKEN_BASE:
                continue
            code = token - AUDIO_TOKEN_BASE - CODEBOOK_SIZE * (self.accepted % CODES_PER_FRAME)
            if code <= 0:
                continue
            self.accepted += 1
            self.frame.append(code)
            if len(self.frame) == CODES_PER_FRAME:
                frames.append(self.frame)
                self.frame = []
        return {"token_ids": torch.tensor(frames, dtype=torch.long).reshape(-1,
                                                                             CODES_PER_FRAME)}


#: Windows of frames (see the module docstring): first window emits frames 0-1 of 0-3, then
#: one frame with one frame of left context and two of lookahead. `max_buffered`: the LLM
#: pauses once the codec holds 20 frames (about 1.7 s of audio) plus the tokens on their
#: way; tokens that make no frame are credited back at once.
STREAM_POLICY = ChunkPolicy(window=WINDOW_FRAMES, hop=1, emit=(1, 2), first_chunk=2,
                            max_buffered=20, assemble=FrameAssembler)


def frame_levels(frames: torch.Tensor) -> list[torch.Tensor]:
    """[B, F, 7] frames -> SNAC's codes per level: [B, F], [B, 2F], [B, 4F]."""
    b = frames.shape[0]
    return [frames[:, :, list(pos)].reshape(b, -1) for pos in LEVEL_POSITIONS]


def keyed_noise(ctx: Any, indices: list[int]) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """Noise for a batch of windows (items `indices` of the step): the decoder's k-th noise
    draw takes, for each window, the runtime's keyed noise at site "snac_noise/k"."""
    blocks = itertools.count()

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        site = f"snac_noise/{next(blocks)}"
        return torch.cat([ctx.randn(i, (1, *shape[1:]), site=site) for i in indices])

    return noise


class SnacNode(nn.Module):
    """The `snac_decoder` node: each item's window of frames [F, 7] -> `audio` [F·2048].

    Windows of the same length decode in one batch. SNAC's noise blocks draw their noise
    from the runtime's keyed generator (per request, window and block), so audio does not
    depend on batching or placement."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, items: list[dict[str, Any]], ctx: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            frames = item["codes"].long()
            if frames.numel() == 0:
                out[i] = {"audio": torch.zeros(0)}
            elif bool(((frames < 0) | (frames >= CODEBOOK_SIZE)).any()):
                out[i] = {"audio": torch.zeros(frames.shape[0] * SAMPLES_PER_FRAME)}
            else:
                groups.setdefault(frames.shape[0], []).append(i)
        for indices in groups.values():
            frames = torch.stack([items[i]["codes"].long() for i in indices])
            audio = self.decoder.decode(frame_levels(frames), noise=keyed_noise(ctx, indices))
            for row, i in enumerate(indices):
                out[i] = {"audio": audio[row].reshape(-1)}
        return out  # type: ignore[return-value]


class OrpheusRequest(SamplingFields):
    """The native request of `orpheus` (`POST /generate`; `/v1/audio/speech` maps onto it).
    Sampling defaults are the authors' (temperature 0.6, top_p 0.8, repetition penalty
    1.3); each may be overridden."""

    __test__: ClassVar[bool] = False
    model_config = ConfigDict(extra="ignore")

    input: str = Field(description="The text to speak.")
    voice: str | None = Field(None, description=f"One of {', '.join(VOICES)} "
                                                f"(default {DEFAULT_VOICE}).")
    max_tokens: int = Field(1200, description="Tokens to generate at most (7 per frame of "
                                              "2048 samples at 24 kHz).")
    temperature: float | None = 0.6
    top_p: float | None = 0.8
    repetition_penalty: float | None = 1.3

    @field_validator("input")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("voice")
    @classmethod
    def _known_voice(cls, value: str | None) -> str | None:
        if value is not None and value not in VOICES:
            raise ValueError(f"unknown voice {value!r}; voices: {', '.join(VOICES)}")
        return value


class Orpheus(Model):
    """Orpheus TTS (see the module docstring)."""

    config_class = OrpheusConfig
    presets = PRESETS
    preset_max_seq_len: ClassVar[dict[str, int]] = PRESET_MAX_SEQ_LEN
    config: OrpheusConfig
    host_files: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "default": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}

    def __init__(self, config: OrpheusConfig):
        super().__init__(config)
        self._tokenizer_dir: Path | None = None
        self._tokenizer: Any = None

    # -- declarations ----------------------------------------------------------------------
    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"LLM": "kv_cache", "snac_decoder": "stateless"}

    def tp_nodes(self) -> set[str]:
        return {"LLM"}

    def partitions(self) -> list[Partition]:
        return [Partition("lm", ("LLM",)), Partition("codec", ("snac_decoder",))]

    def streaming_edges(self) -> list[StreamingGraphEdge]:
        return [StreamingGraphEdge(src="LLM", dst="snac_decoder",
                                   tensors={"token_ids": "codes"}, policy=STREAM_POLICY)]

    def kv_spec(self, node: str) -> KVSpec:
        if node != "LLM":
            raise ValueError(f"orpheus node {node!r} has no KV cache (only 'LLM' has)")
        from mstar_orpheus.llm import kv_spec

        return kv_spec(self.config)

    def graph_walks(self) -> dict[str, Walk]:
        return {
            "prefill": Walk(GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids",),
                                      emit=("token_ids",)),
                            control=("token_ids", "finished", "finish_reason")),
            "decode": Walk(Loop(GraphNode("LLM", inputs=("input_ids",),
                                          outputs=("token_ids",), emit=("token_ids",)),
                                until="finished", carry={"token_ids": "input_ids"}),
                           control=("finish_reason",)),
            "snac_chunk": Walk(Loop(GraphNode("snac_decoder", inputs=("codes",),
                                              outputs=("audio",), emit=("audio",)),
                                    until="stream_ended")),
        }

    # -- modules and weights ---------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        if node == "LLM":
            from mstar_orpheus.llm import OrpheusLLM

            module: nn.Module = OrpheusLLM(self.config, tp_rank=ctx.tp_rank,
                                           tp_size=ctx.tp_size, tp_group=ctx.tp_group)
        elif node == "snac_decoder":
            from mstar_orpheus.snac import SnacDecoder

            module = SnacNode(SnacDecoder(self.config.snac))
        else:
            raise ValueError(f"unknown orpheus node {node!r}; nodes: LLM, snac_decoder")
        return module.eval()

    def weight_spec(self, node: str) -> WeightSpec:
        if node == "LLM":
            from mstar_orpheus.llm import llm_weight_spec

            return llm_weight_spec(self.config)
        if node == "snac_decoder":
            from mstar_orpheus.snac import snac_weight_spec

            spec = snac_weight_spec()  # the codec's own names, under SnacNode's `decoder.`
            rules = tuple((pattern, None if target is None else f"decoder.{target}")
                          for pattern, target in spec.key_map)
            return dataclasses.replace(spec, key_map=(*rules, (r"(.*)", r"decoder.\1")))
        raise ValueError(f"unknown orpheus node {node!r}; nodes: LLM, snac_decoder")

    def adjust_dummy_weight(self, node: str, name: str, weight: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
        """Dummy Orpheus speaks: the LM samples audio codes only (`speaking`) and the codec
        turns them into audible noise (`audible_value`; generic dummy gains are near
        silent)."""
        if node == "LLM":
            from mstar_orpheus.speaking import speaking_weight

            return speaking_weight(name, weight, generator)
        from mstar_orpheus.snac import audible_value

        return audible_value(name, weight.shape, generator).to(weight.dtype)

    # -- tokenizer -------------------------------------------------------------------------
    def use_checkpoint_files(self, directories: Mapping[str, Path | None]) -> None:
        """The tokenizer's directory (the default checkpoint's); a local checkpoint holding
        its codec (`snac/`) also gives the codec's config (the LM's config.json has only
        the LM's fields)."""
        self._tokenizer_dir = directory = directories["default"]
        codec = Path(directory) / "snac" / "config.json" if directory is not None else None
        if codec is not None and codec.is_file():
            self.config.snac = config_from_fields(SnacConfig, json.loads(codec.read_text()))

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer; without a checkpoint (dummy weights), the tiny one
        this package ships (real special-token ids, a small BPE for the text)."""
        if self._tokenizer is None:
            from mstar_orpheus import tokenizer

            directory = self._tokenizer_dir
            if directory is None or not (Path(directory) / "tokenizer.json").exists():
                directory = tokenizer.PACKAGED_TOKENIZER
            self._tokenizer = tokenizer.load_tokenizer(directory)
        return self._tokenizer

    # -- host side -------------------------------------------------------------------------
    def prompt_ids(self, text: str, voice: str) -> list[int]:
        """[start of human] + tokens("{voice}: {text}") (with BOS) + [end of text, end of
        human, start of AI, start of speech]: the authors' prompt."""
        return [START_OF_HUMAN, *self.tokenizer().encode(f"{voice}: {text}"), *PROMPT_END]

    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(OrpheusRequest, request, "orpheus")
        if req.n != 1:
            raise ValueError("n: orpheus speaks one utterance per request (n must be 1)")
        ids = self.prompt_ids(req.input, req.voice or DEFAULT_VOICE)
        sampling = req.sampling_params(eos_token_ids=[END_OF_SPEECH])
        return RequestPlan(
            first_walks={"lm": WalkStep("prefill", inputs={
                "input_ids": torch.tensor(ids, dtype=torch.long)}),
                "codec": WalkStep("snac_chunk")},
            params={"max_tokens": req.max_tokens}, sampling={"default": sampling},
            seed=req.seed, prompt_tokens=len(ids), prompt_ids=ids)

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.partition == "codec" or state.walk == "decode":
            return Done(control.get("finish_reason") or "stop")
        if state.walk == "prefill":
            if control.get("finished"):
                return Done(control.get("finish_reason") or "stop")
            return WalkStep("decode", inputs={"input_ids": control["token_ids"]})
        raise ValueError(f"orpheus has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        """Audio chunks as they are decoded. The LM's tokens only count for usage, unless
        the request asked for `logprobs`: then they come as text deltas with their
        log-probs (what a check of the LM's logits, e.g. across placements, reads)."""
        out: list[Event] = [text_delta(outputs, state)] if "logprobs" in outputs else []
        audio = torch.as_tensor(outputs.get("audio", ())).float().reshape(-1)
        if audio.numel():
            out.append(AudioChunk(samples=TensorData.from_tensor(audio),
                                  sample_rate=self.config.snac.sampling_rate,
                                  index=state.child))
        return out
