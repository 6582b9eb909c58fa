"""TestVLA: the model contract of the test plugin (declarations and host-side functions).

Walks (partition "lm" unless noted):
- `encode`: the vision encoder; its `image_features` stay on the worker (a result handle).
- `prefill` (text), `prefill_act`, `prefill_rollout`: the prompt through the LLM. Text
  samples the first token; act only fills the KV cache; rollout predicts the frame after
  the prompt's initial frame.
- `decode`: one token per iteration until the sampler says `finished`.
- `denoise`: noise, then `num_steps` Euler steps; each step runs the LLM on a *scratch*
  chunk of ACT placeholders over the cached prompt, beside an unconditional CFG branch
  (label "uncond", a fork of the prompt's first `uncond_length` tokens, its ACT positions
  right after that shorter context: its own `prepare`) unless the guidance scale is 1 or
  the step's flow time is outside `cfg_interval`, then `combine`. Mode "image" runs it once
  per image (children: each its own noise); `postprocess` paints each denoised chunk as a
  PNG `Image` (`painter.paint`).
- `rollout`: each iteration appends the previous predicted frame and predicts the next.
- `prefill_plan`, `plan` (mode "plan", the shape of CEM planning): the prompt with its
  initial frame is prefilled once under its own KV label "ctx" (the `LLM_ctx` branch),
  predicting frame 1. `plan` runs `plan_samples` children, each a fork of "ctx" into its own
  "main" sequence: `cem_sample` draws its actions [plan_horizon, frame_dim] (mean + std ·
  keyed noise), then a rollout appends frame k + 1 = the frame before it + action k and
  predicts the next, `plan_horizon` times. The walk's `Join` runs `cem_refit` once per
  round over every candidate's actions and last predicted frame (L1 distance to `goal`,
  top `plan_topk`, refit of mean and std, each round's best `score` emitted), then re-forks
  the children from "ctx" with the new mean and std, `plan_iters` rounds; the final mean
  comes back as the tensor "plan".
- `stream` (partition "stream"): the consumer decodes windows of (token, mid-layer hidden)
  units streamed from the LLM. It is testvla's voice: a speech request (`input`) and a chat
  asking for spoken output (`modalities` with "audio") run it, so the text's tokens come
  back as `TextDelta`s (the transcript) and the consumer's `wave` as `AudioChunk`s.

Transcription (`process_transcription`): testvla has no audio encoder, so it "hears" an
audio clip as a picture: its log-magnitude spectrogram (`spectrogram`, at
`audio_input_rate()`, 16 kHz) resized to a `chat_image_size` square, read by the vision
encoder in a text prompt like a chat's image. The transcript is whatever the tiny LLM
writes about it: a real plumbing test, not a speech recogniser.

Each walk starts from a fresh environment (the request's params plus the `WalkStep`'s
inputs), so `next_walk` hands on what the next walk needs: the image features' handle, the
first sampled token, the predicted frame.

Per-invocation values a KV node reads (produced by a node's `prepare` rule or carried, and
read only when the GraphNode lists them in `inputs`): `input_ids` [n] (required),
`positions` ([n] or [3, n]; default: the sequence's next position + arange on every axis),
`segments` (list of `(length, "causal" | "bidirectional")`; default one causal segment),
`chunk_mode` ("append" default, or "scratch"), and the extras of `kv_spec("LLM")` by name.
A listed input absent from the environment counts as not supplied (extras get their
defaults; a stateless item lacks the key: `velocity_uncond` when the CFG branch is skipped).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from mstar.errors import RequestError
from mstar.events import (
    AudioChunk,
    Event,
    Image,
    NamedTensor,
    TensorData,
)
from mstar.graph import (
    ChunkPolicy,
    GraphNode,
    Join,
    Loop,
    Parallel,
    Partition,
    Sequential,
    StreamingGraphEdge,
    Walk,
)
from mstar.model import (
    BuildContext,
    Done,
    ExtraSpec,
    Fork,
    ImageInput,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    SamplingFields,
    TensorInput,
    WalkStep,
    text_delta,
    validate_request,
)
from mstar.weights import WeightSpec

if TYPE_CHECKING:
    from PIL.Image import Image

    from mstar.chat import ChatPrompt
    from mstar.media import Audio
from mstar_testvla.config import PRESETS, TestVLAConfig
from mstar_testvla.modules import (
    ActionInit,
    CEMRefit,
    CEMSample,
    Combine,
    Consumer,
    TestVLALLM,
    VisionEncoder,
)
from mstar_testvla.painter import IMAGE_SIZES, MAX_IMAGES, paint, size_error
from mstar_testvla.tokenizer import (
    ACT,
    BOS,
    EOS,
    FRAME,
    IMAGE_MARKER,
    IMG,
    ByteTokenizer,
)

PROMPT_INPUTS = ("input_ids", "positions", "segments", "expert_ids", "media_embeds",
                 "frame_embeds")
PREFILL_WALKS = {"text": "prefill", "act": "prefill_act", "rollout": "prefill_rollout",
                 "image": "prefill_act", "plan": "prefill_plan"}
STREAM_POLICY = ChunkPolicy(window=4, hop=1, emit=(1, 2), max_buffered=16)
#: "role: text" lines, `<image>` where an image part was, then "assistant:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: "
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type == 'image' %}" + IMAGE_MARKER + "{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


# ------------------------------------------------------------------------------------------
# Request schema


class TestVLARequest(SamplingFields):
    """The model-specific fields of `POST /generate` for testvla."""

    __test__: ClassVar[bool] = False
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(None, description=f"Text; may contain one {IMAGE_MARKER} "
                                                 "marker. Required unless `input` is given.")
    input: str | None = Field(None, description="Speech (capability 'speech'): the text to "
                                                "speak, run as a text prompt whose consumer "
                                                "streams the audio.")
    voice: Literal["alloy", "echo"] | None = Field(
        None, description="Speech and spoken chat replies: the voice (names only: the tiny "
                          "consumer has one sound); None: 'alloy'.")
    modalities: list[Literal["text", "audio"]] | None = Field(
        None, description="Chat: [\"text\", \"audio\"] speaks the reply (the consumer "
                          "streams its audio, as for `input`).")
    image: list[list[list[float]]] | ImageInput | None = Field(
        None, description="Pixels as nested lists [3][H][W] (H and W multiples of the "
                          "patch size), or an image (resized to `chat_image_size` square).")
    cameras: dict[str, ImageInput] | list[ImageInput] | None = Field(
        None, description="Camera images by name (in the order given) or as a list, instead of "
                          "`image`: each resized to `chat_image_size` square, side by side.")
    mode: Literal["text", "act", "rollout", "image", "plan"] = "text"
    width: int | None = Field(None, description="Image width (mode image); with height, one "
                                                "of the sizes " + ", ".join(
                                                    f"{w}x{h}" for w, h in IMAGE_SIZES)
                              + "; None: the first.")
    height: int | None = Field(None, description="Image height (mode image).")
    num_steps: int = Field(10, ge=1, le=1000, description="Denoising steps (act, image).")
    guidance_scale: float = Field(1.0, ge=1.0, le=100.0, description="CFG scale (act, image).")
    cfg_interval: list[float] = Field(
        [0.0, 1.0], min_length=2, max_length=2,
        description="CFG only at the steps whose flow time t (1 at the first step, falling "
                    "by 1/num_steps) has lo < t <= hi (act, image).")
    num_frames: int = Field(1, ge=1, le=64, description="Frames to predict (rollout).")
    frame: list[list[float]] | TensorInput | None = Field(
        None, description="The initial frame [frame_tokens][frame_dim] (rollout, plan), as "
                          "nested lists or a tensor.")
    goal: list[list[float]] | None = Field(
        None, description="The goal frame [frame_tokens][frame_dim] (plan).")
    plan_samples: int = Field(8, ge=1, le=4096, description="CEM candidates per round (plan).")
    plan_topk: int = Field(2, ge=1, description="Candidates the refit keeps (plan).")
    plan_iters: int = Field(3, ge=1, le=64, description="CEM rounds (plan).")
    plan_horizon: int = Field(2, ge=1, le=16, description="Frames each candidate rolls out "
                                                          "(plan).")
    plan_std: float = Field(1.0, gt=0.0, description="The actions' initial std (plan).")
    stream_consumer: bool = Field(False, description="Also stream the consumer (text).")
    consumer_delay_s: float = Field(
        0.0, ge=0.0, le=10.0, description="Test instrumentation: the consumer sleeps this "
                                          "long per call (backpressure tests).")

    @model_validator(mode="after")
    def _consistent(self) -> TestVLARequest:
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give exactly one of prompt and input (speech)")
        if self.input is not None:  # speech: the text is the prompt, the consumer speaks
            self.prompt, self.stream_consumer = self.input, True
        if "audio" in (self.modalities or ()):  # a spoken reply: the consumer speaks
            if self.n != 1:
                raise ValueError("n: a spoken reply is one completion (the consumer speaks "
                                 "completion 0 only)")
            self.stream_consumer = True
        if self.cameras is not None and (self.image is not None or not self.cameras):
            raise ValueError("cameras: give one or more images, and no `image` beside them")
        if isinstance(self.image, list):
            if len(self.image) != 3:
                raise ValueError(f"image must have 3 channels, got {len(self.image)}")
            rows = {len(ch) for ch in self.image}
            cols = {len(row) for ch in self.image for row in ch}
            if len(rows) != 1 or len(cols) != 1 or 0 in rows | cols:
                raise ValueError("image must be a non-empty rectangular [3][H][W] array")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must have 0 <= lo <= hi <= 1, got {[lo, hi]}")
        if (self.mode in ("rollout", "plan")) != (self.frame is not None):
            raise ValueError("frame is required in rollout and plan modes and only there")
        if (self.mode == "plan") != (self.goal is not None):
            raise ValueError("goal is required in plan mode and only there")
        if self.plan_topk > self.plan_samples:
            raise ValueError(f"plan_topk ({self.plan_topk}) must not exceed plan_samples "
                             f"({self.plan_samples})")
        if self.mode not in ("text", "image") and self.n != 1 or (
                self.mode != "text" and self.stream_consumer):
            raise ValueError("n > 1 needs mode 'text' or 'image'; stream_consumer mode 'text'")
        if self.mode != "image" and (self.width, self.height) != (None, None):
            raise ValueError("width and height need mode 'image'")
        return self


def _validated(request: Mapping[str, Any]) -> TestVLARequest:
    return validate_request(TestVLARequest, request, "testvla")


# ------------------------------------------------------------------------------------------
# Prompt layout and positions


@dataclass(frozen=True)
class PromptLayout:
    """The prompt's parts: [BOS + text before the image] [image patches] [text after]
    [initial frame (rollout)]. Stored in the request's params as a plain dict.

    3-axis positions (t, h, w), Qwen2-VL style: a text token at p is (p, p, p); an image of
    grid gh×gw starting at p puts patch (r, c) at (p, p + r, p + c) and the next token at
    p + max(gh, gw). Frame k (0: the prompt's initial frame) after text ending at P puts
    token (r, c) at (P + k, P + r, P + c)."""

    n_before: int
    grid: tuple[int, int] | None
    n_after: int
    frame_grid: tuple[int, int] | None

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1] if self.grid else 0

    @property
    def n_frame(self) -> int:
        return self.frame_grid[0] * self.frame_grid[1] if self.frame_grid else 0

    @property
    def length(self) -> int:
        return self.n_before + self.n_image + self.n_after + self.n_frame

    @property
    def uncond_length(self) -> int:
        """The CFG-unconditional context: everything before the text after the image."""
        return self.n_before + self.n_image

    @property
    def uncond_end(self) -> int:
        """Next position after the CFG-unconditional context (its actions go there)."""
        return self.n_before + (max(self.grid) if self.grid else 0)

    @property
    def text_end(self) -> int:
        """Next position after the text (decode's first position; actions and frames)."""
        return self.n_before + (max(self.grid) if self.grid else 0) + self.n_after

    def segments(self) -> list[tuple[int, str]]:
        parts = [(self.n_before, "causal"), (self.n_image, "bidirectional"),
                 (self.n_after, "causal"), (self.n_frame, "bidirectional")]
        return [(n, kind) for n, kind in parts if n]

    def positions(self) -> torch.Tensor:
        """[3, length] positions of the whole prompt."""
        parts = [_text_positions(0, self.n_before)]
        if self.grid:
            parts.append(_grid_positions(self.n_before, self.n_before, self.grid))
        after = self.n_before + (max(self.grid) if self.grid else 0)
        parts.append(_text_positions(after, self.n_after))
        if self.frame_grid:
            parts.append(frame_positions(self.text_end, 0, self.frame_grid))
        return torch.cat(parts, dim=1)

    def to_params(self) -> dict[str, Any]:
        return {"n_before": self.n_before, "grid": list(self.grid) if self.grid else None,
                "n_after": self.n_after,
                "frame_grid": list(self.frame_grid) if self.frame_grid else None}

    @classmethod
    def from_params(cls, d: Mapping[str, Any]) -> PromptLayout:
        return cls(d["n_before"], tuple(d["grid"]) if d["grid"] else None, d["n_after"],
                   tuple(d["frame_grid"]) if d["frame_grid"] else None)


def _text_positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.long).expand(3, n)


def _grid_positions(t: int, base: int, grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.long).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.long).repeat(gh)
    return torch.stack([torch.full_like(rows, t), base + rows, base + cols])


