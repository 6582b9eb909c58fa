"""The authors' BAGEL code (ByteDance-Seed/Bagel) built from one of our checkpoints, run in a
side venv: the reference that `plugins/mstar-bagel/tests/fixtures/make_bagel_fixtures.py`
records outputs of and that `bench_bagel.py` times. Both import it; only the side venv runs
it (the authors' code needs transformers 4.49, ours 5.x; `benchmarks/README.md`, BAGEL
section, builds the venv).

The authors' sources come from a checkout or a bare git mirror of their repository (its
`modeling/`, `data/` and `inferencer.py`), copied to a temporary directory and changed there:
- `flash_attn` is not installable beside the CPU torch: a pure-torch stand-in
  (`flash_attn_varlen_func` as per-sequence SDPA, grouped-query heads repeated, a causal
  mask aligned bottom-right as flash-attn 2 does) is put in `sys.modules` before import.
- The authors' attention hard-casts q/k/v (and the MoT layer's gen-mode rows) to bfloat16.
  The copy gets `torch.bfloat16` -> `torch.float32` in `modeling/bagel/qwen2_navit.py` and
  `modeling/bagel/siglip_navit.py` only, so the reference runs in float32 as our CPU model.
- Inputs not under test are handed in: token ids (a tokenizer stand-in returns ours) and
  encoder pixels (their `ImageTransform` needs torchvision, which does not install beside
  the CPU torch; a transform stand-in returns ours).

As a script (`VENV/bin/python bagel_reference.py SPEC.json`) it runs `bench_bagel.py`'s
requests one at a time and prints their timings as JSON (see `bench`).
"""

from __future__ import annotations

import importlib.machinery
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Where the side venv's python and the authors' sources are looked for by default.
DEFAULT_VENV = Path("/work/venvs/bagel2")
DEFAULT_SOURCE = Path("/work/.mirror/ByteDance-Seed+Bagel/repo")
AUTHORS_FILES = ("modeling", "data", "inferencer.py")


def flash_attn_standin() -> types.ModuleType:
    """`flash_attn.flash_attn_varlen_func` in plain torch (see the module docstring)."""
    import torch.nn.functional as F

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                               max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
                               causal=False, **_):
        out = q.new_empty(q.shape)
        groups = q.shape[1] // k.shape[1]
        for i in range(len(cu_seqlens_q) - 1):
            qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            qi = q[qs:qe].transpose(0, 1)
            ki = k[ks:ke].repeat_interleave(groups, dim=1).transpose(0, 1)
            vi = v[ks:ke].repeat_interleave(groups, dim=1).transpose(0, 1)
            mask = None
            if causal:  # query r sees keys up to r + (Lk - Lq): bottom-right aligned
                lq, lk = qe - qs, ke - ks
                mask = (torch.arange(lk)[None, :]
                        <= torch.arange(lq)[:, None] + (lk - lq))
            out[qs:qe] = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=softmax_scale).transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    # transformers probes for the package (find_spec, then its metadata): a spec without a
    # distribution keeps it reporting flash-attn as absent, so it never calls the stand-in.
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def source_problem(src: Path) -> str | None:
    """Why `src` (a checkout, or a bare git mirror) cannot give the authors' files, or None."""
    if all((src / part).exists() for part in AUTHORS_FILES):
        return None
    if not (src / "HEAD").is_file():
        return f"{src} is neither a checkout of the authors' repository nor a git mirror"
    if shutil.which("git") is None:
        return f"{src} is a git mirror and git is not installed"
    return None


