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
tubelet of that frame, as the authors' `WorldModel.encode`) and layer-normed.
- `rollout`: context frames 0..T-2 encoded and appended, the last context frame encoded,
  then `Loop(ac_predictor, times="rollout_steps")`: step k appends frame T-1+k (the last
  context frame, then the previous prediction) with action T-1+k and the pose integrated
  from the states by `pose.compute_new_pose`; each step's layer-normed `next_latents` is
  emitted as it is computed (`rollout`, index k) with its pose (`poses`).
- `plan_context` then `plan` (MPC by the cross-entropy method, as the authors' `cem`):
  the context frames 0..T-2 (their actions given) are appended under the KV label `ctx`,
  the last context frame and the goal encoded, and `cem_score` draws the first round's
  candidates. `plan` runs `samples` children: each forks `ctx` (a clean copy every round)
  and rolls its candidate out `horizon` steps; the `Join` runs `cem_score` once over every
  child's final latents (L1 to the goal, top-k, momentum refit, the next round's candidates)
  and re-forks them, `iterations` rounds; the plan is the final mean [horizon, 7].

Actions and poses are 7-D end-effector deltas and poses (xyz, euler xyz, gripper), as the
authors' DROID checkpoint. A pose depends only on the initial state and the actions, so
rollout poses are integrated on the host when the request arrives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mstar.errors import RequestError
from mstar.events import Event, NamedTensor, TensorData
from mstar.graph import GraphNode, Join, Loop, Sequential, Walk
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
    TensorInput,
    VideoInput,
    WalkStep,
    validate_request,
)
from mstar.weights import WeightSpec
from mstar_vjepa2 import ac_predictor as acp
from mstar_vjepa2.cem import CEMScore
from mstar_vjepa2.config import PRESETS, VJepa2Config, from_hub
from mstar_vjepa2.encoder import WEIGHT_KEY_MAPS, VideoEncoder
from mstar_vjepa2.pose import compute_new_pose
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
        None, description="The end-effector pose at each context frame [T, 7] (rollout, "
                          "plan: at least the last frame's).")
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
        None, description="plan: the goal frame (an image, a video whose last frame is "
                          "taken, or frames).")
    samples: int = Field(PLAN_DEFAULTS["samples"], ge=1, description=f"plan: candidates "
                         f"per iteration (at most {MAX_SAMPLES}).")
    iterations: int = Field(PLAN_DEFAULTS["iterations"], ge=1,
                            description=f"plan: CEM steps (at most {MAX_ITERATIONS}).")
    horizon: int = Field(PLAN_DEFAULTS["horizon"], ge=1,
                         description=f"plan: actions planned (at most {MAX_HORIZON}).")
    topk: int = Field(PLAN_DEFAULTS["topk"], ge=1, description="plan: candidates refit to.")
    momentum_mean: float = Field(PLAN_DEFAULTS["momentum_mean"], ge=0, le=1)
    momentum_std: float = Field(PLAN_DEFAULTS["momentum_std"], ge=0, le=1)
    maxnorm: float = Field(PLAN_DEFAULTS["maxnorm"], gt=0,
                           description="plan: the largest xyz step (clipped).")
    seed: int | None = Field(None, ge=0, lt=2 ** 63, description="plan: the sampling seed.")


# -- the clip, host side -----------------------------------------------------------------

def _clip_frames(req: _VideoRequest, what: str = "video") -> torch.Tensor:
    """The request's clip as frames [T, H, W, 3] uint8 or [T, 3, H, W] float, checked."""
    if (req.video is None) == (req.frames is None):
        raise RequestError("give the clip as exactly one of `video` or `frames`",
                           param="video" if req.frames is None else "frames")
    param = "video" if req.video is not None else "frames"
    frames = torch.from_numpy(np.ascontiguousarray(req.video.frames)) \
        if req.video is not None else torch.as_tensor(req.frames)
    return _checked_frames(frames, param)


def _checked_frames(frames: torch.Tensor, param: str) -> torch.Tensor:
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


def _pixels(frames: torch.Tensor, cfg: VJepa2Config, param: str) -> torch.Tensor:
    """[T, 3, crop, crop] float32, as `VJEPA2VideoProcessor` (`processing`)."""
    h, w = (frames.shape[1:3] if frames.shape[-1] == 3 else frames.shape[2:4])
    if min(h, w) < cfg.patch_size:
        raise RequestError(f"{param}: frames of {h}x{w} pixels are smaller than one "
                           f"{cfg.patch_size}-pixel patch", param=param)
    return preprocess_video(frames, cfg.crop_size)


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


