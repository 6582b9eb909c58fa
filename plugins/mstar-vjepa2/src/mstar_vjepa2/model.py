"""V-JEPA 2 and V-JEPA 2-AC: the model contract and its host-side functions.

`VJepa2` (hub checkpoints, `facebook/vjepa2-*`), one partition:
- `encode`: the clip (preprocessed as `VJEPA2VideoProcessor` does) through `video_encoder`
  in one ragged pass; `emit=("latents",)` [T/tubelet · (crop/p)², hidden].
- `predict`: the same, then the masked `predictor` from the context tokens to the target
  tokens (token indices into the clip's patch grid, chosen by `target_frames` or by a
  seeded mask ratio on the host); `emit=("predictions",)` [Nt, hidden].

`VJepa2AC` (the authors' `vjepa2-ac-vitg.pt`): frame t of the predictor's sequence is the
chunk [action_t, state_t, patches_t] (`ac_predictor.frame_inputs`), one bidirectional
segment appended to the `ac_predictor` KV cache, so attention is block-causal over frames
and earlier frames are never recomputed. Each context frame is encoded alone (a 2-frame
tubelet of that frame) and layer-normed, as the authors' `WorldModel.encode`.
- `encode`: a `Loop` over the frames, each frame's latents emitted.
- `rollout`: context frames 0..T-2 encoded and appended, the last context frame encoded,
  then `Loop(ac_predictor, times="rollout_steps")`: step k appends frame T-1+k (the last
  context frame, then the previous prediction, layer-normed) with action T-1+k and its
  pose; each step's prediction is emitted as it is computed (a row of `rollout`) with the
  predicted frame's pose (`poses`).
- `plan_context` then `plan` (MPC by the cross-entropy method, as the authors' `cem`):
  every context frame is appended under the KV label `ctx` and the goal encoded. `plan`
  runs `samples` children, each forking `ctx` up to the last context frame (that frame's
  K/V depend on its action, the candidate's own), drawing its trajectory (`cem_sample`)
  and rolling it out `horizon` steps; the `Join` runs `cem_score` once over every child's
  final latents (L1 to the goal's, top-k, momentum refit), feeds the new mean and std
  back and re-forks the children, `iterations` rounds; the plan is the final mean
  [horizon, 7].

Actions and poses are 7-D end-effector deltas and poses (xyz, euler xyz, gripper), as the
authors' DROID checkpoint. A pose depends only on the last context pose and the actions:
a rollout's are integrated on the host when the request arrives, a candidate's in its
prepare rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mstar.errors import RequestError
from mstar.events import Event, NamedTensor, TensorData
from mstar.graph import GraphNode, Join, Loop, Sequential, Walk
from mstar.media import Video
from mstar.model import (
    BuildContext,
    Done,
    Fork,
    ImageInput,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    StepContext,
    TensorInput,
    VideoInput,
    WalkStep,
    validate_request,
)
from mstar.weights import WeightSpec
from mstar_vjepa2 import ac_predictor as acp
from mstar_vjepa2.cem import CEMScore, initial_distribution, sample_actions
from mstar_vjepa2.config import PRESETS, VJepa2Config, from_hub
from mstar_vjepa2.encoder import WEIGHT_KEY_MAPS as ENCODER_KEYS
from mstar_vjepa2.encoder import VideoEncoder
from mstar_vjepa2.pose import compute_new_pose
from mstar_vjepa2.predictor import WEIGHT_KEY_MAPS as PREDICTOR_KEYS
from mstar_vjepa2.predictor import MaskedPredictor
from mstar_vjepa2.processing import preprocess_video

ACTION_DIM = 7
#: The authors' planner (notebooks/utils/world_model_wrapper.py `mpc_args`).
PLAN_DEFAULTS = {"horizon": 2, "samples": 400, "topk": 10, "iterations": 10,
                 "momentum_mean": 0.15, "momentum_std": 0.15, "maxnorm": 0.05}
#: Caps a request may not pass (400 naming the cap): they admit the defaults with room.
MAX_SAMPLES, MAX_ITERATIONS, MAX_HORIZON, MAX_ROLLOUT_STEPS = 1024, 100, 16, 64


# -- requests ----------------------------------------------------------------------------

class _VideoRequest(BaseModel):
    """What both models take: a clip, as a video or as frames."""

    model_config = ConfigDict(extra="ignore")

    video: VideoInput | None = Field(
        None, description="The clip: an upload, an http(s) URL or a data URL.")
    frames: TensorInput | None = Field(
        None, description="The clip as frames instead: [T, H, W, 3] uint8 or [T, 3, H, W] "
                          "float in [0, 1].")


class VJepa2Request(_VideoRequest):
    """`POST /generate` for `vjepa2`: a clip in; `outputs["latents"]` (mode "encode") or
    `outputs["predictions"]` of the masked tokens (mode "predict")."""

    mode: Literal["encode", "predict"] = "encode"
    target_frames: list[int] | None = Field(
        None, description="predict: the latent time steps (each tubelet_size frames) whose "
                          "tokens are predicted from all the others.")
    mask_ratio: float | None = Field(
        None, gt=0, lt=1, description="predict: the share of tokens masked at random "
                                      "(seeded by `seed`) when `target_frames` is not given.")
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="The random mask's seed.")


class VJepa2ACRequest(_VideoRequest):
    """`POST /generate` for `vjepa2_ac`: the context clip in; `latents` (encode), each
    rollout step's `rollout` latents and `poses` (rollout), or the planned `actions`
    [horizon, 7] and `plan_scores` (plan)."""

    mode: Literal["encode", "rollout", "plan"] = "encode"
    states: list[list[float]] | TensorInput | None = Field(
        None, description="rollout, plan: the end-effector pose at each context frame "
                          "[T, 7].")
    pose: list[float] | TensorInput | None = Field(
        None, description="The pose at the last context frame [7] (instead of `states` "
                          "for a one-frame context).")
    actions: list[list[float]] | TensorInput | None = Field(
        None, description="rollout: [T - 1 + rollout_steps, 7], the actions between the "
                          "context frames then one per step; plan: [T - 1, 7].")
    rollout_steps: int | None = Field(None, ge=1, le=MAX_ROLLOUT_STEPS,
                                      description="rollout: steps (default: the actions past "
                                                  "the context).")
    goal: VideoInput | ImageInput | TensorInput | None = Field(
        None, description="plan: the goal frame: a video (its last frame), or frames as "
                          "a tensor ([H, W, 3] / [N, H, W, 3] uint8, [N, 3, H, W] float; the "
                          "last one); in process also a PIL image.")
    samples: int = Field(PLAN_DEFAULTS["samples"], ge=1, description=f"plan: candidates "
                         f"per iteration (at most {MAX_SAMPLES}).")
    iterations: int = Field(PLAN_DEFAULTS["iterations"], ge=1,
                            description=f"plan: CEM steps (at most {MAX_ITERATIONS}).")
    horizon: int = Field(PLAN_DEFAULTS["horizon"], ge=1,
                         description=f"plan: actions planned (at most {MAX_HORIZON}).")
    topk: int = Field(PLAN_DEFAULTS["topk"], ge=2, description="plan: the best candidates the "
                      "refit keeps (their std needs two).")
    momentum_mean: float = Field(PLAN_DEFAULTS["momentum_mean"], ge=0, le=1)
    momentum_std: float = Field(PLAN_DEFAULTS["momentum_std"], ge=0, le=1)
    maxnorm: float = Field(PLAN_DEFAULTS["maxnorm"], gt=0,
                           description="plan: the largest xyz step (clipped).")
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="plan: the sampling seed.")


# -- the clip, host side -----------------------------------------------------------------

def _clip_frames(req: _VideoRequest) -> torch.Tensor:
    """The request's clip as frames [T, H, W, 3] uint8 or [T, 3, H, W] float, checked."""
    if (req.video is None) == (req.frames is None):
        raise RequestError("give the clip as exactly one of `video` or `frames`",
                           param="video" if req.frames is None else "frames")
    param = "video" if req.video is not None else "frames"
    frames = torch.from_numpy(np.ascontiguousarray(req.video.frames)) \
        if req.video is not None else torch.as_tensor(req.frames)
    return _checked_frames(frames, param)


