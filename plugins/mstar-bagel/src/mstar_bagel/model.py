"""BAGEL: the model contract (declarations and host-side functions).

A request is a list of context items prefilled into the LLM one walk each, then either text
decoding or image generation:

- `prefill_text`: `<|im_start|>` + text + `<|im_end|>`, causal, positions advancing per token.
- `prefill_vit`: the ViT encodes an image; its tokens, between `<|vision_start|>` and
  `<|vision_end|>`, form one bidirectional chunk at a single position (the position then
  advances by one). Understanding and editing read images this way.
- `prefill_vae`: the VAE encodes an image (editing); its patchified latents run through the
  generation expert at flow time 0, laid out like a ViT image.
- `decode`: text from `<|im_start|>` at the next position until `<|im_end|>`.
- `image_gen`: noise, then `num_timesteps − 1` Euler steps. Each step runs the LLM over a
  *scratch* chunk (start marker, the latent tokens, end marker; not kept) in up to three
  contexts as the authors' inferencer builds them: the full context (`LLM`), the context
  without the last text (`LLM_cfg_text`, a fork of the main sequence) and the context
  without images (`LLM_cfg_img`, its own prefill of the texts at its own positions, run at
  the start of the walk). Each context puts the latent chunk at its own next position, so
  these are branch-local `prepare` results. `combine_cfg` mixes the velocities and steps;
  the VAE decodes the final latent. Which rank runs which branch is YAML only.

Pixels of every image of a request travel as one flat `pixels` tensor: the first walk gets
it as an input and each prefill walk hands it on as a result while images remain, so no
walk needs the host to hold tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from mstar.errors import RequestError
from mstar.events import Event, Image
from mstar.graph import GraphNode, Loop, Parallel, Sequential, Walk
from mstar.graph.primitives import PrepareRule
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
    SamplingFields,
    WalkStep,
    text_delta,
    token_list,
    validate_request,
)
from mstar.model.layers.embeddings import flattened_position_ids, patchify
from mstar.weights import WeightSpec
from mstar_bagel.config import PRESET_MAX_SEQ_LEN, PRESETS, BagelConfig
from mstar_bagel.flow import CombineCFG, LatentInit, guidance_active, timesteps

if TYPE_CHECKING:

    from mstar.chat import ChatPrompt

IMAGE_MARKER = "<image>"
PREFILL_WALKS = {"text": "prefill_text", "vit": "prefill_vit", "vae": "prefill_vae"}
LLM_INPUTS = ("input_ids", "positions", "segments", "chunk_mode", "expert_ids", "vit_mask",
              "vit_embeds", "latents", "latent_pos_ids", "t")
#: Defaults of the authors' demo (app.py) for text-to-image and for editing (its
#: text-to-image leaves the image scale at the inferencer's 1.5).
GENERATION_DEFAULTS = {
    "generate": dict(cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0),
                     cfg_renorm_type="global", cfg_renorm_min=0.0),
    "edit": dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                 cfg_renorm_type="text_channel", cfg_renorm_min=0.0),
}
#: The system prompts BAGEL was trained to reason under ("think"): the model writes its
#: reasoning between <think> and </think>, then the answer or the image. Model inputs, kept
#: exactly as the authors' inferencer has them.
THINK_PROMPTS = {
    "text": "You should first think about the reasoning process in the mind and then provide "
            "the user with the answer. \nThe reasoning process is enclosed within <think> "
            "</think> tags, i.e. <think> reasoning process here </think> answer here",
    "image": "You should first think about the planning process in the mind and then "
             "generate the image. \nThe planning process is enclosed within <think> </think> "
             "tags, i.e. <think> planning process here </think> image here",
}
#: "image" lists the three chunks in one rendered text: `<image>` where an image part was.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.content is string %}{{ message.content }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type == 'image' %}" + IMAGE_MARKER + "{% endif %}"
    "{% endfor %}{% endif %}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}")


# ------------------------------------------------------------------------------------------
# Request schema


class BagelRequest(SamplingFields):
    """The model-specific fields of `POST /generate` for BAGEL."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., description="The text. With `image`, the image comes first.")
    mode: Literal["text", "image"] = Field(
        "text", description="text: answer in text (understanding); image: generate an "
                            "image, or edit `image` when it is given.")
    image: ImageInput | None = Field(None, description="An input image: read by the ViT "
                                                       "(text mode) or edited (image mode).")
    width: int | None = Field(None, ge=1, description="Image mode: output width (one of the "
                                                      "model's sizes); default the first.")
    height: int | None = Field(None, ge=1, description="Image mode: output height.")
    cfg_text_scale: float | None = Field(None, ge=1.0, le=20.0,
                                         description="Text guidance scale (4.0).")
    cfg_img_scale: float | None = Field(None, ge=1.0, le=20.0,
                                        description="Image guidance scale (1.5; edits 2.0).")
    cfg_interval: list[float] | None = Field(  # a list: strict JSON checks take no tuple
        None, min_length=2, max_length=2,
        description="Guidance only where lo < t <= hi ([0.4, 1]; edits [0, 1]).")
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_renorm_min: float | None = Field(None, ge=0.0, le=1.0)
    think: bool = Field(False, description="Reason first (under BAGEL's system prompt): "
                                           "text before the answer, or before the image "
                                           "(up to max_tokens of it, streamed as text).")
    num_timesteps: int = Field(50, ge=2, le=250, description="Flow schedule length "
                                                              "(num_timesteps − 1 steps).")
    timestep_shift: float = Field(3.0, gt=0.0, le=20.0)

    @model_validator(mode="after")
    def _consistent(self) -> BagelRequest:
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError("cfg_interval: must be [lo, hi] with 0 <= lo <= hi <= 1")
        if self.mode == "text" and (self.width or self.height):
            raise ValueError("width: width and height are for mode 'image'")
        if self.mode == "image" and self.n > 4:
            raise ValueError(f"n: at most 4 images per request, got {self.n}")
        if self.mode == "image" and self.think and self.n > 1:
            raise ValueError("n: a think request makes one image")
        return self