def import_authors(src: Path) -> str | None:
    """Put a float32 copy of the authors' code on sys.path (see the module docstring);
    returns the mirror's commit, or None for a checkout."""
    copy = Path(tempfile.mkdtemp(prefix="bagel_src_fp32_"))
    revision = None
    if all((src / part).exists() for part in AUTHORS_FILES):
        for part in AUTHORS_FILES:
            (shutil.copytree if (src / part).is_dir() else shutil.copy)(src / part, copy / part)
    else:  # a bare mirror: the files of its HEAD
        git = ["git", "--git-dir", str(src)]
        revision = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                                  text=True).stdout.strip()
        archive = subprocess.run([*git, "archive", "HEAD", *AUTHORS_FILES], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    for name in ("qwen2_navit.py", "siglip_navit.py"):
        path = copy / "modeling" / "bagel" / name
        text, n = re.subn(r"torch\.bfloat16", "torch.float32", path.read_text())
        print(f"patched {n} bfloat16 casts in {name}", file=sys.stderr)
        path.write_text(text)
    sys.modules["flash_attn"] = flash_attn_standin()
    sys.path.insert(0, str(copy))
    return revision


class GivenPixels:
    """An `ImageTransform` stand-in: returns the pixels set for that encoder. Its
    `resize_transform` (the VAE rule's resize the inferencer runs first) returns the image
    as it is: callers hand in images that are fixed points of that rule."""

    pixels: torch.Tensor | None = None

    def __call__(self, image) -> torch.Tensor:
        assert self.pixels is not None
        return self.pixels.clone()

    def resize_transform(self, image):
        return image


class GivenTokens:
    """`encode` returning our ids for the prompts (the tokenizer is not under test)."""

    def __init__(self, ids: dict[str, list[int]]):
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return list(self.ids[text])


def build(ckpt: Path):
    """The authors' `Bagel` and `AutoEncoder` with `ckpt`'s weights, float32, as their app.py
    builds them (the ViT's last layer dropped, its patch conv turned linear)."""
    from modeling.autoencoder import AutoEncoder, AutoEncoderParams
    from modeling.bagel import (
        Bagel,
        BagelConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from safetensors.torch import load_file

    top = json.loads((ckpt / "config.json").read_text())
    llm_config = Qwen2Config.from_json_file(str(ckpt / "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(str(ckpt / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    vae = top["vae_config"]
    vae_params = AutoEncoderParams(
        resolution=256, in_channels=vae["in_channels"], ch=vae["ch"], out_ch=vae["out_ch"],
        ch_mult=list(vae["ch_mult"]), num_res_blocks=vae["num_res_blocks"],
        z_channels=vae["z_channels"], scale_factor=vae["scale_factor"],
        shift_factor=vae["shift_factor"], downsample=2 ** (len(vae["ch_mult"]) - 1))
    config = BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
        vae_config=vae_params, vit_max_num_patch_per_side=top["vit_max_num_patch_per_side"],
        connector_act=top["connector_act"], latent_patch_size=top["latent_patch_size"],
        max_latent_size=top["max_latent_size"], interpolate_pos=top["interpolate_pos"])
    language_model = Qwen2ForCausalLM(llm_config)
    vit_model = SiglipVisionModel(vit_config)
    model = Bagel(language_model, vit_model, config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "ema.safetensors")),
                                                strict=False)
    # Only the rotary tables' buffers are not in the checkpoint.
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    ae = AutoEncoder(vae_params)
    ae.load_state_dict(load_file(str(ckpt / "ae.safetensors")), strict=True)
    return model.float().eval(), ae.float().eval()


def new_token_ids(specials: dict[str, int]) -> dict[str, int]:
    """The authors' `new_token_ids` from our tokenizer's `bagel_ids`."""
    return {"bos_token_id": specials["bos"], "eos_token_id": specials["eos"],
            "start_of_image": specials["start_of_image"],
            "end_of_image": specials["end_of_image"]}


def inferencer(model, ae, token_ids: dict[str, list[int]], specials: dict[str, int]):
    """The authors' `InterleaveInferencer` on handed-in tokens and pixels: (inferencer, VAE
    pixels, ViT pixels), the last two to set before each request."""
    from inferencer import InterleaveInferencer

    vae, vit = GivenPixels(), GivenPixels()
    return InterleaveInferencer(model, ae, GivenTokens(token_ids), vae_transform=vae,
                                vit_transform=vit,
                                new_token_ids=new_token_ids(specials)), vae, vit


def understand(infer, question: str, image, new_tokens: int) -> tuple[float, float, int]:
    """Greedy answer to `question` about `image` (ViT only, as the inferencer's
    understanding mode), `new_tokens` of them whatever they are: (first token's time,
    last token's time, tokens). Each forward of `generate_text` yields one token."""
    model = infer.model
    first: list[float] = []

    def stamp(*_) -> None:  # returns None: a forward hook's value would replace the logits
        if not first:
            first.append(time.perf_counter())

    hook = model.language_model.lm_head.register_forward_hook(stamp)
    try:
        with torch.no_grad():
            context = infer.update_context_image(image, infer.init_gen_context(), vae=False)
            context = infer.update_context_text(question, context)
            start = model.prepare_start_tokens(context["kv_lens"], context["ropes"],
                                               infer.new_token_ids)
            model.generate_text(past_key_values=context["past_key_values"],
                                max_length=new_tokens, do_sample=False, end_token_id=None,
                                **start)
    finally:
        hook.remove()
    return first[0], time.perf_counter(), new_tokens


def sequential_level(concurrency: int, per_client: int,
                     one: Callable[[int], tuple[float, float, int]]) -> list[list[float]]:
    """`concurrency` clients each sending `per_client` requests back to back (request j of
    client i has seed 1000 i + j, as `bench_bagel.level`), served one at a time in arrival
    order: [submitted, first, done, tokens] per request, where a client's first request
    arrives at the level's start and its next one when the previous one is done."""
    arrival = [time.perf_counter()] * concurrency
    timings: list[list[float]] = []
    for j in range(per_client):
        for i in range(concurrency):
            first, done, tokens = one(1000 * i + j)
            timings.append([arrival[i], first, done, tokens])
            arrival[i] = done
    return timings


def bench(spec: dict[str, Any]) -> dict[str, Any]:
    """Times `spec`'s levels (see `bench_bagel.reference_rows`): per task and concurrency,
    `repeat` rounds of `sequential_level` timings."""
    from PIL import Image
    from safetensors.torch import load_file

    revision = import_authors(Path(spec["source"]))
    torch.set_num_threads(spec["threads"])
    pixels = load_file(spec["pixels"])
    model, ae = build(Path(spec["checkpoint"]))
    infer, vae, vit = inferencer(model, ae, spec["token_ids"], spec["special_ids"])

    def image(kind: str, seed: int):
        vit.pixels, vae.pixels = pixels[f"{kind}.vit.{seed}"], pixels.get(f"{kind}.vae.{seed}")
        return Image.new("RGB", tuple(spec["image_sizes"][kind]))

    def chat(seed: int) -> tuple[float, float, int]:
        return understand(infer, spec["question"], image("chat", seed), spec["new_tokens"])

    def paint(seed: int, edit: bool) -> tuple[float, float, int]:
        knobs = dict(spec["knobs"]["edit" if edit else "text2image"])
        prompt = spec["image_prompt"].format(seed=seed)
        inputs = [image("edit", seed), prompt] if edit else [prompt]
        images = infer.interleave_inference(inputs, image_shapes=tuple(spec["output_shape"]),
                                            num_timesteps=spec["steps"], **knobs)
        assert len(images) == 1 and isinstance(images[0], Image.Image)
        done = time.perf_counter()
        return done, done, 0

    tasks = {"image2text": (chat, spec["chat_levels"]),
             "text2image": (lambda s: paint(s, False), spec["image_levels"]),
             "edit": (lambda s: paint(s, True), spec["image_levels"])}
    chat(0)  # warm-up, as the served layouts get
    paint(0, True)
    levels = {task: {str(c): [sequential_level(c, spec["requests_per_client"], one)
                              for _ in range(spec["repeat"])] for c in cs}
              for task, (one, cs) in tasks.items()}
    return {"revision": revision, "threads": torch.get_num_threads(), "levels": levels}


if __name__ == "__main__":
    print(json.dumps(bench(json.loads(Path(sys.argv[1]).read_text()))))