def _checked_frames(frames: torch.Tensor, param: str) -> torch.Tensor:
    """`frames` if they are [T, H, W, 3] uint8 or [T, 3, H, W] float in [0, 1]."""
    channels_last = frames.dim() == 4 and frames.shape[-1] == 3
    channels_first = frames.dim() == 4 and frames.shape[1] == 3
    if not (channels_last or channels_first) or min(frames.shape) == 0:
        raise RequestError(f"{param}: frames must be [T, H, W, 3] uint8 or [T, 3, H, W] float "
                           f"in [0, 1], got shape {list(frames.shape)}", param=param)
    if channels_last and frames.dtype != torch.uint8:
        raise RequestError(f"{param}: [T, H, W, 3] frames must be uint8, got {frames.dtype}",
                           param=param)
    if not channels_last:
        if not frames.is_floating_point():
            raise RequestError(f"{param}: [T, 3, H, W] frames must be float in [0, 1], got "
                               f"{frames.dtype}", param=param)
        if not bool(torch.isfinite(frames).all()) or frames.min() < 0 or frames.max() > 1:
            raise RequestError(f"{param}: float frames must lie in [0, 1]", param=param)
    return frames


def _pixels(frames: torch.Tensor, cfg: VJepa2Config, param: str,
            per_frame: bool = False) -> torch.Tensor:
    """[T, 3, crop, crop] float32, as `VJEPA2VideoProcessor` (`processing`); `per_frame`:
    every frame kept (the AC model encodes frames one by one)."""
    h, w = frames.shape[1:3] if frames.shape[-1] == 3 else frames.shape[2:]
    if min(h, w) < cfg.patch_size:
        raise RequestError(f"{param}: frames of {h}x{w} pixels are smaller than one "
                           f"{cfg.patch_size}-pixel patch", param=param)
    return preprocess_video(frames, dataclasses.replace(cfg, tubelet_size=1) if per_frame
                            else cfg)


