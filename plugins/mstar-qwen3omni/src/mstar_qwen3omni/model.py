"""Qwen3-Omni: the model contract (declarations and host-side functions).

Three partitions run side by side for a request that asks for speech; a text-only request
uses only the first and reserves nothing in the others:

- `thinker` (nodes `audio_encoder`, `vision_encoder`, stateless and cacheable, and
  `Thinker`, KV): the prompt is prefilled one item per walk, as BAGEL's is (`prompt.py`
  cuts it): `prefill_text` (a run of text), `prefill_audio` (the audio encoder, then its
  rows spliced into the Thinker's chunk as `mm_embeds`), `prefill_vision` (an image or a
  video: the vision encoder, its rows spliced with their `deepstack` features),
  `prefill_video_audio` (a video with its audio track, rows interleaved by time), then
  `prefill_last` (the final text, `<|im_start|>assistant\\n`, which samples the first
  token) and `decode` (one token per iteration until `<|im_end|>` or `max_tokens`). The
  prompt's ids and 3-axis positions travel as one [4, L] tensor and every media tensor as
  one flat `media` tensor: the first walk gets them and each prefill walk hands them on as
  results, so the host never holds tensors. A request that speaks runs the `_speech`
  variant of each walk, whose Thinker also outputs `thinker_embeds` and `thinker_hidden`
  for every row it runs (computed only then).
- `talker` (node `Talker`, KV, with the code predictor inside): walk `talker`, a loop fed
  by the stream Thinker -> Talker (`thinker_embeds` -> `text_rows`, `thinker_hidden` ->
  `hidden_rows`, one row per Thinker token). Its first window is the whole Thinker prompt
  plus the first generated token's row (request param `talker_first_rows`), from which
  the Talker builds its own prompt (HF `generate`'s user and assistant parts, from the host
  values `prompt.talker_inputs` gives its first walk); afterwards one row per step, and
  empty windows once the Thinker has finished, until the Talker samples its end code or
  reaches its bound (`sampling["Talker"].max_tokens`). Each step after the first outputs
  one codec frame, `codes` [1, 16].
- `code2wav` (node `Code2Wav`, stateless): walk `code2wav`, windows of frames streamed from
  the Talker (`chunked_decode`'s chunk of `codec_chunk_frames` with
  `codec_left_context_frames` of left context, the first chunk `codec_first_chunk_frames`
  long for a fast first packet), each emitting 24 kHz `audio`.

A deployment with `enable_audio_output: false` (a `model_kwargs`, or a thinker-only
checkpoint's config.json: `-Thinking`, `-Captioner`) declares the `thinker` partition and its
text walks only: no Talker, no Code2Wav, no weights for them, and `audio_output` is not
among the capabilities it serves.

Sampling sites: `Thinker` (the request's fields; default temperature 0.7, top_p 0.9),
`Talker` (`talker_*`; HF's defaults temperature 0.9, top_k 50, top_p 1.0, repetition
penalty 1.05, stopping on the codec end code) and `code_predictor` (`code_predictor_*`;
temperature 1.0, top_k 50, top_p 0.8 as HF's generate; greedy when the Talker is, as HF
mirrors its `do_sample`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mstar.errors import RequestError
from mstar.events import AudioChunk, Event, TensorData
from mstar.graph import (
    ChunkPolicy,
    GraphNode,
    Loop,
    Partition,
    Sequential,
    StreamingGraphEdge,
    Walk,
)
from mstar.model import (
    BuildContext,
    Done,
    ImageInput,
    InputField,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    SamplingFields,
    SamplingParams,
    WalkStep,
    text_delta,
    validate_request,
)
from mstar.weights import WeightSpec
from mstar_qwen3omni.config import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    PRESET_MAX_SEQ_LEN,
    PRESETS,
    Qwen3OmniConfig,
)
from mstar_qwen3omni.prompt import (
    PREFILL_LAST,
    Encoded,
    ThinkerPrompt,
    build_prompt,
    prefill_schedule,
    talker_inputs,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from mstar.chat import ChatPrompt
    from mstar.media import Audio, Video

#: The system prompt Qwen's omni models were trained to speak under (their model cards'
#: and demos' default); a request asking for speech without a system message gets it.
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba "
                        "Group, capable of perceiving auditory and visual inputs, as well as "
                        "generating text and speech.")
#: The instruction a transcription request gives with the audio.
TRANSCRIBE_PROMPT = "Transcribe the audio into text."
SPEECH = "_speech"  # suffix of the walks of a request that speaks
THINKER_INPUTS = ("input_ids", "positions", "mm_embeds", "mm_mask", "deepstack")
THINKER_STREAMS = ("thinker_embeds", "thinker_hidden")
#: Rows the Thinker may run ahead of the Talker (per request; 16 KiB a row at real width
#: in bfloat16): text is never paced by speech in practice.
THINKER_AHEAD_ROWS = 4096
#: HF `generate`'s Talker bound (`talker_max_new_tokens`).
TALKER_MAX_FRAMES = 4096


# ------------------------------------------------------------------------------------------
# Request schema


class ChatMessage(BaseModel):
    """A text message of `/generate`'s `messages` (media go in the request's own fields)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Qwen3OmniRequest(SamplingFields):
    """`POST /generate` for `qwen3_omni`: a `prompt` (one user turn) or text `messages`,
    with at most one image, audio clip and video, placed before the text of the last user
    turn (several media per request: `/v1/chat/completions`). The plain sampling fields
    are the Thinker's; `talker_*` and `code_predictor_*` sample the speech."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(None, description="The user's text (one user turn).")
    messages: list[ChatMessage] | None = Field(
        None, description="A text conversation instead of `prompt`.")
    image: ImageInput | None = Field(None, description="An image for the last user turn.")
    audio: Annotated[Any, InputField("audio", sample_rate=INPUT_SAMPLE_RATE)] | None = Field(
        None, description="An audio clip for the last user turn (read at 16 kHz).")
    video: Annotated[Any, InputField("video", fps=2.0, sample_rate=INPUT_SAMPLE_RATE)] | None \
        = Field(None, description="A video for the last user turn (sampled at 2 frames a "
                                  "second; its audio track read at 16 kHz).")
    use_audio_in_video: bool = Field(False, description="Also hear the video's audio track, "
                                                        "interleaved with its frames by time.")
    modalities: list[Literal["text", "audio"]] | None = Field(
        None, description="[\"text\", \"audio\"] also speaks the answer (default text only).")
    voice: str | None = Field(None, description="The speaker (the checkpoint's: Ethan, "
                                                "Chelsie, Aiden); default Ethan.")
    max_tokens: int = Field(256, ge=1, description="Text tokens to generate at most.")
    temperature: float | None = 0.7
    top_p: float | None = 0.9
    talker_temperature: float = Field(0.9, ge=0.0)
    talker_top_k: int = Field(50, ge=0)
    talker_top_p: float = Field(1.0, gt=0.0, le=1.0)
    talker_repetition_penalty: float = Field(1.05, gt=0.0)
    talker_max_tokens: int | None = Field(
        None, ge=1, description="Codec frames (80 ms each) to speak at most; default "
                                "bounded by max_tokens.")
    code_predictor_temperature: float | None = Field(
        None, ge=0.0, description="Default 1.0 (0, greedy, when talker_temperature is 0).")
    code_predictor_top_k: int = Field(50, ge=0)
    code_predictor_top_p: float = Field(0.8, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> Qwen3OmniRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        if self.messages is not None and not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: the conversation needs a user message")
        if self.n != 1:
            raise ValueError("n: qwen3_omni answers one completion per request")
        return self

    @property
    def speaks(self) -> bool:
        return "audio" in (self.modalities or ())


def _validated(request: Mapping[str, Any], can_speak: bool) -> Qwen3OmniRequest:
    """The request checked against the schema (fields sent as null keep their defaults)
    and against the deployment: speech needs the Talker."""
    req = validate_request(Qwen3OmniRequest,
                           {k: v for k, v in request.items() if v is not None}, "qwen3_omni")
    if req.speaks and not can_speak:
        raise RequestError("modalities: this deployment of qwen3_omni cannot speak "
                           "(enable_audio_output is false, it has no Talker); ask for "
                           "[\"text\"]", param="modalities")
    return req


# ------------------------------------------------------------------------------------------
# Prepare rules (run on the worker, per invocation)


def _item(env: Mapping[str, Any]) -> dict[str, Any]:
    return env["items"][int(env["item"])]


def _media(env: Mapping[str, Any], at: list[Any]) -> torch.Tensor:
    offset, shape = at
    size = 1
    for d in shape:
        size *= int(d)
    return env["media"][offset:offset + size].view(*shape)


def _text_chunk(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
    """This walk's rows of the prompt: ids and (t, h, w) positions."""
    item = _item(env)
    rows = env["prompt"][:, item["start"]:item["start"] + item["length"]]
    return {"input_ids": rows[0], "positions": rows[1:], "segments": [(rows.shape[1], "causal")]}