def frame_positions(text_end: int, k: int, frame_grid: tuple[int, int]) -> torch.Tensor:
    """[3, frame_tokens] positions of frame `k` (see `PromptLayout`)."""
    return _grid_positions(text_end + k, text_end, frame_grid)


# ------------------------------------------------------------------------------------------
# The model


class TestVLA(Model):
    """The test vision-language-action model (see the module docstring)."""

    __test__ = False
    config_class = TestVLAConfig
    presets = PRESETS
    config: TestVLAConfig

    # -- declarations ----------------------------------------------------------------------
    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"vision_encoder": "stateless", "LLM": "kv_cache", "action_init": "stateless",
                "combine": "stateless", "cem_sample": "stateless", "cem_refit": "stateless",
                "consumer": "stateless"}

    def tp_nodes(self) -> set[str]:
        return {"LLM"}

    def cacheable_nodes(self) -> set[str]:
        return {"vision_encoder"}

    def partitions(self) -> list[Partition]:
        return [Partition("lm", ("vision_encoder", "LLM", "action_init", "combine",
                                 "cem_sample", "cem_refit")),
                Partition("stream", ("consumer",))]

    def streaming_edges(self) -> list[StreamingGraphEdge]:
        return [StreamingGraphEdge(src="LLM", dst="consumer",
                                   tensors={"token_ids": "codes", "mid_hidden": "hidden"},
                                   policy=STREAM_POLICY)]

    def kv_spec(self, node: str) -> KVSpec:
        if node != "LLM":
            raise ValueError(f"testvla node {node!r} has no KV cache (only 'LLM' has)")
        c = self.config
        return KVSpec(
            num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
            num_heads=c.num_attention_heads,
            head_dim=c.head_dim, labels=("main", "uncond", "ctx"), position_axes=3,
            extras=(ExtraSpec("expert_ids", "token", (), torch.long, 0),
                    ExtraSpec("media_embeds", "token", (c.expert_hidden,)),
                    ExtraSpec("x_t", "token", (c.action_dim,)),
                    ExtraSpec("t", "seq", ()),
                    ExtraSpec("frame_embeds", "token", (c.frame_dim,))),
            outputs={"logits": "last", "mid_hidden": "last", "velocity": "all",
                     "frame_pred": "segment:-1"},
        )

    def graph_walks(self) -> dict[str, Walk]:
        prompt = dict(inputs=PROMPT_INPUTS, prepare=self._prompt_inputs)
        text_control = ("token_ids", "finished", "finish_reason")
        llm_act = dict(inputs=("input_ids", "positions", "segments", "chunk_mode",
                               "expert_ids", "x_t", "t"),
                       outputs=("velocity",))
        step = Sequential(
            Parallel(GraphNode("LLM", prepare=self._action_inputs, **llm_act),
                     GraphNode("LLM_uncond", alias_of="LLM", label="uncond",
                               rename={"velocity": "velocity_uncond"},
                               skip=_cfg_off, prepare=self._uncond_action_inputs,
                               **llm_act)),
            GraphNode("combine", inputs=("x_t", "t", "velocity", "velocity_uncond",
                                         "guidance_scale", "num_steps"),
                      outputs=("x_t", "t")))
        return {
            "encode": Walk(GraphNode("vision_encoder", inputs=("pixel_values",),
                                     outputs=("image_features",)),
                           results=("image_features",)),
            "prefill": Walk(GraphNode("LLM", outputs=("token_ids", "mid_hidden"),
                                      emit=("token_ids",), **prompt),
                            control=text_control),
            "prefill_act": Walk(GraphNode("LLM", **prompt)),
            "prefill_rollout": Walk(GraphNode("LLM", outputs=("frame_pred",),
                                              emit=("frame_pred",), **prompt),
                                    results=("frame_pred",)),
            "decode": Walk(Loop(GraphNode("LLM", inputs=("input_ids", "positions"),
                                          outputs=("token_ids", "mid_hidden"),
                                          emit=("token_ids",), prepare=self._decode_inputs),
                                until="finished", carry={"token_ids": "input_ids"}),
                           control=("finish_reason",)),
            "denoise": Walk(Sequential(GraphNode("action_init", outputs=("x_t", "t")),
                                       Loop(step, times="num_steps", carry=["x_t", "t"])),
                            emit=("x_t",)),
            "rollout": Walk(Loop(GraphNode("LLM", inputs=("input_ids", "positions",
                                                          "segments", "frame_embeds"),
                                           outputs=("frame_pred",), emit=("frame_pred",),
                                           prepare=self._frame_inputs),
                                 times="rollout_steps", carry={"frame_pred": "frame_embeds"})),
            "prefill_plan": Walk(GraphNode("LLM_ctx", alias_of="LLM", label="ctx",
                                           outputs=("frame_pred",), **prompt),
                                 results=("frame_pred",)),
            "plan": Walk(
                Sequential(GraphNode("cem_sample", inputs=("mean", "std"), outputs=("actions",)),
                           Loop(GraphNode("LLM", inputs=("input_ids", "positions", "segments",
                                                         "frame_embeds"),
                                          outputs=("frame_pred",),
                                          prepare=self._plan_frame_inputs),
                                times="plan_horizon", carry={"frame_pred": "frame_embeds"})),
                join=Join(GraphNode("cem_refit", inputs=("actions", "frame_pred", "goal",
                                                         "plan_topk"),
                                    outputs=("mean", "std", "score"), emit=("score",)),
                          stack=("actions", "frame_pred"), feed=("mean", "std"),
                          times="plan_iters"),
                emit=("mean",)),
            "stream": Walk(Loop(GraphNode("consumer",
                                          inputs=("codes", "hidden", "consumer_delay_s"),
                                          outputs=("wave",), emit=("wave",)),
                                until="stream_ended")),
        }

    # -- prepare rules (per invocation, from the request's environment) --------------------
    def _prompt_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """The whole prompt: ids, 3-axis positions, segments, expert routing and the dense
        media/frame rows at their placeholders."""
        layout = PromptLayout.from_params(env["layout"])
        ids = torch.tensor(env["prompt_ids"], dtype=torch.long)
        n, c = ids.shape[0], self.config
        is_img, is_frame = ids == IMG, ids == FRAME
        media = torch.zeros(n, c.expert_hidden)
        if layout.n_image:
            feats = env["image_features"]
            media = media.to(device=feats.device, dtype=feats.dtype)
            media[is_img.to(feats.device)] = feats
        frames = torch.zeros(n, c.frame_dim)
        if layout.n_frame:
            frames[is_frame] = torch.tensor(env["frame"], dtype=torch.float32)
        return {"input_ids": ids, "positions": layout.positions(),
                "segments": layout.segments(), "expert_ids": is_img.long(),
                "media_embeds": media, "frame_embeds": frames}

    def _decode_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Explicit positions: with image positions compressed, the next position is not
        the sequence length. Completions 1..n-1 are forks of the prompt without its last
        token: their first step re-reads that token and samples their own first token."""
        step = iteration or 0  # an int position: text advances every axis together
        if env.get("child", 0) == 0:
            return {"positions": env["text_end"] + step}
        if step == 0:
            return {"input_ids": torch.tensor(env["prompt_ids"][-1:], dtype=torch.long),
                    "positions": env["text_end"] - 1}
        return {"positions": env["text_end"] + step - 1}

    def _action_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """ACT placeholders after the text, one bidirectional scratch segment."""
        return self._actions_at(env["text_end"])

    def _uncond_action_inputs(self, env: Mapping[str, Any],
                              iteration: int | None) -> dict[str, Any]:
        """The unconditional branch's ACT placeholders: after its own, shorter context
        (prepare results are local to the branch, so the conditional one keeps its own)."""
        return self._actions_at(env["uncond_end"])

    def _actions_at(self, start: int) -> dict[str, Any]:
        h = self.config.action_horizon
        return {"input_ids": torch.full((h,), ACT, dtype=torch.long),
                "positions": _text_positions(start, h),
                "segments": [(h, "bidirectional")], "chunk_mode": "scratch",
                "expert_ids": torch.ones(h, dtype=torch.long)}

    def _frame_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Frame `iteration + 1`: FRAME placeholders as one bidirectional segment."""
        layout = PromptLayout.from_params(env["layout"])
        assert layout.frame_grid is not None
        n = layout.n_frame
        return {"input_ids": torch.full((n,), FRAME, dtype=torch.long),
                "positions": frame_positions(env["text_end"], (iteration or 0) + 1,
                                             layout.frame_grid),
                "segments": [(n, "bidirectional")]}

    def _plan_frame_inputs(self, env: Mapping[str, Any],
                           iteration: int | None) -> dict[str, Any]:
        """A candidate's frame `iteration + 1`: the frame before it plus its action."""
        step = iteration or 0
        return {**self._frame_inputs(env, iteration),
                "frame_embeds": env["frame_embeds"] + env["actions"][step]}

    # -- modules and weights ---------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        c = self.config
        builders = {
            "vision_encoder": lambda: VisionEncoder(c),
            "LLM": lambda: TestVLALLM(c, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                                      tp_group=ctx.tp_group),
            "action_init": lambda: ActionInit(c),
            "combine": lambda: Combine(),
            "cem_sample": lambda: CEMSample(),
            "cem_refit": lambda: CEMRefit(),
            "consumer": lambda: Consumer(c),
        }
        if node not in builders:
            raise ValueError(f"unknown testvla node {node!r}; nodes: {sorted(builders)}")
        return builders[node]().eval()

    def weight_spec(self, node: str) -> WeightSpec:
        """One checkpoint for every node; each node maps its own keys, ignores the rest."""
        rules: dict[str, tuple[tuple[str, str | None], ...]] = {
            "LLM": ((r"(vision_model|connector|consumer)\..*", None),),
            "vision_encoder": ((r"vision_model\.(.*)", r"\1"),
                               (r"(connector\..*)", r"\1"), (r".*", None)),
            "consumer": ((r"consumer\.(.*)", r"\1"), (r".*", None)),
            "action_init": ((r".*", None),),
            "combine": ((r".*", None),),
            "cem_sample": ((r".*", None),),
            "cem_refit": ((r".*", None),),
        }
        if node not in rules:
            raise ValueError(f"unknown testvla node {node!r}; nodes: {sorted(rules)}")
        return WeightSpec(key_map=rules[node])

    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer()

    def chat_template(self) -> str:
        return CHAT_TEMPLATE

    # -- host side -------------------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = _validated(request)
        if req.cameras is not None:
            images = req.cameras.values() if isinstance(req.cameras, dict) else req.cameras
            return self._plan(req, torch.cat([self._pixels(i) for i in images], dim=2))
        if req.image is None or isinstance(req.image, list):
            pixels = None if req.image is None else torch.tensor(req.image, dtype=torch.float32)
        else:
            pixels = self._pixels(req.image)
        return self._plan(req, pixels)

    def process_chat(self, prompt: ChatPrompt, request: Mapping[str, Any]) -> RequestPlan:
        """A chat: the rendered text (the template wrote an `<image>` marker for the image)
        and at most one image, resized to `chat_image_size` square, RGB in [0, 1]."""
        if prompt.audios or prompt.videos:
            raise ValueError("testvla takes text and one image; no audio or video")
        if len(prompt.images) > 1:
            raise ValueError(f"testvla takes at most one image per chat, got "
                             f"{len(prompt.images)}")
        req = _validated({**request, "prompt": prompt.text})
        return self._plan(req, self._pixels(prompt.images[0]) if prompt.images else None)

    def audio_input_rate(self) -> int:
        return self.config.sample_rate

    def process_transcription(self, audio: Audio, request: Mapping[str, Any]) -> RequestPlan:
        """A text prompt over the audio's spectrogram picture (see the module docstring);
        `language` and `prompt` join the prompt's text."""
        fields = dict(request)
        language, hint = fields.pop("language", None), fields.pop("prompt", None)
        text = (f"transcribe{' ' + language if language else ''}: {hint or ''}"
                f"{IMAGE_MARKER}\nassistant:")
        req = _validated({**fields, "prompt": text})
        return self._plan(req, spectrogram(audio, self.config.chat_image_size))

    def _pixels(self, image: Image) -> torch.Tensor:
        """An image as [3, size, size] RGB in [0, 1], resized to `chat_image_size`."""
        size = self.config.chat_image_size
        image = image.convert("RGB").resize((size, size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0

    def _plan(self, req: TestVLARequest, pixels: torch.Tensor | None) -> RequestPlan:
        c = self.config
        if req.prompt.count(IMAGE_MARKER) > 1:
            raise ValueError(f"prompt may contain at most one {IMAGE_MARKER} marker")
        if IMAGE_MARKER in req.prompt and pixels is None:
            raise ValueError(f"prompt has an {IMAGE_MARKER} marker but no image was given")
        sampling = req.sampling_params(eos_token_ids=[EOS])
        if any(not 0 <= i < c.vocab_size for i in sampling.stop_token_ids):
            raise ValueError(f"stop_token_ids: ids must be in [0, {c.vocab_size})")
        before, _, after = req.prompt.rpartition(IMAGE_MARKER)
        grid = None
        if pixels is not None:
            h, w = pixels.shape[1:]
            if h % c.patch_size or w % c.patch_size:
                raise ValueError(f"image: height and width must be multiples of the patch "
                                 f"size {c.patch_size}, got {h}x{w}")
            grid = (h // c.patch_size, w // c.patch_size)
        frame_grid = None
        frame = req.frame
        if frame is not None:
            if isinstance(frame, torch.Tensor):
                shape, frame = tuple(frame.shape), frame.float().tolist()
            else:
                shape = (len(frame), *{len(row) for row in frame})
            if shape != (c.frame_tokens, c.frame_dim):
                raise ValueError(f"frame: must be [{c.frame_tokens}][{c.frame_dim}], got "
                                 f"{list(shape)}")
            frame_grid = c.frame_grid
        tok = ByteTokenizer()
        if req.mode == "text" and grid is not None and not after:
            raise ValueError("prompt: in text mode the image must be followed by text (the "
                             "next token is predicted from a text token)")
        layout = PromptLayout(1 + len(tok.encode(before)), grid, len(tok.encode(after)),
                              frame_grid)
        ids = ([BOS] + tok.encode(before) + [IMG] * layout.n_image + tok.encode(after)
               + [FRAME] * layout.n_frame)
        params = {
            "mode": req.mode, "max_tokens": req.max_tokens, "n": req.n,
            "num_steps": req.num_steps, "guidance_scale": req.guidance_scale,
            "cfg_interval": req.cfg_interval, "uncond_end": layout.uncond_end,
            "num_frames": req.num_frames, "rollout_steps": req.num_frames - 1,
            "uncond_length": layout.uncond_length, "consumer_delay_s": req.consumer_delay_s,
            "prompt_ids": ids, "layout": layout.to_params(), "text_end": layout.text_end,
            "frame": frame,
        }
        if req.mode == "plan":
            if len(req.goal) != c.frame_tokens or {len(r) for r in req.goal} != {c.frame_dim}:
                raise RequestError(f"goal: must be [{c.frame_tokens}][{c.frame_dim}]",
                                   param="goal")
            shape = (req.plan_horizon, c.frame_dim)
            params.update({"goal": req.goal, "plan_samples": req.plan_samples,
                           "plan_topk": req.plan_topk, "plan_iters": req.plan_iters,
                           "plan_horizon": req.plan_horizon,
                           "mean": torch.zeros(shape).tolist(),
                           "std": torch.full(shape, req.plan_std).tolist()})
        if req.mode == "image":
            params.update(_image_params(req))
        prefill = WalkStep(PREFILL_WALKS[req.mode])
        first = {"lm": WalkStep("encode", inputs={"pixel_values": pixels})
                 if pixels is not None else prefill}
        if req.stream_consumer:
            first["stream"] = WalkStep("stream")
        return RequestPlan(first_walks=first, params=params, sampling={"default": sampling},
                           seed=req.seed, prompt_tokens=len(ids))

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        p = state.params
        if state.partition == "stream":
            return Done("stop")
        if state.walk == "encode":
            return WalkStep(PREFILL_WALKS[p["mode"]],
                            inputs={"image_features": control["image_features"]})
        if state.walk == "prefill":
            if control.get("finished"):
                return Done(control.get("finish_reason") or "stop")
            n = int(p["n"])
            prompt_len = len(p["prompt_ids"])
            return WalkStep("decode", inputs={"input_ids": control["token_ids"]}, children=n,
                            forks=[Fork("LLM", length=prompt_len - 1, child=c)
                                   for c in range(1, n)])
        if state.walk == "prefill_act":
            n = int(p["n"])  # images (mode image): one denoise each, forks of the prompt
            forks = [Fork("LLM", child=c) for c in range(1, n)]
            if p["guidance_scale"] != 1:
                forks += [Fork("LLM", length=p["uncond_length"], label="uncond", child=c)
                          for c in range(n)]
            return WalkStep("denoise", forks=forks, children=n)
        if state.walk == "prefill_plan":  # the candidates: forks of the kept context
            n = int(p["plan_samples"])
            return WalkStep("plan", inputs={"frame_embeds": control["frame_pred"]},
                            children=n, forks=[Fork("LLM", child=c, src_label="ctx")
                                               for c in range(n)])
        if state.walk == "prefill_rollout":
            if p["rollout_steps"] == 0:
                return Done("stop")
            return WalkStep("rollout", inputs={"frame_embeds": control["frame_pred"]})
        if state.walk == "decode":
            return Done(control.get("finish_reason") or "stop")
        if state.walk in ("denoise", "rollout", "plan"):
            return Done("stop")
        raise ValueError(f"testvla has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        """Client events of one emission of one lane (`state.child` is the completion)."""
        index = state.child
        if "x_t" in outputs and state.params.get("mode") == "image":
            p = state.params
            return [Image(paint(outputs["x_t"], p["width"], p["height"]), index=index)]
        out: list[Event] = []
        if "token_ids" in outputs:
            out.append(text_delta(outputs, state))
        if "wave" in outputs:
            wave = torch.as_tensor(outputs["wave"]).float().reshape(-1)
            out.append(AudioChunk(samples=TensorData.from_tensor(wave),
                                  sample_rate=self.config.sample_rate, index=index))
        for name, event_name in (("x_t", "actions"), ("frame_pred", "frame"),
                                 ("mean", "plan"), ("score", "score")):
            if name in outputs:
                tensor = TensorData.from_tensor(torch.as_tensor(outputs[name]).float())
                out.append(NamedTensor(event_name, tensor, index=index))
        return out


def spectrogram(audio: Audio, size: int) -> torch.Tensor:
    """[3, size, size] in [0, 1]: log(1 + |STFT|) with `size` frequency bins (a Hann window
    of 2·(size-1) samples, half overlapping), its frames linearly resized to `size`
    columns and scaled by its maximum, on every channel."""
    n_fft = 2 * (size - 1)
    samples = torch.from_numpy(audio.samples).float()
    if samples.numel() < n_fft:
        samples = torch.nn.functional.pad(samples, (0, n_fft - samples.numel()))
    stft = torch.stft(samples, n_fft, hop_length=n_fft // 2, window=torch.hann_window(n_fft),
                      center=False, return_complex=True)
    picture = torch.nn.functional.interpolate(torch.log1p(stft.abs())[None], size=size,
                                              mode="linear", align_corners=False)[0]
    return (picture / picture.max().clamp_min(1e-6)).expand(3, size, size).contiguous()


def _image_params(req: TestVLARequest) -> dict[str, int]:
    """The size of mode "image"'s pictures; an unsupported size or too many images is a
    `RequestError` naming the field (the sizes listed)."""
    problem = size_error(req.width, req.height)
    if problem is not None:
        raise RequestError(problem, param="width" if req.width not in
                           {w for w, _ in IMAGE_SIZES} else "height")
    if req.n > MAX_IMAGES:
        raise RequestError(f"n={req.n}: testvla paints at most {MAX_IMAGES} images per "
                           "request", param="n")
    width, height = IMAGE_SIZES[0] if req.width is None else (req.width, req.height)
    return {"width": width, "height": height}


def _cfg_off(env: Mapping[str, Any], iteration: int | None) -> bool:
    """No unconditional branch at guidance scale 1, nor at a step whose flow time is outside
    `cfg_interval` (the skipped branch's `velocity_uncond` is then absent for `combine`)."""
    lo, hi = env["cfg_interval"]
    t = 1.0 - (iteration or 0) / int(env["num_steps"])
    return float(env["guidance_scale"]) == 1.0 or not lo < t <= hi