def _matrix(value: Any, param: str, rows: int | None, what: str) -> torch.Tensor:
    """A [rows, 7] float tensor of finite values (a 400 naming `param` otherwise)."""
    x = torch.as_tensor(value, dtype=torch.float32)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[1] != ACTION_DIM:
        raise RequestError(f"{param}: {what} must be [N, {ACTION_DIM}], got shape "
                           f"{list(x.shape)}", param=param)
    if rows is not None and x.shape[0] != rows:
        raise RequestError(f"{param}: expected {rows} rows of {ACTION_DIM} ({what}), got "
                           f"{x.shape[0]}", param=param)
    if not bool(torch.isfinite(x).all()):
        raise RequestError(f"{param}: values must be finite", param=param)
    return x


def _chunk(inputs: dict[str, Any]) -> dict[str, Any]:
    """`ac_predictor.frame_inputs`' chunk as a node's inputs: its extras by name."""
    return {k: v for k, v in inputs.items() if k != "extras"} | inputs["extras"]


def _event(name: str, value: Any, index: int = 0) -> NamedTensor:
    tensor = torch.as_tensor(value).float().cpu().contiguous()
    return NamedTensor(name, TensorData.from_tensor(tensor), index=index)


# -- the shared base ---------------------------------------------------------------------

class _VJepa2Base(Model):
    """What both models share besides the clip's host-side checks (module functions)."""

    def cacheable_nodes(self) -> set[str]:
        return {"video_encoder"}