def _audio_input(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
    return {"input_features": _media(env, _item(env)["input_features"])}


def _vision_input(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
    item = _item(env)
    return {"pixel_values": _media(env, item["pixel_values"]),
            "grid_thw": torch.tensor(item["grid_thw"], dtype=torch.long)}


def _media_chunk(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
    """A media item's rows: each placeholder's input embedding is the encoder's row, in
    order per kind (audio rows where the id is the audio placeholder, vision rows
    elsewhere), and vision rows carry their deepstack features."""
    chunk = _text_chunk(env, iteration)
    ids = chunk["input_ids"]
    audio, vision = env.get("audio_embeds"), env.get("vision_embeds")
    first = audio if audio is not None else vision
    embeds = first.new_zeros((ids.shape[0], first.shape[-1]))
    is_audio = ids == int(env["audio_token_id"])
    if audio is not None:
        embeds[is_audio.to(embeds.device)] = audio
    if vision is not None:
        visual = (~is_audio).to(embeds.device)
        embeds[visual] = vision.to(embeds.dtype)
        stack = env["deepstack"]  # [k, rows, H]
        deepstack = stack.new_zeros((ids.shape[0], stack.shape[0], stack.shape[-1]))
        deepstack[visual] = stack.transpose(0, 1)
        chunk["deepstack"] = deepstack
    chunk["mm_embeds"] = embeds
    chunk["mm_mask"] = torch.ones(ids.shape[0], dtype=torch.long)
    return chunk


def _decode_positions(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
    """Decoding continues at index + the prompt's rope delta on every axis."""
    return {"positions": int(env["decode_start"]) + (iteration or 0)}


# ------------------------------------------------------------------------------------------
# The model


class Qwen3Omni(Model):
    """Qwen3-Omni-30B-A3B-Instruct (see the module docstring)."""

    config_class = Qwen3OmniConfig
    presets = PRESETS
    preset_max_seq_len: ClassVar[dict[str, int]] = PRESET_MAX_SEQ_LEN
    host_files: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "default": ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "chat_template.json", "chat_template.jinja", "preprocessor_config.json")}
    config: Qwen3OmniConfig

    def __init__(self, config: Qwen3OmniConfig):
        super().__init__(config)
        self._checkpoint_dir: Path | None = None
        self._tokenizer: Any = None
        self._template: str | None = None

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> Qwen3OmniConfig:
        return Qwen3OmniConfig.from_checkpoint(checkpoint_config)

    # -- declarations ----------------------------------------------------------------------
    @property
    def can_speak(self) -> bool:
        """Whether this instance has its Talker and Code2Wav (`enable_audio_output`)."""
        return self.config.enable_audio_output

    def unavailable_capabilities(self) -> set[str]:
        return set() if self.can_speak else {"audio_output"}

    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        nodes: dict[str, Literal["kv_cache", "stateless"]] = {
            "audio_encoder": "stateless", "vision_encoder": "stateless", "Thinker": "kv_cache"}
        if self.can_speak:
            nodes.update(Talker="kv_cache", Code2Wav="stateless")
        return nodes

    def tp_nodes(self) -> set[str]:
        return {"Thinker", "Talker"} if self.can_speak else {"Thinker"}

    def cacheable_nodes(self) -> set[str]:
        return {"audio_encoder", "vision_encoder"}

    def partitions(self) -> list[Partition]:
        thinker = Partition("thinker", ("audio_encoder", "vision_encoder", "Thinker"))
        if not self.can_speak:
            return [thinker]
        return [thinker, Partition("talker", ("Talker",)), Partition("code2wav", ("Code2Wav",))]

    def streaming_edges(self) -> list[StreamingGraphEdge]:
        if not self.can_speak:
            return []
        c = self.config
        left, chunk = c.codec_left_context_frames, c.codec_chunk_frames
        return [
            StreamingGraphEdge(
                src="Thinker", dst="Talker",
                tensors={"thinker_embeds": "text_rows", "thinker_hidden": "hidden_rows"},
                policy=ChunkPolicy(window=1, hop=1, emit=(0, 1),
                                   first_chunk_param="talker_first_rows",
                                   continue_after_end=True, max_buffered=THINKER_AHEAD_ROWS)),
            StreamingGraphEdge(
                src="Talker", dst="Code2Wav", tensors={"codes": "codes"},
                rows_per_unit={"audio": c.samples_per_frame},
                policy=ChunkPolicy(window=left + chunk, hop=chunk, emit=(left, left + chunk),
                                   first_chunk=c.codec_first_chunk_frames,
                                   max_buffered=left + 2 * chunk)),
        ]

    def kv_spec(self, node: str) -> KVSpec:
        c = self.config
        if node == "Thinker":
            from mstar_qwen3omni.thinker import thinker_kv_spec

            return thinker_kv_spec(c.thinker_text(), deepstack_layers=len(
                c.thinker_config["vision_config"]["deepstack_visual_indexes"]))
        if node == "Talker":
            from mstar_qwen3omni.talker import talker_kv_spec

            return talker_kv_spec(c.talker())
        raise ValueError(f"qwen3_omni node {node!r} has no KV cache (Thinker and Talker have)")

    def graph_walks(self) -> dict[str, Walk]:
        from mstar_qwen3omni.talker import talker_walk

        if not self.can_speak:
            return self._thinker_walks("")
        walks = {**self._thinker_walks(""), **self._thinker_walks(SPEECH)}
        walks["talker"] = Walk(talker_walk(self.config.talker()), control=("finish_reason",))
        walks["code2wav"] = Walk(Loop(
            GraphNode("Code2Wav", inputs=("codes",), outputs=("audio",), emit=("audio",)),
            until="stream_ended"))
        return walks

    @staticmethod
    def _thinker_walks(suffix: str) -> dict[str, Walk]:
        """The Thinker's walks; with `SPEECH` its every invocation also outputs the rows the
        Talker reads."""
        streams = THINKER_STREAMS if suffix else ()

        def thinker(prepare: Any, *sampled: str) -> GraphNode:
            return GraphNode("Thinker", inputs=THINKER_INPUTS, outputs=(*sampled, *streams),
                             emit=sampled, prepare=prepare)

        audio = GraphNode("audio_encoder", inputs=("input_features",),
                          outputs=("audio_embeds",), prepare=_audio_input)
        vision = GraphNode("vision_encoder", inputs=("pixel_values", "grid_thw"),
                           outputs=("vision_embeds", "deepstack"), prepare=_vision_input)
        carried = ("prompt", "media")
        return {
            "prefill_text" + suffix: Walk(thinker(_text_chunk), results=carried),
            "prefill_audio" + suffix: Walk(Sequential(audio, thinker(_media_chunk)),
                                           results=carried),
            "prefill_vision" + suffix: Walk(Sequential(vision, thinker(_media_chunk)),
                                            results=carried),
            "prefill_video_audio" + suffix: Walk(Sequential(audio, vision,
                                                            thinker(_media_chunk)),
                                                 results=carried),
            PREFILL_LAST + suffix: Walk(thinker(_text_chunk, "token_ids"),
                                        control=("token_ids", "finished", "finish_reason")),
            "decode" + suffix: Walk(Loop(
                GraphNode("Thinker", inputs=("input_ids", "positions"),
                          outputs=("token_ids", *streams), emit=("token_ids",),
                          prepare=_decode_positions),
                until="finished", carry={"token_ids": "input_ids"}, iteration="decode_step"),
                control=("finish_reason",)),
        }

    # -- modules and weights ---------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        c = self.config
        tp = dict(tp_rank=ctx.tp_rank, tp_size=ctx.tp_size, tp_group=ctx.tp_group)
        if node == "Thinker":
            from mstar_qwen3omni.thinker import Thinker

            module: nn.Module = Thinker(
                c.thinker_text(), accept_hidden_layer=int(c.talker_config["accept_hidden_layer"]),
                **tp)
        elif node == "Talker":
            from mstar_qwen3omni.talker import Talker

            module = Talker(c.talker(), **tp)
        elif node == "audio_encoder":
            from mstar_qwen3omni.audio_encoder import AudioEncoderNode

            module = AudioEncoderNode(c.audio_encoder())
        elif node == "vision_encoder":
            from mstar_qwen3omni.vision_encoder import VisionEncoderNode

            module = VisionEncoderNode(c.vision_encoder())
        elif node == "Code2Wav":
            from mstar_qwen3omni.code2wav import Code2WavNode

            module = Code2WavNode(c.code2wav())
        else:
            raise ValueError(f"unknown qwen3_omni node {node!r}; nodes: "
                             f"{', '.join(self.node_engine_types())}")
        return module.eval()

    def weight_spec(self, node: str) -> WeightSpec:
        c = self.config
        if node == "Thinker":
            from mstar_qwen3omni.thinker import thinker_weight_spec

            return thinker_weight_spec(c.thinker_text())
        if node == "Talker":
            from mstar_qwen3omni.talker import talker_weight_spec

            return talker_weight_spec()
        if node == "audio_encoder":
            from mstar_qwen3omni.audio_encoder import audio_weight_spec

            return audio_weight_spec()
        if node == "vision_encoder":
            from mstar_qwen3omni.vision_encoder import vision_weight_spec

            return vision_weight_spec()
        if node == "Code2Wav":
            from mstar_qwen3omni.code2wav import code2wav_weight_spec

            return code2wav_weight_spec()
        raise ValueError(f"unknown qwen3_omni node {node!r}")

    # -- tokenizer, chat template, processor -----------------------------------------------
    def use_checkpoint_files(self, directories: Mapping[str, Path | None]) -> None:
        self._checkpoint_dir = directories.get("default")

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer; without one (dummy weights), the packaged tiny one."""
        if self._tokenizer is None:
            from mstar_qwen3omni.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._checkpoint_dir)
        return self._tokenizer

    def chat_template(self) -> str:
        if self._template is None:
            from mstar_qwen3omni.tokenizer import load_chat_template

            self._template = load_chat_template(self._checkpoint_dir)
        return self._template

    def audio_input_rate(self) -> int:
        return INPUT_SAMPLE_RATE

    def _processor(self) -> Any:
        """The processor's constants: the checkpoint's `preprocessor_config.json`, with the
        patch sizes the vision config uses."""
        from mstar.model import config_from_fields
        from mstar_qwen3omni.processing import ProcessorConfig

        vision = self.config.thinker_config["vision_config"]
        path = (Path(self._checkpoint_dir) / "preprocessor_config.json"
                if self._checkpoint_dir is not None else None)
        found = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        return config_from_fields(ProcessorConfig, found, patch_size=vision["patch_size"],
                                  merge_size=vision["spatial_merge_size"],
                                  temporal_patch_size=vision["temporal_patch_size"])

    # -- host side: requests -----------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = _validated(request, self.can_speak)
        if req.messages is not None:
            messages: list[dict[str, Any]] = [m.model_dump() for m in req.messages]
        else:
            messages = [{"role": "user", "content": req.prompt}]
        if req.speaks and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": SPEECH_SYSTEM_PROMPT})
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        parts: list[dict[str, Any]] = [{"type": kind} for kind, value in (
            ("audio", req.audio), ("image", req.image), ("video", req.video))
            if value is not None]
        messages[last_user] = {"role": "user", "content": [
            *parts, {"type": "text", "text": messages[last_user]["content"]}]}
        from mstar.chat import render_chat

        text = render_chat(self.chat_template(), messages)
        return self._plan(text, req, images=[req.image] if req.image is not None else [],
                          audios=[req.audio] if req.audio is not None else [],
                          videos=[req.video] if req.video is not None else [])

    def process_chat(self, prompt: ChatPrompt, request: Mapping[str, Any]) -> RequestPlan:
        """A chat's rendered conversation and media (in marker order); one that asks for
        speech and has no system message gets `SPEECH_SYSTEM_PROMPT` first."""
        req = _validated({**request, "prompt": prompt.text}, self.can_speak)
        text = prompt.text
        if req.speaks and not text.startswith("<|im_start|>system"):
            text = f"<|im_start|>system\n{SPEECH_SYSTEM_PROMPT}<|im_end|>\n{text}"
        return self._plan(text, req, images=prompt.images, audios=prompt.audios,
                          videos=prompt.videos)

    def process_transcription(self, audio: Audio, request: Mapping[str, Any]) -> RequestPlan:
        """The audio and `TRANSCRIBE_PROMPT` as one user turn (`language` names the
        language; `prompt` is context the transcript should follow); text out."""
        fields = {k: v for k, v in request.items() if k not in ("language", "prompt")}
        instruction = TRANSCRIBE_PROMPT
        if request.get("language"):
            instruction = f"Transcribe the {request['language']} audio into text."
        if request.get("prompt"):
            instruction += f" Context: {request['prompt']}"
        from mstar.chat import render_chat

        text = render_chat(self.chat_template(), [{"role": "user", "content": [
            {"type": "audio"}, {"type": "text", "text": instruction}]}])
        req = _validated({**fields, "prompt": text, "modalities": ["text"]},
                         self.can_speak)
        return self._plan(text, req, audios=[audio])

    def _encoded(self, images: list[Image], audios: list[Audio], videos: list[Video],
                 use_audio_in_video: bool) -> dict[str, list[Encoded]]:
        """Each media item through the processor's steps (`processing.py`), with the rows
        its encoder will give."""
        from mstar_qwen3omni import processing
        from mstar_qwen3omni.audio_encoder import audio_output_length

        proc, merge2 = self._processor(), self.config.spatial_merge_size ** 2

        def audio(clip: Audio) -> Encoded:
            features = processing.audio_features(_at_rate(clip, INPUT_SAMPLE_RATE), proc)
            return Encoded("audio", {"input_features": features}, audio_output_length(
                int(features.shape[-1]), self.config.audio_n_window))

        def vision(kind: str, pixels: torch.Tensor, grid: torch.Tensor,
                   second: float | None = None) -> Encoded:
            thw = tuple(int(v) for v in grid.tolist())
            return Encoded(kind, {"pixel_values": pixels}, thw[0] * thw[1] * thw[2] // merge2,
                           grid_thw=thw, second_per_grid=second)  # type: ignore[arg-type]

        out: dict[str, list[Encoded]] = {
            "images": [vision("image", *processing.image_patches(i, proc)) for i in images],
            "audios": [audio(a) for a in audios], "videos": []}
        for i, video in enumerate(videos):
            encoded = vision("video", *processing.video_patches(video.frames, video.fps, proc))
            if use_audio_in_video:
                track = getattr(video, "audio", None)
                if track is None:
                    raise RequestError(f"use_audio_in_video: video {i} has no audio track",
                                       param="use_audio_in_video")
                encoded.audio = audio(track)
            out["videos"].append(encoded)
        return out

    def _plan(self, text: str, req: Qwen3OmniRequest, *, images: list[Any] = (),  # type: ignore[assignment]
              audios: list[Any] = (), videos: list[Any] = ()) -> RequestPlan:  # type: ignore[assignment]
        c = self.config
        voice = (req.voice or c.default_speaker).lower()
        if req.speaks and voice not in c.speakers:
            raise RequestError(f"unknown voice {req.voice!r}; voices: "
                               f"{', '.join(v.capitalize() for v in c.speakers)}", param="voice")
        ids = self.tokenizer().encode(text, add_special_tokens=False)
        media = self._encoded(list(images), list(audios), list(videos), req.use_audio_in_video) \
            if images or audios or videos else {}
        prompt = build_prompt(ids, c, **media, use_audio_in_video=req.use_audio_in_video)
        suffix = SPEECH if req.speaks else ""
        params: dict[str, Any] = {
            "items": prompt.items, "walks": [w + suffix for w in prefill_schedule(prompt.items)],
            "decode_start": len(prompt.ids) + prompt.delta, "audio_token_id": c.audio_token_id,
            "max_tokens": req.max_tokens, "speaks": req.speaks}
        first_walks = {"thinker": _prefill_step(params, 0, prompt.tokens, prompt.media)}
        sampling = {"Thinker": req.sampling_params(eos_token_ids=[c.im_end_token_id])}
        if req.speaks:
            params["talker_first_rows"] = len(prompt.ids) + 1
            first_walks["talker"] = WalkStep("talker", inputs=talker_inputs(prompt, c, voice))
            first_walks["code2wav"] = WalkStep("code2wav")
            sampling.update(self._speech_sampling(req))
        return RequestPlan(first_walks=first_walks, params=params, sampling=sampling,
                           seed=req.seed, prompt_tokens=len(prompt.ids),
                           prompt_detail=_media_detail(prompt), prompt_ids=prompt.ids)

    def _speech_sampling(self, req: Qwen3OmniRequest) -> dict[str, SamplingParams]:
        c = self.config
        frames = req.talker_max_tokens or min(TALKER_MAX_FRAMES, max(
            c.talker_min_frames, c.talker_frames_per_token * (req.max_tokens + 1)))
        predictor_temperature = req.code_predictor_temperature
        if predictor_temperature is None:
            predictor_temperature = 0.0 if req.talker_temperature == 0 else 1.0
        return {
            "Talker": SamplingParams(
                temperature=req.talker_temperature, top_k=req.talker_top_k,
                top_p=req.talker_top_p, repetition_penalty=req.talker_repetition_penalty,
                max_tokens=frames, stop_token_ids=[c.codec_eos_token_id]).validate(),
            "code_predictor": SamplingParams(
                temperature=predictor_temperature, top_k=req.code_predictor_top_k,
                top_p=req.code_predictor_top_p, max_tokens=None).validate(),
        }

    # -- host side: walks and outputs --------------------------------------------------------
    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.partition != "thinker":
            return Done(control.get("finish_reason") or "stop")
        p, walk = state.params, state.walk
        if walk.startswith("decode"):
            return Done(control.get("finish_reason") or "stop")
        if walk.startswith(PREFILL_LAST):
            if control.get("finished"):
                return Done(control.get("finish_reason") or "stop")
            return WalkStep("decode" + (SPEECH if p["speaks"] else ""),
                            inputs={"input_ids": control["token_ids"]})
        done = len(state.walks_done)  # prefill items run in order, one walk each
        return _prefill_step(p, done, control.get("prompt"), control.get("media"))

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        out: list[Event] = []
        if "token_ids" in outputs:
            out.append(text_delta(outputs, state))
        if "audio" in outputs:
            audio = torch.as_tensor(outputs["audio"]).float().reshape(-1)
            if audio.numel():
                out.append(AudioChunk(samples=TensorData.from_tensor(audio),
                                      sample_rate=OUTPUT_SAMPLE_RATE, index=state.child))
        return out

    def adjust_dummy_weight(self, node: str, name: str, weight: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
        """Dummy Code2Wav speaks audibly (`dummy.audible_code2wav`: generic dummy weights
        decode to a constant); other nodes keep the generic draw."""
        if node == "Code2Wav":
            from mstar_qwen3omni.dummy import audible_code2wav

            return audible_code2wav(name, weight, generator)
        return weight


def _prefill_step(params: Mapping[str, Any], index: int, prompt: Any, media: Any) -> WalkStep:
    """The walk of prompt item `index` with what it reads: the [4, L] prompt and, while
    media items remain, the flat media tensor."""
    inputs: dict[str, Any] = {"item": index, "prompt": prompt}
    if media is not None and any(i["kind"] != "text" for i in params["items"][index:]):
        inputs["media"] = media
    return WalkStep(params["walks"][index], inputs=inputs)


def _media_detail(prompt: ThinkerPrompt) -> str:
    """How many of the prompt's tokens its media took (for the too-long error)."""
    if not prompt.media_rows:
        return ""
    parts = ", ".join(f"{kind} {rows}" for kind, rows in prompt.media_rows.items())
    return f"{sum(prompt.media_rows.values())} of them media ({parts})"


def _at_rate(audio: Audio, rate: int) -> Any:
    """The clip's samples at `rate` (chat audio arrives at the file's own rate)."""
    if audio.sample_rate == rate:
        return audio.samples
    import soxr

    return soxr.resample(audio.samples, audio.sample_rate, rate, quality="HQ")


__all__ = ["SPEECH_SYSTEM_PROMPT", "Qwen3Omni", "Qwen3OmniRequest"]