def _latents_event(name: str, value: Any, index: int = 0) -> NamedTensor:
    tensor = torch.as_tensor(value).float().cpu().contiguous()
    return NamedTensor(name, TensorData.from_tensor(tensor), index=index)


# -- the shared base ---------------------------------------------------------------------

class _VJepa2Base(Model):
    """What both models share: the per-frame encoder and the clip's host-side checks."""

    def cacheable_nodes(self) -> set[str]:
        return {"video_encoder"}

    @property
    def encoder_config(self) -> VJepa2Config:
        raise NotImplementedError

    def _encoded(self, env: Mapping[str, Any], name: str, index: int) -> dict[str, Any]:
        """Frame `index` of clip `name` as the authors encode one frame: a tubelet of the
        frame repeated `tubelet_size` times."""
        frame = env[name][index:index + 1]
        return {"pixel_values": frame.repeat(self.encoder_config.tubelet_size, 1, 1, 1)}


class VJepa2(_VJepa2Base):
    """V-JEPA 2 (see the module docstring)."""

    config_class = VJepa2Config
    presets = PRESETS
    preset_max_seq_len = {"tiny": 512, "small": 1024}
    config: VJepa2Config

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> VJepa2Config:
        return from_hub(checkpoint_config)

    @property
    def encoder_config(self) -> VJepa2Config:
        return self.config

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
        if node not in WEIGHT_KEY_MAPS:
            raise ValueError(f"unknown vjepa2 node {node!r}; nodes: {sorted(WEIGHT_KEY_MAPS)}")
        return WeightSpec(patterns=("*.safetensors",), key_map=WEIGHT_KEY_MAPS[node])

    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(VJepa2Request, request, "vjepa2")
        cfg = self.config
        frames = _clip_frames(req)
        t = frames.shape[0]
        if t < cfg.tubelet_size or t % cfg.tubelet_size or t > cfg.frames_per_clip:
            raise RequestError(
                f"{'video' if req.video is not None else 'frames'}: {t} frames; the clip "
                f"must have a multiple of tubelet_size={cfg.tubelet_size} frames, from "
                f"{cfg.tubelet_size} to frames_per_clip={cfg.frames_per_clip}",
                param="video" if req.video is not None else "frames")
        pixels = _pixels(frames, cfg, "video" if req.video is not None else "frames")
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
        return [_latents_event(name, outputs[name]) for name in ("latents", "predictions")
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


AC_PRESETS: dict[str, dict[str, Any]] = {
    name: {"encoder": VJepa2Config(**PRESETS[name]),
           "predictor": acp.ACPredictorConfig(**acp.PRESETS[name])}
    for name in ("tiny", "small")} | {"vitg": {}}

#: inputs of an `ac_predictor` frame chunk (`ac_predictor.frame_inputs` builds them)
FRAME_INPUTS = ("input_ids", "positions", "segments", *(e.name for e in acp.KV_EXTRAS))


class VJepa2AC(_VJepa2Base):
    """V-JEPA 2-AC (see the module docstring)."""

    config_class = VJepa2ACConfig
    presets = AC_PRESETS
    preset_max_seq_len = {"tiny": 1024, "small": 4096}
    config: VJepa2ACConfig
    walk_names: ClassVar[tuple[str, ...]] = ("encode", "rollout", "plan_context", "plan")

    @property
    def encoder_config(self) -> VJepa2Config:
        return self.config.encoder

    @property
    def frame_tokens(self) -> int:
        return self.config.encoder.tokens_per_tubelet

    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"video_encoder": "stateless", "ac_predictor": "kv_cache",
                "cem_score": "stateless"}

    def kv_spec(self, node: str) -> KVSpec:
        if node != "ac_predictor":
            raise ValueError(f"vjepa2_ac node {node!r} has no KV cache (only 'ac_predictor')")
        p = self.config.predictor
        return KVSpec(num_layers=p.depth, num_kv_heads=p.num_heads,
                      head_dim=p.embed_dim // p.num_heads, labels=("main", "ctx"),
                      position_axes=acp.POSITION_AXES, extras=acp.KV_EXTRAS,
                      outputs=dict(acp.KV_OUTPUTS))

    # -- walks ------------------------------------------------------------------------------
    def graph_walks(self) -> dict[str, Walk]:
        def encode(i: int | str | None, clip: str = "pixel_values", out: str = "latents",
                   emit: bool = False) -> GraphNode:
            """The encoder on frame `i` of `clip` (an int, a param, or the loop iteration)."""
            def prepare(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
                index = iteration if i is None else (env[i] if isinstance(i, str) else i)
                return self._encoded(env, clip, int(index))
            return GraphNode("video_encoder", inputs=("pixel_values",), outputs=("latents",),
                             rename={"latents": out}, prepare=prepare,
                             emit=(out,) if emit else ())

        def append(label: str = "main", step: bool = False, emit: bool = False) -> GraphNode:
            """One frame chunk into the cache: a context frame (its encoding, given action
            and state) or a rollout step (the last context frame, then the prediction)."""
            rule = self._step_frame if step else self._context_frame
            return GraphNode("ac_predictor", inputs=FRAME_INPUTS, outputs=("next_latents",),
                             label=label, prepare=rule, emit=("next_latents",) if emit else ())

        context = Loop(Sequential(encode(None), append()), times="prefix_frames",
                       iteration="frame")
        ctx_context = Loop(Sequential(encode(None), append("ctx")), times="prefix_frames",
                           iteration="frame")
        last = encode("last_frame")
        score = GraphNode("cem_score", inputs=CEMScore.INPUTS, outputs=CEMScore.OUTPUTS)
        return {
            "encode": Walk(Loop(encode(None, emit=True), times="num_frames",
                                iteration="frame")),
            "rollout": Walk(Sequential(context, last, Loop(
                append(step=True, emit=True), times="rollout_steps", carry=["next_latents"]))),
            "plan_context": Walk(Sequential(ctx_context, last,
                                            encode(0, "goal_pixels", "goal_latents"), score),
                                 results=("latents", "goal_latents", *CEMScore.FEED)),
            "plan": Walk(Loop(append(step=True), times="horizon", carry=["next_latents"]),
                         join=Join(score, stack=("next_latents",), feed=CEMScore.FEED,
                                   times="iterations"),
                         emit=("plan_actions", "plan_scores")),
        }

    # -- prepare rules --------------------------------------------------------------------
    def _latents(self, latents: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(latents, latents.shape[-1:]) if self.config.normalize_reps \
            else latents

    def _context_frame(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Context frame i (the loop's `frame`): its encoding, given action i and state i."""
        i = int(env["frame"])
        latents = env["latents"]
        row = torch.tensor(env["actions"][i], dtype=latents.dtype, device=latents.device)
        state = torch.tensor(env["poses"][i], dtype=latents.dtype, device=latents.device)
        return acp.frame_inputs(self._latents(latents), row, state, i, self.config.predictor)

    def _step_frame(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """Rollout step k: frame T-1+k, the last context frame (k = 0) or the previous
        prediction, with its action and pose: a rollout's from the request, a plan
        candidate's from its row of `candidates`, its pose integrated from the context's."""
        k = int(iteration or 0)
        latents = self._latents(env["latents"]) if k == 0 else env["next_latents"]
        frame = int(env["prefix_frames"]) + k
        dev, dtype = latents.device, latents.dtype
        if "candidates" in env:  # a plan candidate: this child's action sequence
            plan = env["candidates"][int(env["child"])].to(dev, dtype)
            pose = torch.tensor(env["poses"][-1], dtype=dtype, device=dev)
            for j in range(k):
                pose = compute_new_pose(pose[None, None], plan[j][None, None])[0, 0]
            action = plan[k]
        else:
            action = torch.tensor(env["actions"][frame], dtype=dtype, device=dev)
            pose = torch.tensor(env["poses"][frame], dtype=dtype, device=dev)
        return acp.frame_inputs(latents, action, pose, frame, self.config.predictor)

    # -- modules and weights --------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        c = self.config
        builders = {"video_encoder": lambda: VideoEncoder(c.encoder),
                    "ac_predictor": lambda: acp.ACPredictor(c.predictor),
                    "cem_score": lambda: CEMScore()}
        if node not in builders:
            raise ValueError(f"unknown vjepa2_ac node {node!r}; nodes: {sorted(builders)}")
        return builders[node]().eval()

    def weight_spec(self, node: str) -> WeightSpec:
        """The authors' pickled `{"encoder": ..., "predictor": ...}`, keys prefixed
        `module.backbone.` (read with `weights_only=True`; it flattens to `encoder.module.
        backbone.*` and `predictor.module.backbone.*`)."""
        if node == "cem_score":
            return WeightSpec(patterns=())
        if node not in acp.AUTHORS_KEY_MAPS:
            raise ValueError(f"unknown vjepa2_ac node {node!r}; nodes: "
                             f"{sorted(acp.AUTHORS_KEY_MAPS)}")
        return WeightSpec(patterns=("*.pt", "*.pth"), format="torch",
                          key_map=acp.AUTHORS_KEY_MAPS[node])

    # -- host side ------------------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(VJepa2ACRequest, request, "vjepa2_ac")
        enc = self.config.encoder
        param = "video" if req.video is not None else "frames"
        frames = _clip_frames(req)
        t = frames.shape[0]
        pixels = _pixels(frames, enc, param)
        params: dict[str, Any] = {"mode": req.mode, "num_frames": t, "last_frame": t - 1,
                                  "prefix_frames": t - 1}
        first = WalkStep(req.mode if req.mode != "plan" else "plan_context",
                         inputs={"pixel_values": pixels})
        if req.mode == "rollout":
            params |= self._rollout_params(req, t)
        elif req.mode == "plan":
            params |= self._plan_params(req, t)
            first.inputs["goal_pixels"] = self._goal(req.goal)
        return RequestPlan(first_walks={"main": first}, params=params, seed=req.seed,
                           prompt_tokens=t * (self.frame_tokens + 2))

    def _poses(self, req: VJepa2ACRequest, t: int) -> torch.Tensor:
        """The pose at each context frame [T, 7]: `states`, or `pose` for the last one
        (then the context must be one frame)."""
        if req.states is not None:
            return _matrix(req.states, "states", t, "a pose per context frame")
        if req.pose is not None and t == 1:
            return _matrix(req.pose, "pose", 1, "the pose at the context frame")
        raise RequestError(f"states: required, [T={t}, {ACTION_DIM}] (the end-effector pose "
                           f"at each context frame)" + (", or `pose` [7]" if t == 1 else ""),
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
                               f"from {t} context frames needs {t - 1} + {steps} = "
                               f"{t - 1 + steps} (one per context transition, one per step)",
                               param="actions")
        if steps > MAX_ROLLOUT_STEPS:
            raise RequestError(f"rollout_steps: at most {MAX_ROLLOUT_STEPS}, got {steps}",
                               param="rollout_steps")
        # the pose of every frame the predictor sees, and of each predicted one
        pose = poses[-1:][None]
        rolled = [poses[-1]]
        for k in range(steps):
            pose = compute_new_pose(pose, actions[t - 1 + k][None, None])
            rolled.append(pose[0, 0])
        all_poses = torch.cat([poses[:-1], torch.stack(rolled)])
        return {"actions": actions.tolist(), "poses": all_poses.tolist(),
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
        poses = self._poses(req, t)
        actions = _matrix(req.actions, "actions", t - 1, "the actions between the context "
                          "frames") if t > 1 else torch.zeros(0, ACTION_DIM)
        return {"actions": actions.tolist(), "poses": poses.tolist(), "samples": req.samples,
                "iterations": req.iterations, "horizon": req.horizon, "topk": req.topk,
                "momentum_mean": req.momentum_mean, "momentum_std": req.momentum_std,
                "maxnorm": req.maxnorm}

    def _goal(self, goal: Any) -> torch.Tensor:
        """The goal frame [1, 3, crop, crop]: an image, or a clip's last frame."""
        from PIL.Image import Image

        from mstar.media import Video

        if isinstance(goal, Image):
            frames = torch.from_numpy(np.asarray(goal.convert("RGB")).copy())[None]
        elif isinstance(goal, Video):
            frames = torch.from_numpy(np.ascontiguousarray(goal.frames))
        else:
            frames = torch.as_tensor(goal)
            if frames.dim() == 3:
                frames = frames[None]
        frames = _checked_frames(frames, "goal")
        return _pixels(frames[-1:], self.config.encoder, "goal")

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.walk == "plan_context":
            p = state.params
            forks = [Fork("ac_predictor", child=c, src_label="ctx")
                     for c in range(p["samples"])] if p["prefix_frames"] else []
            return WalkStep("plan", inputs=dict(control), forks=forks, children=p["samples"])
        if state.walk in ("encode", "rollout", "plan"):
            return Done("stop")
        raise ValueError(f"vjepa2_ac has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        """`latents` [T, frame tokens, D] (encode); per rollout step `rollout` (index k)
        and `poses` (the predicted frame's pose, index k); a plan's `actions` and
        `plan_scores`."""
        p = state.params
        if "latents" in outputs and p["mode"] == "encode":
            frames = state.store.setdefault("frames", [])
            frames.append(self._latents(torch.as_tensor(outputs["latents"]).float().cpu()))
            if len(frames) < p["num_frames"]:
                return []
            return [_latents_event("latents", torch.stack(frames))]
        if "next_latents" in outputs and p["mode"] == "rollout":
            k = state.store.get("steps", 0)
            state.store["steps"] = k + 1
            pose = torch.tensor(p["poses"][p["prefix_frames"] + k + 1])
            return [_latents_event("rollout", outputs["next_latents"], index=k),
                    _latents_event("poses", pose, index=k)]
        if "plan_actions" in outputs:
            return [_latents_event("actions", outputs["plan_actions"]),
                    _latents_event("plan_scores", outputs["plan_scores"])]
        return []
