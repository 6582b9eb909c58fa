"""Pi0.5 (lerobot's `PI05Policy`): the model contract and its host-side functions.

Walks, one partition:
- `encode`: SigLIP over the request's cameras, every image in one ragged pass; its
  `image_features` stay on the worker (a result handle) and the encoder caches them by
  pixels, so a repeated camera frame is not encoded again.
- `prefill`: the prefix [camera tokens..., language tokens] through PaliGemma into the KV
  cache, one bidirectional segment at positions 0..L-1. Image rows take their
  `image_embeds` (`is_image` 1) instead of a token embedding; the language tokens are the
  prompt `Task: ..., State: ...;\\nAction: ` (the state discretised into it) with BOS
  first and no padding, so each request's prefix is its own length.
- `denoise`: `action_init` draws x_t ~ N(0, 1) [action_horizon, 32] from the core RNG (or
  takes the request's `noise`) at t = 1, then `num_steps` Euler steps: the action expert
  (`expert_ids` 1) on a bidirectional *scratch* chunk of H placeholder rows at positions
  L..L+H-1 reading the cached prefix, then `combine` (x += dt·v, t += dt, dt = -1/steps).
  `emit=("x_t",)` sends the denoised chunk, which `postprocess` slices to the robot's
  action width and unnormalises.

Host files (`use_checkpoint_files`): the normaliser statistics of the checkpoint's
processor files (`processing.Normalizer`) and the tokenizer (the checkpoint's
`tokenizer.json`, else the "tokenizer" weight source's, else the packaged tiny one, which
only fits a tiny vocabulary).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mstar.errors import RequestError
from mstar.events import Event, NamedTensor, TensorData
from mstar.graph import GraphNode, Loop, Sequential, Walk
from mstar.model import (
    BuildContext,
    Done,
    ExtraSpec,
    ImageInput,
    KVSpec,
    Model,
    OutputState,
    RequestPlan,
    RequestState,
    TensorInput,
    WalkStep,
    validate_request,
)
from mstar.weights import WeightSpec
from mstar_pi05.config import PRESETS, Pi05Config, from_lerobot
from mstar_pi05.modules import (
    TIED_EMBEDDING,
    WEIGHT_KEY_MAPS,
    ActionInit,
    Combine,
    Pi05LLM,
    VitEncoder,
)
from mstar_pi05.processing import Normalizer, pixels, prompt_text
from mstar_pi05.tokenizer import PACKAGED_TOKENIZER, PromptTokenizer, load_tokenizer

log = logging.getLogger(__name__)

NODES: dict[str, Literal["kv_cache", "stateless"]] = {
    "vit_encoder": "stateless", "LLM": "kv_cache", "action_init": "stateless",
    "combine": "stateless"}
PREFIX_INPUTS = ("input_ids", "positions", "segments", "expert_ids", "is_image",
                 "image_embeds")
ACTION_INPUTS = ("input_ids", "positions", "segments", "chunk_mode", "expert_ids", "x_t", "t")
#: The id of the action chunk's placeholder rows (`<pad>`: the expert never reads it, its
#: rows come from `action_in_proj(x_t)`).
ACTION_PLACEHOLDER = 0
MAX_NUM_STEPS = 1000
#: The name under which the LLM holds PaliGemma's token embedding a second time, to load
#: it from the tied LM head's key (see `Pi05.weight_spec`).
TIED_HEAD = "paligemma_lm_head"


class Pi05Request(BaseModel):
    """The model-specific fields of `POST /generate` for Pi0.5: one observation of a robot
    in, one action chunk out (`outputs["actions"]`)."""

    model_config = ConfigDict(extra="ignore")

    images: dict[str, ImageInput] | list[ImageInput] | None = Field(
        None, description="The cameras' images: camera name -> image, or a list in the "
                          "checkpoint's camera order. At least one; cameras left out take no "
                          "part.")
    prompt: str | None = Field(None, description="The task instruction (required).")
    state: list[float] | TensorInput | None = Field(
        None, description="The robot's proprioceptive state (required): 1..state_dim "
                          "finite values, before normalisation.")
    num_steps: int | None = Field(None, ge=1, le=MAX_NUM_STEPS,
                                  description="Flow-matching (Euler) steps; default the "
                                              "checkpoint's num_inference_steps.")
    seed: int | None = Field(None, ge=0, lt=2 ** 63,
                             description="The flow noise's seed (drawn when not given).")
    noise: list[list[float]] | TensorInput | None = Field(
        None, description="The initial flow noise [action_horizon, max_action_dim] instead "
                          "of seeded noise.")
    action_dim: int | None = Field(None, ge=1, description="Actions per step to return; "
                                                           "default the checkpoint's.")


class Pi05(Model):
    """Pi0.5 (see the module docstring)."""

    config_class = Pi05Config
    presets = PRESETS
    #: 3 cameras' tokens + a 200-token prompt + the action chunk, with room to spare
    preset_max_seq_len = {"tiny": 512, "small": 1024}
    config: Pi05Config
    host_files = {
        "default": ("config.json", "policy_preprocessor*.json", "policy_postprocessor*.json",
                    "policy_*processor_step_*.safetensors", "tokenizer*"),
        "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model"),
    }

    def __init__(self, config: Pi05Config):
        super().__init__(config)
        self.normalizer = Normalizer()
        self.prompt_tokenizer: PromptTokenizer | None = None

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> Pi05Config:
        return from_lerobot(checkpoint_config)

    # -- declarations ----------------------------------------------------------------------
    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return dict(NODES)

    def tp_nodes(self) -> set[str]:
        """The LLM shards by heads (sizes with one KV head, the real ones, cannot split)."""
        return {"LLM"}

    def cacheable_nodes(self) -> set[str]:
        return {"vit_encoder"}

    def kv_spec(self, node: str) -> KVSpec:
        if node != "LLM":
            raise ValueError(f"pi05 node {node!r} has no KV cache (only 'LLM' has)")
        c = self.config
        return KVSpec(
            num_layers=c.paligemma.depth, num_kv_heads=c.paligemma.num_kv_heads,
            num_heads=c.paligemma.num_heads,
            head_dim=c.paligemma.head_dim, position_axes=1,
            extras=(ExtraSpec("expert_ids", "token", (), torch.long, 0),
                    ExtraSpec("is_image", "token", (), torch.long, 0),
                    ExtraSpec("image_embeds", "token", (c.paligemma.width,)),
                    ExtraSpec("x_t", "token", (c.max_action_dim,)),
                    ExtraSpec("t", "seq", ())),
            outputs={"velocity": "all"})

    def graph_walks(self) -> dict[str, Walk]:
        step = Sequential(
            GraphNode("LLM", inputs=ACTION_INPUTS, outputs=("velocity",),
                      prepare=self._action_inputs),
            GraphNode("combine", inputs=("x_t", "t", "velocity", "num_steps"),
                      outputs=("x_t", "t")))
        return {
            "encode": Walk(GraphNode("vit_encoder", inputs=("pixel_values",),
                                     outputs=("image_features",)),
                           results=("image_features",)),
            "prefill": Walk(GraphNode("LLM", inputs=PREFIX_INPUTS,
                                      prepare=self._prefix_inputs)),
            "denoise": Walk(Sequential(
                GraphNode("action_init", inputs=("noise",), outputs=("x_t", "t")),
                Loop(step, times="num_steps", carry=["x_t", "t"])), emit=("x_t",)),
        }

    # -- prepare rules ---------------------------------------------------------------------
    def _prefix_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """The prefix: camera rows (token id 0, their image features) then the prompt's
        tokens, one bidirectional segment at positions 0..L-1, all PaliGemma rows."""
        feats = env["image_features"]
        n_img, text = feats.shape[0], env["prompt_ids"]
        length = n_img + len(text)
        ids = torch.tensor([0] * n_img + list(text), dtype=torch.long)
        is_image = (torch.arange(length) < n_img).long()
        embeds = torch.zeros(length, self.config.paligemma.width, dtype=feats.dtype,
                             device=feats.device)
        embeds[:n_img] = feats
        return {"input_ids": ids, "positions": torch.arange(length), "segments":
                [(length, "bidirectional")], "expert_ids": torch.zeros(length, dtype=torch.long),
                "is_image": is_image, "image_embeds": embeds}

    def _action_inputs(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """The action chunk: H placeholder rows after the prefix, one bidirectional scratch
        segment (its K/V dropped after each step), all action-expert rows."""
        h, start = self.config.action_horizon, int(env["prefix_len"])
        return {"input_ids": torch.full((h,), ACTION_PLACEHOLDER, dtype=torch.long),
                "positions": torch.arange(start, start + h), "segments": [(h, "bidirectional")],
                "chunk_mode": "scratch", "expert_ids": torch.ones(h, dtype=torch.long)}

    # -- modules and weights ---------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        c = self.config
        builders = {
            "vit_encoder": lambda: VitEncoder(c),
            "LLM": lambda: Pi05LLM(c, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size,
                                   tp_group=ctx.tp_group),
            "action_init": lambda: ActionInit(c),
            "combine": lambda: Combine(),
        }
        if node not in builders:
            raise ValueError(f"unknown pi05 node {node!r}; nodes: {sorted(builders)}")
        module = builders[node]()
        if node == "LLM":  # PaliGemma's head is its token embedding (see `weight_spec`)
            module.add_module(TIED_HEAD, module.paligemma.embed_tokens)
        return module.eval()

    def weight_spec(self, node: str) -> WeightSpec:
        """One lerobot `model.safetensors` for every node; each maps its own keys.

        PaliGemma's LM head is tied to its token embedding. Checkpoints converted from openpi
        store only `lm_head.weight`; lerobot 0.6.1 saves both, and loading it, its stored
        `embed_tokens` is the embedding. The LLM holds the embedding under a second name
        (`TIED_HEAD`) that the head's key fills, so either key alone loads it and with both
        the embedding's key, read after the head's (a file's keys are read in sorted order,
        `...paligemma.lm_head` before `...paligemma.model...`), wins."""
        if node not in WEIGHT_KEY_MAPS:
            raise ValueError(f"unknown pi05 node {node!r}; nodes: {sorted(WEIGHT_KEY_MAPS)}")
        tied = ((TIED_EMBEDDING[0], f"{TIED_HEAD}.weight"),) if node == "LLM" else ()
        # only the weights: the processor steps' statistics are safetensors files too
        return WeightSpec(patterns=("model*.safetensors",),
                          key_map=tied + WEIGHT_KEY_MAPS[node])

    def adjust_dummy_weight(self, node: str, name: str, weight: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
        """Dummy weights whose actions depend on the observation. Core's normal(0, 0.02)
        leaves attention uniform and the action expert's adaRMS gates near zero, so the
        chunk is the noise plus a drift that hardly sees the cameras or the prompt (two
        prompts 1e-4 apart in the tiny preset); each matrix is drawn again with a standard
        deviation of 1/sqrt(fan_in), which keeps activations O(1) through the layers."""
        if weight.dim() < 2 or "embed_tokens" in name or "position_embedding" in name:
            return weight
        fan_in = math.prod(weight.shape[1:])
        return torch.randn(weight.shape, generator=generator) / math.sqrt(fan_in)

    # -- host files ------------------------------------------------------------------------
    def use_checkpoint_files(self, directories: Mapping[str, Path | None]) -> None:
        """The normaliser of the default source's processor files, and the first
        `tokenizer.json` of the default source and the "tokenizer" one (checked now, so a
        deployment without a usable tokenizer does not start)."""
        default, tokenizer_dir = directories.get("default"), directories.get("tokenizer")
        self.normalizer = Normalizer.from_directory(default)
        found = [d for d in (default, tokenizer_dir)
                 if d is not None and (d / "tokenizer.json").is_file()]
        self.prompt_tokenizer = self._checked_tokenizer(found[0] if found else None)

    def _checked_tokenizer(self, directory: Path | None) -> PromptTokenizer:
        """`directory`'s tokenizer, or without one the packaged tiny tokenizer (presets and
        dummy weights), which fits only a vocabulary at least its size."""
        if directory is not None:
            return load_tokenizer(directory)
        tiny = load_tokenizer()
        if self.config.vocab_size < tiny.vocab_size:
            raise ValueError(f"pi05: no tokenizer.json in the checkpoint or its 'tokenizer' "
                             f"weight source, and the packaged tiny one ({PACKAGED_TOKENIZER}) "
                             f"has {tiny.vocab_size} ids, more than the model's vocabulary "
                             f"of {self.config.vocab_size}")
        log.info("pi05: no tokenizer.json in the checkpoint files: the packaged tiny "
                 "tokenizer stands in")
        return tiny

    # -- host side -------------------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = validate_request(Pi05Request, request, "pi05")
        c = self.config
        images = self._camera_pixels(req.images)
        prompt = self._prompt_ids(req)
        action_dim = c.action_dim if req.action_dim is None else req.action_dim
        if action_dim > c.action_dim:
            raise RequestError(f"action_dim: at most {c.action_dim} (the checkpoint's "
                               f"action), got {action_dim}", param="action_dim")
        n_image_rows = images.shape[0] * c.tokens_per_image
        prefix_len = n_image_rows + len(prompt)
        params = {"prompt_ids": prompt, "prefix_len": prefix_len, "action_dim": action_dim,
                  "num_steps": req.num_steps or c.num_inference_steps,
                  "noise": self._noise(req.noise)}
        return RequestPlan(first_walks={"main": WalkStep("encode",
                                                         inputs={"pixel_values": images})},
                           params=params, seed=req.seed, prompt_tokens=prefix_len,
                           prompt_detail=f", {n_image_rows} of them camera tokens "
                                         f"({images.shape[0]} images)")

    def _camera_pixels(self, images: dict[str, Any] | list[Any] | None) -> torch.Tensor:
        """[n_cam, 3, R, R] in the checkpoint's camera order; cameras not given are left
        out (lerobot masks them out: they take no part)."""
        cams = self.config.cameras
        if isinstance(images, list):
            if len(images) > len(cams):
                raise RequestError(f"images: {len(images)} images but the checkpoint has "
                                   f"{len(cams)} cameras ({', '.join(cams)})", param="images")
            images = dict(zip(cams, images, strict=False))
        if not images:
            raise RequestError(f"images: at least one camera image is required (cameras: "
                               f"{', '.join(cams)})", param="images")
        unknown = sorted(set(images) - set(cams))
        if unknown:
            raise RequestError(f"images: unknown camera {', '.join(map(repr, unknown))}; the "
                               f"checkpoint's cameras: {', '.join(cams)}", param="images")
        from PIL.Image import Image

        out = []
        for cam in cams:
            if cam not in images:
                continue
            if not isinstance(images[cam], Image):
                raise RequestError(f"images.{cam}: not an image (got "
                                   f"{type(images[cam]).__name__})", param="images")
            out.append(pixels(images[cam], self.config.image_resolution))
        return torch.stack(out)

    def _prompt_ids(self, req: Pi05Request) -> list[int]:
        """The prompt's token ids: the task and the discretised normalised state."""
        c = self.config
        if req.prompt is None or not req.prompt.strip():
            raise RequestError("prompt: the task instruction is required", param="prompt")
        if req.state is None:
            raise RequestError(f"state: required, 1..{c.state_dim} values (the checkpoint's "
                               "observation.state)", param="state")
        state = torch.as_tensor(req.state, dtype=torch.float32)
        if state.dim() != 1 or not 1 <= state.shape[0] <= c.state_dim:
            raise RequestError(f"state: expected 1..{c.state_dim} values (the checkpoint's "
                               f"observation.state), got shape {list(state.shape)}",
                               param="state")
        if not bool(torch.isfinite(state).all()):
            raise RequestError("state: values must be finite (no NaN or inf)", param="state")
        text = prompt_text(req.prompt, self.normalizer.state.normalize(state))
        if self.prompt_tokenizer is None:  # a model made without its host files
            self.prompt_tokenizer = self._checked_tokenizer(None)
        ids = self.prompt_tokenizer.encode(text)
        if len(ids) > c.tokenizer_max_length:
            raise RequestError(f"prompt: {len(ids)} tokens with the state, more than the "
                               f"checkpoint's tokenizer_max_length {c.tokenizer_max_length}",
                               param="prompt")
        return ids

    def _noise(self, noise: Any) -> list[list[float]] | None:
        """The request's flow noise, checked, as a nested list: a host value every walk's
        environment holds (`action_init` reads it; messages carry no tensors)."""
        if noise is None:
            return None
        c = self.config
        want = [c.action_horizon, c.max_action_dim]
        x = torch.as_tensor(noise, dtype=torch.float32)
        if list(x.shape) != want or not bool(torch.isfinite(x).all()):
            raise RequestError(f"noise: must be {want} (action_horizon, max_action_dim) of "
                               f"finite values, got shape {list(x.shape)}", param="noise")
        return x.tolist()

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        if state.walk == "encode":
            return WalkStep("prefill", inputs={"image_features": control["image_features"]})
        if state.walk == "prefill":  # `noise`, when given, is a request param
            return WalkStep("denoise")
        if state.walk == "denoise":
            return Done("stop")
        raise ValueError(f"pi05 has no walk {state.walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        """The denoised chunk as `actions` [action_horizon, action_dim]: sliced to the
        robot's width, then unnormalised with the checkpoint's action statistics."""
        if "x_t" not in outputs:
            return []
        x = torch.as_tensor(outputs["x_t"]).float().cpu()[:, :int(state.params["action_dim"])]
        actions = self.normalizer.action.unnormalize(x)
        return [NamedTensor("actions", TensorData.from_tensor(actions.contiguous()),
                            index=state.child)]