def _validated(request: Mapping[str, Any]) -> BagelRequest:
    return validate_request(BagelRequest, request, "bagel")


# ------------------------------------------------------------------------------------------
# The model


class Bagel(Model):
    """BAGEL-7B-MoT (see the module docstring)."""

    config_class = BagelConfig
    presets = PRESETS
    preset_max_seq_len: ClassVar[dict[str, int]] = PRESET_MAX_SEQ_LEN
    config_files: ClassVar[tuple[str, ...]] = ("llm_config.json", "vit_config.json")
    host_files: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "default": ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")}
    config: BagelConfig

    def __init__(self, config: BagelConfig):
        super().__init__(config)
        self._tokenizer_dir: Path | None = None
        self._tokenizer: Any = None

    @classmethod
    def config_from_checkpoint(cls, checkpoint_config: dict[str, Any]) -> BagelConfig:
        return BagelConfig.from_checkpoint(checkpoint_config)

    # -- declarations ----------------------------------------------------------------------
    def node_engine_types(self) -> dict[str, Literal["kv_cache", "stateless"]]:
        return {"vit_encoder": "stateless", "vae_encoder": "stateless",
                "vae_decoder": "stateless", "LLM": "kv_cache", "latent_init": "stateless",
                "combine_cfg": "stateless"}

    def tp_nodes(self) -> set[str]:
        return {"LLM"}

    def cacheable_nodes(self) -> set[str]:
        return {"vit_encoder"}

    def kv_spec(self, node: str) -> KVSpec:
        if node != "LLM":
            raise ValueError(f"bagel node {node!r} has no KV cache (only 'LLM' has)")
        from mstar_bagel.llm import kv_extras

        llm = self.config.llm
        return KVSpec(num_layers=llm.num_hidden_layers, num_kv_heads=llm.num_key_value_heads,
                      num_heads=llm.num_attention_heads,
                      head_dim=llm.head_dim, labels=("main", "cfg_text", "cfg_img"),
                      extras=kv_extras(llm, self.config.latent_dim),
                      outputs={"logits": "last", "velocity": "all"})

    def graph_walks(self) -> dict[str, Walk]:
        def llm(name: str, prepare: Any, **kw: Any) -> GraphNode:
            if name != "LLM":
                kw = dict(alias_of="LLM", label=name.removeprefix("LLM_"),
                          rename={"velocity": f"velocity_{name.removeprefix('LLM_')}"}, **kw)
            return GraphNode(name, inputs=LLM_INPUTS, prepare=prepare, **kw)

        denoise_step = Sequential(
            Parallel(llm("LLM", self._latent_chunk("rope"), outputs=("velocity",)),
                     llm("LLM_cfg_text", self._latent_chunk("cfg_text_rope"),
                         outputs=("velocity",), skip=_text_guidance_off),
                     llm("LLM_cfg_img", self._latent_chunk("cfg_img_rope"),
                         outputs=("velocity",), skip=_image_guidance_off)),
            GraphNode("combine_cfg", inputs=(
                "x_t", "step", "timesteps", "velocity", "velocity_cfg_text",
                "velocity_cfg_img", "cfg_img_is_full", "cfg_text_scale", "cfg_img_scale",
                "cfg_renorm_type", "cfg_renorm_min"), outputs=("x_t",)))
        image_gen = Sequential(
            Parallel(llm("LLM_cfg_img", self._cfg_img_prefill, skip=_image_context_unused)),
            GraphNode("latent_init", inputs=("num_latent_tokens",), outputs=("x_t",)),
            Loop(denoise_step, times="denoise_steps", carry=["x_t"], iteration="step"),
            GraphNode("vae_decoder", inputs=("x_t", "latent_grid"), outputs=("image",)))
        carry_pixels = ("pixels",)
        return {
            "prefill_text": Walk(llm("LLM", self._text_chunk), results=carry_pixels),
            "prefill_vit": Walk(Sequential(
                GraphNode("vit_encoder", inputs=("pixel_values",), outputs=("vit_features",),
                          prepare=self._item_pixels),
                llm("LLM", self._vit_chunk)), results=carry_pixels),
            "prefill_vae": Walk(Sequential(
                GraphNode("vae_encoder", inputs=("pixel_values",), outputs=("vae_latent",),
                          prepare=self._item_pixels),
                llm("LLM", self._vae_chunk)), results=carry_pixels),
            "decode": Walk(Loop(GraphNode("LLM", inputs=("input_ids", "positions"),
                                          outputs=("token_ids",), emit=("token_ids",),
                                          prepare=self._decode_inputs),
                                until="finished", carry={"token_ids": "input_ids"},
                                iteration="decode_step"),
                           control=("finish_reason", "decode_step", "token_ids")),
            "image_gen": Walk(image_gen, emit=("image",)),
        }

    # -- prepare rules (run on the worker, per invocation) ---------------------------------
    @staticmethod
    def _item(env: Mapping[str, Any]) -> dict[str, Any]:
        return env["items"][int(env["item"])]

    def _item_pixels(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """This walk's image, sliced from the request's flat `pixels`."""
        offset, shape = self._item(env)["pixels"]
        size = shape[0] * shape[1] * shape[2]
        return {"pixel_values": env["pixels"][offset:offset + size].view(*shape)}

    def _text_chunk(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        """A text item of the schedule, or (`text_ids`, `text_pos` given) the end of the
        reasoning a "think" request decoded."""
        if "text_ids" in env:
            ids, pos = torch.tensor(env["text_ids"], dtype=torch.long), int(env["text_pos"])
        else:
            item = self._item(env)
            ids, pos = torch.tensor(item["ids"], dtype=torch.long), item["pos"]
        return {"input_ids": ids, "positions": torch.arange(pos, pos + len(ids)),
                "segments": [(len(ids), "causal")]}

    def _image_frame(self, env: Mapping[str, Any], n: int, pos: int) -> dict[str, Any]:
        """An image chunk's common part: start marker, n image rows, end marker, all at one
        position, fully connected."""
        ids = torch.zeros(n + 2, dtype=torch.long)
        ids[0], ids[-1] = env["start_of_image"], env["end_of_image"]
        return {"input_ids": ids, "positions": torch.full((n + 2,), pos, dtype=torch.long),
                "segments": [(n + 2, "bidirectional")]}

    def _vit_chunk(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        feats = env["vit_features"]
        n = feats.shape[0]
        embeds = feats.new_zeros((n + 2, feats.shape[1]))
        embeds[1:-1] = feats
        mask = torch.zeros(n + 2, dtype=torch.long)
        mask[1:-1] = 1
        return {**self._image_frame(env, n, self._item(env)["pos"]), "vit_mask": mask,
                "vit_embeds": embeds}

    def _latent_rows(self, latents: torch.Tensor, grid: list[int], pos: int,
                     env: Mapping[str, Any]) -> dict[str, Any]:
        """A latent image chunk: the generation expert's rows with their flattened latent
        positions (markers are the understanding expert's)."""
        n = latents.shape[0]
        rows = latents.new_zeros((n + 2, latents.shape[1]))
        rows[1:-1] = latents
        experts = torch.zeros(n + 2, dtype=torch.long)
        experts[1:-1] = 1
        c = self.config
        pos_ids = torch.zeros(n + 2, dtype=torch.long)
        pos_ids[1:-1] = flattened_position_ids(grid[0], grid[1], 1, c.max_latent_size)
        return {**self._image_frame(env, n, pos), "expert_ids": experts, "latents": rows,
                "latent_pos_ids": pos_ids}

    def _vae_chunk(self, env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        item = self._item(env)
        latent = env["vae_latent"]  # [C, h·p, w·p]
        rows = patchify(latent, self.config.latent_patch_size)
        return {**self._latent_rows(rows, item["grid"], item["pos"], env),
                "t": torch.zeros((), dtype=torch.float32)}

    def _latent_chunk(self, rope_key: str) -> PrepareRule:
        """The prepare rule of one guidance branch: the current latents as one scratch chunk
        at that context's next position (`env[rope_key]`), at the step's flow time."""

        def prepare(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
            t = env["timesteps"][iteration or 0]
            chunk = self._latent_rows(env["x_t"], env["latent_grid"], int(env[rope_key]), env)
            return {**chunk, "chunk_mode": "scratch", "t": torch.tensor(t)}

        return prepare

    def _cfg_img_prefill(self, env: Mapping[str, Any], iteration: int | None
                         ) -> dict[str, Any]:
        """The image-free context: every text of the request, at its own positions from 0
        (one causal chunk is the same as the texts one after another)."""
        ids = torch.tensor(env["cfg_img_ids"], dtype=torch.long)
        return {"input_ids": ids, "positions": torch.arange(len(ids)),
                "segments": [(len(ids), "causal")]}

    def _decode_inputs(self, env: Mapping[str, Any], iteration: int | None
                       ) -> dict[str, Any]:
        """Decoding starts from `<|im_start|>` at the next position (the authors'
        `prepare_start_tokens`); later steps read the token sampled before."""
        step = iteration or 0
        if step == 0:
            return {"input_ids": torch.tensor([env["bos"]]), "positions": int(env["rope"])}
        return {"positions": int(env["rope"]) + step}

    # -- modules and weights ---------------------------------------------------------------
    def build_submodule(self, node: str, ctx: BuildContext) -> nn.Module:
        from mstar_bagel import nodes

        c = self.config
        builders = {
            "vit_encoder": lambda: nodes.ViTNode(c),
            "vae_encoder": lambda: nodes.VAEEncoderItems(c),
            "vae_decoder": lambda: nodes.VAEDecoderItems(c),
            "LLM": lambda: nodes.llm_node(c, ctx),
            "latent_init": lambda: LatentInit(c.latent_dim),
            "combine_cfg": lambda: CombineCFG(),
        }
        if node not in builders:
            raise ValueError(f"unknown bagel node {node!r}; nodes: {sorted(builders)}")
        return builders[node]().eval()

    def weight_spec(self, node: str) -> WeightSpec:
        from mstar_bagel import nodes

        return nodes.weight_spec(node, self.config)

    # -- tokenizer -------------------------------------------------------------------------
    def use_checkpoint_files(self, directories: Mapping[str, Path | None]) -> None:
        self._tokenizer_dir = directories.get("default")

    def tokenizer(self) -> Any:
        """The checkpoint's Qwen2 tokenizer with BAGEL's special tokens; without a
        checkpoint (dummy weights), the tiny one this package ships."""
        if self._tokenizer is None:
            from mstar_bagel.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_dir)
        return self._tokenizer

    def chat_template(self) -> str:
        return CHAT_TEMPLATE

    # -- host side -------------------------------------------------------------------------
    def process_prompt(self, request: Mapping[str, Any]) -> RequestPlan:
        req = _validated(request)
        return self._plan(req, [req.image, req.prompt] if req.image is not None
                          else [req.prompt])

    def process_chat(self, prompt: ChatPrompt, request: Mapping[str, Any]) -> RequestPlan:
        """A chat is understanding: its texts and images in order (the template wrote an
        `<image>` marker for each image part)."""
        if prompt.audios or prompt.videos:
            raise ValueError("bagel takes text and images; no audio or video")
        req = _validated({**request, "prompt": prompt.text, "mode": "text"})
        pieces = prompt.text.split(IMAGE_MARKER)
        parts: list[Any] = []
        images = iter(prompt.images)
        for i, text in enumerate(pieces):
            if i:
                parts.append(next(images))
            if text.strip():
                parts.append(text)
        return self._plan(req, parts)

    def _plan(self, req: BagelRequest, parts: list[Any]) -> RequestPlan:
        """The prefill schedule of `parts` (texts and images, in order) and what the walk
        after it needs."""
        from mstar_bagel.transforms import image_transform, resized_size, to_rgb

        c, tok = self.config, self.tokenizer()
        specials = tok.bagel_ids
        if req.think:  # the system prompt is the first text of every context
            parts = [THINK_PROMPTS[req.mode], *parts]
        if req.mode == "text" and not any(isinstance(p, str) for p in parts):
            raise ValueError("prompt: understanding needs some text")
        editing = req.mode == "image" and any(not isinstance(p, str) for p in parts)
        if editing and sum(not isinstance(p, str) for p in parts) > 1:
            raise ValueError("image: an edit takes one image")
        size = self._output_size(req) if req.mode == "image" else None
        items: list[dict[str, Any]] = []
        blobs: list[torch.Tensor] = []
        offset = rope = length = 0
        cfg_text = (0, 0)  # (length, rope) of the context without the last text
        cfg_img_ids: list[int] = []

        def add_pixels(pixels: torch.Tensor) -> list[Any]:
            nonlocal offset
            blobs.append(pixels.reshape(-1).float())
            at = [offset, list(pixels.shape)]
            offset += pixels.numel()
            return at

        for part in parts:
            if isinstance(part, str):
                ids = [specials["bos"], *tok.encode(part, add_special_tokens=False),
                       specials["eos"]]
                cfg_text = (length, rope)
                items.append({"kind": "text", "ids": ids, "pos": rope})
                cfg_img_ids += ids
                rope, length = rope + len(ids), length + len(ids)
                continue
            # As the authors' inferencer: every input image is first resized by the VAE rule
            # (to the requested size, for an edit that names one), then each encoder's
            # transform runs on that.
            image = to_rgb(part)
            image = image.resize(size if editing and req.width else
                                 resized_size(*image.size, *c.vae_transform))
            if editing:
                pixels = image_transform(image, *c.vae_transform)
                grid = [pixels.shape[1] // c.latent_downsample,
                        pixels.shape[2] // c.latent_downsample]
                size = (pixels.shape[2], pixels.shape[1])
                items.append({"kind": "vae", "pixels": add_pixels(pixels), "grid": grid,
                              "pos": rope})
                length += grid[0] * grid[1] + 2
                rope += 1
            pixels = image_transform(image, *c.vit_transform)
            n_patches = (pixels.shape[1] // c.vit.patch_size) * (pixels.shape[2]
                                                                // c.vit.patch_size)
            items.append({"kind": "vit", "pixels": add_pixels(pixels), "pos": rope})
            length += n_patches + 2
            rope += 1
            cfg_text = (length, rope)
        params: dict[str, Any] = {
            "mode": req.mode, "items": items, "rope": rope, "length": length,
            "start_of_image": specials["start_of_image"],
            "end_of_image": specials["end_of_image"], "max_tokens": req.max_tokens,
            "n": req.n, "think": req.think,
        }
        prompt_tokens = length
        if req.mode == "image":
            assert size is not None
            width, height = size
            grid = [height // c.latent_downsample, width // c.latent_downsample]
            defaults = GENERATION_DEFAULTS["edit" if editing else "generate"]
            knobs = {k: getattr(req, k) if getattr(req, k) is not None else v
                     for k, v in defaults.items()}
            params.update(
                width=width, height=height, latent_grid=grid,
                num_latent_tokens=grid[0] * grid[1], cfg_text_length=cfg_text[0],
                cfg_text_rope=cfg_text[1], cfg_img_ids=cfg_img_ids,
                cfg_img_rope=len(cfg_img_ids),
                cfg_img_is_full=len(cfg_img_ids) == length and not req.think,
                timesteps=timesteps(req.num_timesteps, req.timestep_shift),
                denoise_steps=req.num_timesteps - 1,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()})
            prompt_tokens += grid[0] * grid[1] + 2
        sampling = req.sampling_params(eos_token_ids=[specials["eos"]])
        params["bos"], params["eos"] = specials["bos"], specials["eos"]
        pixels = torch.cat(blobs) if blobs else None
        first = self._walk_after(params, -1, pixels)
        assert isinstance(first, WalkStep)
        return RequestPlan(first_walks={"main": first}, params=params,
                           sampling={"default": sampling}, seed=req.seed,
                           prompt_tokens=prompt_tokens)

    def _output_size(self, req: BagelRequest) -> tuple[int, int]:
        sizes = self.config.image_size_pairs()
        if req.width is None and req.height is None:
            return sizes[0]
        if (req.width, req.height) not in sizes:
            allowed = ", ".join(f"{w}x{h}" for w, h in sizes)
            raise RequestError(f"size: {req.width}x{req.height} is not supported; sizes: "
                               f"{allowed}", param="width")
        return req.width, req.height

    def _walk_after(self, params: Mapping[str, Any], item: int,
                    pixels: Any) -> WalkStep | Done:
        """The walk after prefill item `item` (-1: the first walk)."""
        items = params["items"]
        nxt = item + 1
        if nxt < len(items):
            inputs: dict[str, Any] = {"item": nxt}
            if pixels is not None and any(i["kind"] != "text" for i in items[nxt:]):
                inputs["pixels"] = pixels
            return WalkStep(PREFILL_WALKS[items[nxt]["kind"]], inputs=inputs)
        if params["mode"] == "image" and params["think"]:
            return WalkStep("decode")  # the reasoning, then `_after_reasoning`
        return self._final_walk(params)

    def _final_walk(self, params: Mapping[str, Any], **context: int) -> WalkStep:
        """Text decoding or image generation after the whole context is in; `context`
        replaces the main context's `rope` and `length` when reasoning extended it."""
        n = int(params["n"])
        # Completions 1..n-1 fork the whole context; each lane has its own sampling or noise.
        forks = [Fork("LLM", length=params["length"], child=c) for c in range(1, n)]
        if params["mode"] == "text":
            return WalkStep("decode", children=n, forks=forks)
        forks += [Fork("LLM", length=params["cfg_text_length"], label="cfg_text", child=c)
                  for c in range(n)]
        return WalkStep("image_gen", children=n, forks=forks, inputs=dict(context))

    @staticmethod
    def _after_reasoning(state: RequestState, control: Mapping[str, Any]) -> WalkStep:
        """Close the decoded reasoning as a text chunk, as the authors' re-prefill of it
        does: the decode fed `<|im_start|>` and every sampled token but the last; the last
        (unless it is `<|im_end|>`) and `<|im_end|>` follow. The text-free and image-free
        contexts do not see the reasoning."""
        p = state.params
        fed = int(control["decode_step"]) + 1
        ids = [] if control.get("finish_reason") == "stop" else token_list(control["token_ids"])
        ids.append(p["eos"])
        pos = int(p["rope"]) + fed
        state.store["context"] = {"rope": pos + len(ids),
                                  "length": int(p["length"]) + fed + len(ids)}
        return WalkStep("prefill_text", inputs={"text_ids": ids, "text_pos": pos})

    def next_walk(self, state: RequestState, control: Mapping[str, Any]) -> WalkStep | Done:
        walk, p = state.walk, state.params
        if "context" in state.store:  # the reasoning is closed: now the image
            return self._final_walk(p, **state.store.pop("context"))
        if walk in PREFILL_WALKS.values():
            done = len(state.walks_done) - 1  # prefill items run in order, one walk each
            return self._walk_after(p, done, control.get("pixels"))
        if walk == "decode":
            if p["mode"] == "image":
                return self._after_reasoning(state, control)
            return Done(control.get("finish_reason") or "stop")
        if walk == "image_gen":
            return Done("stop")
        raise ValueError(f"bagel has no walk {walk!r}")

    def postprocess(self, outputs: Mapping[str, Any], state: OutputState) -> list[Event]:
        out: list[Event] = []
        if "token_ids" in outputs:
            out.append(text_delta(outputs, state))
        if "image" in outputs:
            from mstar.media.image import png_bytes  # the frontend's (media is loaded there)

            pixels = torch.as_tensor(outputs["image"]).cpu()
            out.append(Image(data=png_bytes(pixels), index=state.child))
        return out


# ------------------------------------------------------------------------------------------
# Skip rules and helpers


def _text_guidance_off(env: Mapping[str, Any], iteration: int | None) -> bool:
    return not guidance_active(env, iteration or 0)


def _image_guidance_off(env: Mapping[str, Any], iteration: int | None) -> bool:
    return _image_context_unused(env, iteration) or _text_guidance_off(env, iteration)


def _image_context_unused(env: Mapping[str, Any], iteration: int | None) -> bool:
    """No image-free context to run: image guidance is off, or the context would equal the
    full one (a prompt without images), whose velocity `combine_cfg` then reuses."""
    return (float(env["cfg_img_scale"]) <= 1.0 or float(env["cfg_text_scale"]) <= 1.0
            or bool(env["cfg_img_is_full"]))