class VJepa2(_VJepa2Base):
    """V-JEPA 2 (see the module docstring)."""

    config_class = VJepa2Config
    presets = PRESETS
    preset_max_seq_len = {"tiny": 512, "small": 1024}
    config: VJepa2Config

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> VJepa2Config:
        return from_hub(checkpoint_config)

    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"video_encoder": "stateless", "predictor": "stateless"}

    def graph_walks(self) -> dict[str, Walk]:
        encode = GraphNode("video_encoder", inputs=("pixel_values",), outputs=("latents",))
        return {
            "encode": Walk(encode, emit=("latents",)),
            "predict": Walk(Sequential(encode, GraphNode(
                "predictor", inputs=("latents", "context_ids", "target_ids"),
                outputs=("predictions",), prepare=self._mask)), emit=("predictions",)),
        }

    @staticmethod
    def _mask(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        device = env["latents"].device
        return {name: torch.tensor(env[name], dtype=torch.long, device=device)
                for name in ("context_ids", "target_ids")}

    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        builders = {"video_encoder": VideoEncoder, "predictor": MaskedPredictor}
        if node not in builders:
            raise ValueError(f"unknown vjepa2 node {node!r}; nodes: {sorted(builders)}")
        return builders[node](self.config).eval()

    def weight_spec(self, node: str) -> WeightSpec:
        maps = {**ENCODER_KEYS, **PREDICTOR_KEYS}
        if node not in maps:
            raise ValueError(f"unknown vjepa2 node {node!r}; nodes: {sorted(maps)}")
        return WeightSpec(patterns=("*.safetensors",), key_map=maps[node])

    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(VJepa2Request, request, "vjepa2")
        cfg = self.config
        param = "video" if req.video is not None else "frames"
        frames = _clip_frames(req)
        t = frames.shape[0]
        if not cfg.tubelet_size <= t <= cfg.frames_per_clip:
            raise RequestError(f"{param}: {t} frames; the clip needs from tubelet_size="
                               f"{cfg.tubelet_size} to frames_per_clip={cfg.frames_per_clip}",
                               param=param)
        # a trailing remainder short of a tubelet is dropped, as the hub model's convolution
        pixels = _pixels(frames, cfg, param)
        steps, per_step = t // cfg.tubelet_size, cfg.tokens_per_tubelet
        params: dict[str, Any] = {"mode": req.mode}
        if req.mode == "predict":
            params |= self._mask_ids(req, steps, per_step)
        return RequestPlan(first_walks={"main": WalkStep(req.mode, inputs={
            "pixel_values": pixels})}, params=params, seed=req.seed,
            prompt_tokens=steps * per_step)

    @staticmethod
    def _mask_ids(req: VJepa2Request, steps: int, per_step: int) -> dict[str, list[int]]:
        """Context and target token indices: the tokens of `target_frames`, else a seeded
        random `mask_ratio` of all tokens; each non-empty."""
        n = steps * per_step
        if req.target_frames is not None:
            bad = [f for f in req.target_frames if not 0 <= f < steps]
            if bad or len(set(req.target_frames)) == steps or not req.target_frames:
                raise RequestError(f"target_frames: latent time steps in 0..{steps - 1}, "
                                   f"at least one and not all, got {req.target_frames}",
                                   param="target_frames")
            target = torch.zeros(n, dtype=torch.bool)
            for f in set(req.target_frames):
                target[f * per_step:(f + 1) * per_step] = True
        else:
            ratio = 0.5 if req.mask_ratio is None else req.mask_ratio
            k = min(max(1, round(ratio * n)), n - 1)
            gen = torch.Generator().manual_seed(req.seed or 0)
            target = torch.zeros(n, dtype=torch.bool)
            target[torch.randperm(n, generator=gen)[:k]] = True
        ids = torch.arange(n)
        return {"context_ids": ids[~target].tolist(), "target_ids": ids[target].tolist()}

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.walk in ("encode", "predict"):
            return Done("stop")
        raise ValueError(f"vjepa2 has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        return [_event(name, outputs[name]) for name in ("latents", "predictions")
                if name in outputs]


# -- V-JEPA 2-AC --------------------------------------------------------------------------

def _vitg() -> VJepa2Config:
    """The authors' AC encoder: ViT-g/16 at 256 px (`vit_giant_xformers`, RoPE)."""
    return VJepa2Config(hidden_size=1408, num_attention_heads=22, num_hidden_layers=40,
                        mlp_ratio=48 / 11)


@dataclass(frozen=True)
class VJepa2ACConfig:
    """The encoder's sizes and the action-conditioned predictor's."""

    encoder: VJepa2Config = field(default_factory=_vitg)
    predictor: acp.ACPredictorConfig = field(default_factory=acp.ACPredictorConfig)
    #: the authors' `normalize_reps`: latents are layer-normed before the predictor
    normalize_reps: bool = True


#: What `cem_score` reads and writes (`cem.CEMScore`).
CEM_INPUTS = ("actions", "final_latents", "goal_latents", "topk", "maxnorm", "cem_mean",
              "cem_std", "momentum_mean", "momentum_std")
CEM_OUTPUTS = ("cem_mean", "cem_std", "best_score", "plan_actions")

AC_PRESETS: dict[str, dict[str, Any]] = {
    name: {"encoder": VJepa2Config(**PRESETS[name]),
           "predictor": acp.ACPredictorConfig(**acp.PRESETS[name])}
    for name in ("tiny", "small")} | {"vitg": {}}

#: The authors' encoder keys (`vision_transformer.py`, under `encoder.module.backbone.`)
#: -> the encoder's (Hugging Face) names. The authors fuse q, k and v into `attn.qkv`.
AUTHORS_ENCODER_KEYS: tuple[tuple[str, str | None], ...] = (
    (r"encoder\.(?:module\.)?(?:backbone\.)?patch_embed\.proj\.(.*)",
     r"embeddings.patch_embeddings.proj.\1"),
    (r"encoder\.(?:module\.)?(?:backbone\.)?blocks\.(\d+)\.attn\.(qkv|proj)\.(.*)",
     r"layer.\1.attention.\2.\3"),
    (r"encoder\.(?:module\.)?(?:backbone\.)?blocks\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(.*)",
     r"layer.\1.\2.\3"),
    (r"encoder\.(?:module\.)?(?:backbone\.)?norm\.(.*)", r"layernorm.\1"),
    (r".*", None),
)


class _QKVSlice(nn.Module):
    """Query, key or value as a slice of the authors' fused `attn.qkv` projection."""

    def __init__(self, fused: nn.Linear, index: int):
        super().__init__()
        self._fused = [fused]  # a list: the fused layer's parameters are registered once
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused[0]
        rows = slice(self.index * fused.in_features, (self.index + 1) * fused.in_features)
        bias = None if fused.bias is None else fused.bias[rows]
        return F.linear(x, fused.weight[rows], bias)


class ACVideoEncoder(VideoEncoder):
    """The encoder as the authors' `WorldModel.encode` runs it: each layer's q, k, v in
    one `attention.qkv` [3·d, d], their checkpoint's layout (core's loader cannot split a
    fused key), and with `normalize` the latents layer-normed (`normalize_reps`) once
    per batch, so every candidate of a plan reads them as they are."""

    def __init__(self, cfg: VJepa2Config, normalize: bool):
        super().__init__(cfg)
        self.normalize = normalize
        for layer in self.layer:
            attention = layer.attention
            dim = attention.query.in_features
            attention.qkv = nn.Linear(dim, 3 * dim, bias=attention.query.bias is not None)
            for i, name in enumerate(("query", "key", "value")):
                setattr(attention, name, _QKVSlice(attention.qkv, i))

    def forward(self, items: list[dict[str, Any]], ctx: StepContext | None = None
                ) -> list[dict[str, Any]]:
        out = super().forward(items, ctx)
        if self.normalize:
            out = [{"latents": F.layer_norm(o["latents"], o["latents"].shape[-1:])}
                   for o in out]
        return out


class CEMSample(nn.Module):
    """The stateless node `cem_sample`: each plan candidate (child) draws its action
    trajectory [horizon, 7] from the round's (`cem_mean`, `cem_std`) [horizon, 4] with
    `cem.sample_actions`; `ctx.randn` keys the noise by child and join round, so every
    candidate of every round draws its own."""

    def forward(self, items: list[dict[str, Any]], ctx: StepContext) -> list[dict[str, Any]]:
        out = []
        for i, item in enumerate(items):
            mean = torch.as_tensor(item["cem_mean"], dtype=torch.float32, device=ctx.device)
            std = torch.as_tensor(item["cem_std"], dtype=torch.float32, device=ctx.device)
            noise = ctx.randn(i, tuple(mean.shape), site="cem")
            out.append({"actions": sample_actions(mean, std, noise, float(item["maxnorm"]))})
        return out


class VJepa2AC(_VJepa2Base):
    """V-JEPA 2-AC (see the module docstring)."""

    config_class = VJepa2ACConfig
    presets = AC_PRESETS
    #: the authors' file is a bare state dict: their sizes are the defaults (`vitg`)
    checkpoint_has_config = False
    preset_max_seq_len = {"tiny": 1024, "small": 4096}
    config: VJepa2ACConfig

    def _encoded(self, env: Mapping[str, Any], name: str, index: int) -> dict[str, Any]:
        """Frame `index` of clip `name` as the authors encode one frame: a tubelet of the
        frame repeated `tubelet_size` times."""
        frame = env[name][index:index + 1]
        return {"pixel_values": frame.repeat(self.config.encoder.tubelet_size, 1, 1, 1)}

    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"video_encoder": "stateless", "ac_predictor": "kv_cache",
                "cem_sample": "stateless", "cem_score": "stateless"}

    def kv_spec(self, node: str) -> KVSpec:
        if node != "ac_predictor":
            raise ValueError(f"vjepa2_ac node {node!r} has no KV cache (only 'ac_predictor')")
        p = self.config.predictor
        return KVSpec(num_layers=p.depth, num_kv_heads=p.num_heads, num_heads=p.num_heads,
                      head_dim=p.head_dim,
                      labels=("main", "ctx"), position_axes=acp.POSITION_AXES,
                      extras=acp.kv_extras(p), outputs=dict(acp.KV_OUTPUTS))

    # -- walks ------------------------------------------------------------------------------
    def graph_walks(self) -> dict[str, Walk]:
        def encode(at: str | None = "frame", clip: str = "pixel_values", out: str = "latents",
                   emit: bool = False) -> GraphNode:
            """The encoder on frame `env[at]` of `clip` (the loop's `frame`, the last
            context frame `prefix_frames`), or on its only frame (`at` None)."""
            def prepare(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
                return self._encoded(env, clip, 0 if at is None else int(env[at]))
            return GraphNode("video_encoder", inputs=("pixel_values",), outputs=("latents",),
                             rename={"latents": out}, prepare=prepare,
                             emit=(out,) if emit else ())

        frame_inputs = ("input_ids", "positions", "segments",
                        *(e.name for e in acp.kv_extras(self.config.predictor)))

        def append(node: GraphNode | None = None, *, step: bool = False,
                   emit: bool = False, ctx: bool = False) -> GraphNode:
            """One frame chunk into the cache: a context frame (its encoding, given action
            and state) or a rollout step (the last context frame, then the prediction)."""
            names = {"name": "ac_predictor_ctx", "alias_of": "ac_predictor",
                     "label": "ctx"} if ctx else {"name": "ac_predictor"}
            return GraphNode(**names, inputs=frame_inputs, outputs=("next_latents",),
                             prepare=self._step_frame if step else self._context_frame,
                             emit=("next_latents",) if emit else ())

        steps = Loop(append(step=True), times="horizon", carry=["next_latents"])
        return {
            "encode": Walk(Loop(encode(emit=True), times="num_frames", iteration="frame")),
            "rollout": Walk(Sequential(
                Loop(Sequential(encode(), append()), times="prefix_frames", iteration="frame"),
                encode("prefix_frames"), Loop(append(step=True, emit=True), times="rollout_steps",
                               carry=["next_latents"]))),
            # every context frame into the kept `ctx` (the last one's chunk is cut off by
            # the candidates' forks: its action is each candidate's own), then the goal
            "plan_context": Walk(Sequential(
                Loop(Sequential(encode(), append(ctx=True)), times="num_frames",
                     iteration="frame"), encode(None, "goal_pixels", "goal_latents")),
                results=("latents", "goal_latents")),
            "plan": Walk(
                Sequential(GraphNode("cem_sample", inputs=("cem_mean", "cem_std", "maxnorm"),
                                     outputs=("actions",), rename={"actions": "candidate"}),
                           steps),
                join=Join(GraphNode("cem_score", inputs=CEM_INPUTS, outputs=CEM_OUTPUTS,
                                    emit=("best_score",), prepare=self._join_inputs),
                          stack=("candidate", "next_latents"), feed=("cem_mean", "cem_std"),
                          times="iterations"),
                emit=("plan_actions",)),
        }

    # -- prepare rules --------------------------------------------------------------------
    def _normed(self, latents: torch.Tensor) -> torch.Tensor:
        """The authors' `normalize_reps`: latents layer-normed (no affine) before use."""
        return F.layer_norm(latents, latents.shape[-1:]) if self.config.normalize_reps \
            else latents

    def _predicted(self, next_latents: torch.Tensor) -> torch.Tensor:
        """A frame chunk's output rows -> the next frame's latents, as the authors'."""
        return self._normed(acp.next_frame(next_latents, self.config.predictor))

    def _context_frame(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Context frame i (the loop's `frame`): its encoding with its given action and
        state. A plan's last context frame has no action of its own (each candidate's):
        zeros stand in, and the candidates' forks cut that chunk off."""
        i = int(env["frame"])
        actions = env["actions"]
        action = torch.tensor(actions[i]) if i < len(actions) else torch.zeros(ACTION_DIM)
        return _chunk(acp.frame_inputs(env["latents"], action,
                                       torch.tensor(env["poses"][i]), i,
                                       self.config.predictor))

    def _step_frame(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Step k: frame T-1+k, the last context frame (k = 0) or the previous prediction,
        with its action and pose: a rollout's from the request, a plan candidate's from its
        sampled trajectory, the pose integrated from the last context frame's."""
        k = int(iteration or 0)
        latents = env["latents"] if k == 0 else self._predicted(env["next_latents"])
        frame = int(env["prefix_frames"]) + k
        if "candidate" in env:
            plan = env["candidate"].float().cpu()
            pose = torch.tensor(env["poses"][-1])[None, None]
            for j in range(k):
                pose = compute_new_pose(pose, plan[j][None, None])
            action, pose = plan[k], pose[0, 0]
        else:
            action, pose = torch.tensor(env["actions"][frame]), torch.tensor(env["poses"][frame])
        return _chunk(acp.frame_inputs(latents, action, pose, frame, self.config.predictor))

    def _join_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """The round's candidates for `cem_score`: their trajectories and final frames
        (layer-normed, as the goal's)."""
        final = env["next_latents"]
        return {"actions": env["candidate"],
                "final_latents": self._normed(final[:, self.config.predictor.cond_tokens:]),
                "goal_latents": env["goal_latents"]}

    # -- modules and weights --------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        c = self.config
        builders = {"video_encoder": lambda: ACVideoEncoder(c.encoder, c.normalize_reps),
                    "ac_predictor": lambda: acp.ACPredictor(c.predictor),
                    "cem_sample": CEMSample, "cem_score": CEMScore}
        if node not in builders:
            raise ValueError(f"unknown vjepa2_ac node {node!r}; nodes: {sorted(builders)}")
        return builders[node]().eval()

    def weight_spec(self, node: str) -> WeightSpec:
        """The authors' pickled `{"encoder": ..., "predictor": ...}` (keys prefixed
        `module.backbone.`), read with `weights_only=True`; core's loader flattens it to
        `encoder.module.backbone.*` and `predictor.module.backbone.*`."""
        nothing = ((r".*", None),)  # the CEM nodes hold no weights
        maps = {"video_encoder": AUTHORS_ENCODER_KEYS, **acp.WEIGHT_KEY_MAPS,
                "cem_sample": nothing, "cem_score": nothing}
        if node not in maps:
            raise ValueError(f"unknown vjepa2_ac node {node!r}; nodes: {sorted(maps)}")
        return WeightSpec(patterns=("*.pt", "*.pth"), format="torch", key_map=maps[node])

    # -- host side ------------------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(VJepa2ACRequest, request, "vjepa2_ac")
        param = "video" if req.video is not None else "frames"
        frames = _clip_frames(req)
        t = frames.shape[0]
        pixels = _pixels(frames, self.config.encoder, param, per_frame=True)
        params: dict[str, Any] = {"mode": req.mode, "num_frames": t, "prefix_frames": t - 1,
                                  "actions": [], "poses": []}
        first = WalkStep(req.mode if req.mode != "plan" else "plan_context",
                         inputs={"pixel_values": pixels})
        if req.mode == "rollout":
            params |= self._rollout_params(req, t)
        elif req.mode == "plan":
            params |= self._plan_params(req, t)
            first.inputs["goal_pixels"] = self._goal(req.goal)
        per_frame = self.config.predictor.tokens_per_frame
        return RequestPlan(first_walks={"main": first}, params=params, seed=req.seed,
                           prompt_tokens=t * per_frame,
                           prompt_detail=f", {per_frame} per frame ({t} context frames)")

    def _frames_fit(self, t: int, steps: int, param: str) -> None:
        """The predictor's sequence holds `max_frames` frames (the authors' mask)."""
        most = self.config.predictor.max_frames
        if t + steps - 1 > most:
            raise RequestError(f"{param}: {t} context frames and {steps} predicted ones "
                               f"pass the predictor's {most} frames (at most {most - t + 1} "
                               f"steps from {t} frames)", param=param)

    def _poses(self, req: VJepa2ACRequest, t: int) -> torch.Tensor:
        """The pose at each context frame [T, 7]: `states`, or `pose` for a one-frame
        context."""
        if req.states is not None:
            return _matrix(req.states, "states", t, "a pose per context frame")
        if req.pose is not None and t == 1:
            return _matrix(req.pose, "pose", 1, "the pose at the context frame")
        raise RequestError(f"states: required, [{t}, {ACTION_DIM}] (the end-effector pose at "
                           f"each context frame)" + (", or `pose` [7]" if t == 1 else ""),
                           param="states")

    def _rollout_params(self, req: VJepa2ACRequest, t: int) -> dict[str, Any]:
        poses = self._poses(req, t)
        if req.actions is None:
            raise RequestError(f"actions: required for a rollout, [{t - 1} + rollout_steps, "
                               f"{ACTION_DIM}]", param="actions")
        actions = _matrix(req.actions, "actions", None, "actions")
        steps = req.rollout_steps if req.rollout_steps is not None \
            else actions.shape[0] - (t - 1)
        if steps < 1 or actions.shape[0] != t - 1 + steps:
            raise RequestError(f"actions: {actions.shape[0]} rows; a rollout of {steps} steps "
                               f"from {t} context frames needs {t - 1 + steps} (one per "
                               f"context transition, then one per step)", param="actions")
        if steps > MAX_ROLLOUT_STEPS:
            raise RequestError(f"rollout_steps: at most {MAX_ROLLOUT_STEPS}, got {steps}",
                               param="rollout_steps")
        self._frames_fit(t, steps, "rollout_steps")
        # the pose of every frame: the context's, then each predicted frame's
        pose, rolled = poses[-1:][None], []
        for k in range(steps):
            pose = compute_new_pose(pose, actions[t - 1 + k][None, None])
            rolled.append(pose[0, 0])
        return {"actions": actions.tolist(),
                "poses": torch.cat([poses, torch.stack(rolled)]).tolist(),
                "rollout_steps": steps}

    def _plan_params(self, req: VJepa2ACRequest, t: int) -> dict[str, Any]:
        for name, value, cap in (("samples", req.samples, MAX_SAMPLES),
                                 ("iterations", req.iterations, MAX_ITERATIONS),
                                 ("horizon", req.horizon, MAX_HORIZON)):
            if value > cap:
                raise RequestError(f"{name}: at most {cap}, got {value}", param=name)
        if req.topk > req.samples:
            raise RequestError(f"topk: at most samples={req.samples}, got {req.topk}",
                               param="topk")
        if req.goal is None:
            raise RequestError("goal: required for a plan (the goal frame: an image, a "
                               "video or frames)", param="goal")
        self._frames_fit(t, req.horizon, "horizon")
        poses = self._poses(req, t)
        if t > 1 and req.actions is None:
            raise RequestError(f"actions: [{t - 1}, {ACTION_DIM}], the actions between the "
                               f"{t} context frames", param="actions")
        actions = _matrix(req.actions, "actions", t - 1, "the actions between the context "
                          "frames") if t > 1 else torch.zeros(0, ACTION_DIM)
        mean, std = initial_distribution(req.horizon, req.maxnorm)
        return {"actions": actions.tolist(), "poses": poses.tolist(), "samples": req.samples,
                "iterations": req.iterations, "horizon": req.horizon, "topk": req.topk,
                "momentum_mean": req.momentum_mean, "momentum_std": req.momentum_std,
                "maxnorm": req.maxnorm, "cem_mean": mean.tolist(), "cem_std": std.tolist()}

    def _goal(self, goal: Any) -> torch.Tensor:
        """The goal frame [1, 3, crop, crop]: an image, or the last frame of a clip."""
        from PIL.Image import Image

        if isinstance(goal, Image):
            frames = torch.from_numpy(np.asarray(goal.convert("RGB")).copy())[None]
        elif isinstance(goal, Video):
            frames = torch.from_numpy(np.ascontiguousarray(goal.frames))
        else:
            frames = torch.as_tensor(goal)
            if frames.dim() == 3:
                frames = frames[None]
        return _pixels(_checked_frames(frames, "goal")[-1:], self.config.encoder, "goal",
                       per_frame=True)

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.walk == "plan_context":
            p = state.params
            length = p["prefix_frames"] * self.config.predictor.tokens_per_frame
            forks = [Fork("ac_predictor", length=length, child=c, src_label="ctx")
                     for c in range(p["samples"])]
            return WalkStep("plan", inputs=dict(control), forks=forks, children=p["samples"])
        if state.walk in ("encode", "rollout", "plan"):
            return Done("stop")
        raise ValueError(f"vjepa2_ac has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        """`latents` [T, frame tokens, D] layer-normed (encode, once every frame is in);
        per rollout step a row of `rollout` [1, tokens, D] and of the predicted frame's
        `poses` [1, 7]; each plan round's row of `plan_scores` (its best candidate's
        distance), then the plan `actions` [horizon, 7]."""
        p = state.params
        if "latents" in outputs:
            frames = state.store.setdefault("frames", [])
            frames.append(torch.as_tensor(outputs["latents"]).float().cpu())
            if len(frames) < p["num_frames"]:
                return []
            return [_event("latents", torch.stack(frames))]
        if "next_latents" in outputs:
            k = state.store.get("steps", 0)
            state.store["steps"] = k + 1
            latents = self._predicted(torch.as_tensor(outputs["next_latents"]).float().cpu())
            # one row per step (index is the completion, not the step): the answer's
            # `outputs` join the rows into `rollout` [steps, tokens, D] and `poses` [steps, 7]
            return [_event("rollout", latents[None]),
                    _event("poses", torch.tensor(p["poses"][p["num_frames"] + k])[None])]
        if "best_score" in outputs:
            return [_event("plan_scores", torch.as_tensor(outputs["best_score"]).reshape(1))]
        if "plan_actions" in outputs:
            return [_event("actions", outputs["plan_actions"])]
        return []
