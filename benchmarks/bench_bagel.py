"""BAGEL served by mstar on one rank (`bagel_single_gpu`) and with classifier-free guidance
in parallel on three ranks (`bagel_cfg_parallel`), on the same `small` weights, side by
side: image-to-text time to first token and decode tokens/s at 1 and 16 concurrent
requests, and time per generated image (text-to-image and edit) at 1 and 4, with the
layouts' ratios; then the same requests through the authors' code (`bagel_reference.py`,
run by the side venv's python on the same checkpoint), with the ratios mstar / authors'.

Both layouts run as `mstar-serve` processes (API server, data worker, conductor, one worker
per rank; the launcher splits the cores between the ranks), one after the other, every
request a streamed `POST /generate`. Each understanding request reads an image of its own
(a seeded random PNG), so neither the encoder cache nor the prefix cache answers for it.
Image requests use the authors' defaults: text-to-image guides by text on the steps with
t in (0.4, 1] (its image-free context equals the full one and is not run: CFG-parallel's
third rank idles), an edit runs all three contexts on every step.

The servers run with `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it: on a small
shared machine a 2-thread OpenMP team that spin-waits collapses under others' load (one
rank gets both cores, three ranks one each, so the spin-waits would slow only the one-rank
layout: 8x on identical understanding work in a trial at load 11).

The authors' code serves one request at a time (no batching, no server): at concurrency c
its row is the c clients' requests run one after another in arrival order, each counted from
its arrival (a client's first request arrives at the level's start, its next when the
previous one is done), so its TTFT and s/image include the queueing a sequential server
would impose, and its wall/image is one request's time. It gets our tokens and encoder pixels
(no tokenizer or image transform in its timings), all the cores, and the same sampler knobs;
its text-to-image runs the image-free context the served layouts skip (equal to the full
one, the same image). Without the side venv or the authors' sources its rows say
"not available" and the rest runs.

    python benchmarks/bench_bagel.py            # ~5 minutes on 2 cores
    python benchmarks/bench_bagel.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from bagel_reference import DEFAULT_SOURCE, DEFAULT_VENV, source_problem
from bench_serving import generate_events, launch
from PIL import Image
from safetensors.torch import save_file

from mstar import events
from mstar_bagel.checkpoint import write_tiny_checkpoint
from mstar_bagel.config import PRESETS, BagelConfig
from mstar_bagel.model import GENERATION_DEFAULTS, BagelRequest
from mstar_bagel.tokenizer import load_tokenizer
from mstar_bagel.transforms import image_transform, resized_size

LAYOUTS = {"1 rank": "bagel_single_gpu", "CFG-parallel 3 ranks": "bagel_cfg_parallel"}
REFERENCE = "authors' code, sequential"
QUESTION = "Describe this picture in detail, please."
IMAGE_PROMPT = "a cat in a hat, picture {seed}"
CHAT_IMAGE, EDIT_IMAGE = (64, 48), (64, 64)  # (width, height); an edit outputs its size
IMAGE_TASKS = ("text2image", "edit")


@dataclass
class Timing:
    submitted: float
    first: float  # first token (understanding) or the image (generation)
    done: float
    tokens: int


@dataclass
class Row:
    layout: str
    task: str
    concurrency: int
    timings: list[Timing]

    @property
    def wall(self) -> float:
        return max(t.done for t in self.timings) - min(t.submitted for t in self.timings)

    def ttft_ms(self) -> float:
        return 1000 * statistics.mean(t.first - t.submitted for t in self.timings)

    def tpot_ms(self) -> float:
        return 1000 * statistics.mean((t.done - t.first) / (t.tokens - 1)
                                      for t in self.timings)

    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall

    def image_s(self) -> float:
        """Mean seconds from a request's submission to its image."""
        return statistics.mean(t.done - t.submitted for t in self.timings)

    def wall_per_image(self) -> float:
        return self.wall / len(self.timings)

    def line(self) -> str:
        head = f"{self.layout:<25} {self.task:<10} {self.concurrency:>4} {len(self.timings):>4}"
        if self.task in IMAGE_TASKS:
            return (f"{head} {'':>9} {'':>8} {'':>8} {self.image_s():>9.2f} "
                    f"{self.wall_per_image():>10.2f}")
        return (f"{head} {self.ttft_ms():>9.0f} {self.tpot_ms():>8.1f} "
                f"{self.tokens_per_s():>8.1f}")


HEADER = (f"{'layout':<25} {'task':<10} {'conc':>4} {'reqs':>4} {'TTFT ms':>9} {'TPOT ms':>8} "
          f"{'tok/s':>8} {'s/image':>9} {'wall/img s':>10}")


def fastest(rounds: list[Row]) -> Row:
    """The round with the least wall time: load only ever slows one."""
    return min(rounds, key=lambda r: r.wall)


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def png_data_url(seed: int, size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def understand(client: httpx.AsyncClient, seed: int, new_tokens: int) -> Timing:
    """An image-to-text request: the first token's time and the tokens received."""
    body = {"prompt": QUESTION, "image": png_data_url(seed, CHAT_IMAGE), "max_tokens": new_tokens,
            "ignore_eos": True, "temperature": 0}
    submitted, first, tokens = time.perf_counter(), 0.0, 0
    async for event in generate_events(client, body):
        if isinstance(event, events.TextDelta) and event.token_ids:
            first = first or time.perf_counter()
            tokens += len(event.token_ids)
    if tokens != new_tokens:
        raise RuntimeError(f"understanding: {tokens} tokens, asked {new_tokens}")
    return Timing(submitted, first, time.perf_counter(), tokens)


async def paint(client: httpx.AsyncClient, seed: int, steps: int, edit: bool) -> Timing:
    """A text-to-image request, or an edit of a 64x64 image; the PNG is checked."""
    body = {"mode": "image", "prompt": IMAGE_PROMPT.format(seed=seed), "seed": seed,
            "num_timesteps": steps}
    if edit:
        body["image"] = png_data_url(seed, EDIT_IMAGE)
    submitted = time.perf_counter()
    images = [e async for e in generate_events(client, body) if isinstance(e, events.Image)]
    done = time.perf_counter()
    if len(images) != 1:
        raise RuntimeError(f"image generation returned {len(images)} images")
    Image.open(io.BytesIO(images[0].data)).verify()
    return Timing(submitted, done, done, 0)


async def level(url: str, concurrency: int, per_client: int,
                one: Callable[[httpx.AsyncClient, int], Awaitable[Timing]]) -> list[Timing]:
    """`concurrency` clients at once, each sending `per_client` requests back to back."""
    async def client_loop(client: httpx.AsyncClient, index: int) -> list[Timing]:
        return [await one(client, 1000 * index + j) for j in range(per_client)]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        runs = await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
    return [t for ts in runs for t in ts]


def run_layout(layout: str, config: str, ckpt: Path, tmp: Path,
               args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []

    def chat(client: httpx.AsyncClient, seed: int) -> Awaitable[Timing]:
        return understand(client, seed, args.new_tokens)

    def text2image(client: httpx.AsyncClient, seed: int) -> Awaitable[Timing]:
        return paint(client, seed, args.steps, edit=False)

    def edit(client: httpx.AsyncClient, seed: int) -> Awaitable[Timing]:
        return paint(client, seed, args.steps, edit=True)

    threads = ["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []
    with launch(["--config", config, "--model-path", str(ckpt), "--log-level", "WARNING",
                 "--set", "max_seq_len=4096", *threads], tmp) as server:
        asyncio.run(level(server.url, 1, 1, chat))  # warm-up: every node's first forward
        asyncio.run(level(server.url, 1, 1, edit))
        for task, fn, levels in (("image2text", chat, args.chat_levels),
                                 ("text2image", text2image, args.image_levels),
                                 ("edit", edit, args.image_levels)):
            for c in levels:
                rounds = [Row(layout, task, c, asyncio.run(
                    level(server.url, c, args.requests_per_client, fn)))
                    for _ in range(args.repeat)]
                rows.append(fastest(rounds))
                print(rows[-1].line(), flush=True)
    return rows


def encoder_pixels(seed: int, size: tuple[int, int], config: BagelConfig,
                   edit: bool) -> dict[str, torch.Tensor]:
    """The encoders' inputs of request `seed`'s image, as the served model computes them: the
    image resized by the VAE rule, then each encoder's transform."""
    image = random_image(seed, size)
    image = image.resize(resized_size(*image.size, *config.vae_transform))
    pixels = {"vit": image_transform(image, *config.vit_transform)}
    if edit:
        assert image.size == size, "the authors' edit outputs the resized image's size"
        pixels["vae"] = image_transform(image, *config.vae_transform)
    return pixels


def reference_rows(ckpt: Path, tmp: Path, args: argparse.Namespace) -> list[Row] | str:
    """The same requests through the authors' code in the side venv (see the module
    docstring), or the reason it does not run."""
    python = args.bagel_venv / "bin" / "python"
    if not python.is_file():
        return f"no side venv at {args.bagel_venv} (benchmarks/README.md, BAGEL, builds it)"
    problem = source_problem(args.bagel_src)
    if problem:
        return problem
    def seeds(levels: Sequence[int]) -> list[int]:  # as `level` numbers the requests
        return [1000 * i + j for i in range(max(levels)) for j in range(args.requests_per_client)]

    config, tok = BagelConfig(**PRESETS["small"]), load_tokenizer(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    for kind, size, levels in (("chat", CHAT_IMAGE, args.chat_levels),
                               ("edit", EDIT_IMAGE, args.image_levels)):
        for seed in seeds(levels):
            for encoder, pixels in encoder_pixels(seed, size, config, kind == "edit").items():
                tensors[f"{kind}.{encoder}.{seed}"] = pixels.contiguous()
    save_file(tensors, str(tmp / "reference_pixels.safetensors"))
    prompts = [QUESTION] + [IMAGE_PROMPT.format(seed=s) for s in seeds(args.image_levels)]
    shift = BagelRequest.model_fields["timestep_shift"].default
    spec = {
        "source": str(args.bagel_src), "checkpoint": str(ckpt), "threads": os.cpu_count(),
        "pixels": str(tmp / "reference_pixels.safetensors"), "question": QUESTION,
        "image_prompt": IMAGE_PROMPT, "new_tokens": args.new_tokens, "steps": args.steps,
        "token_ids": {p: tok.encode(p, add_special_tokens=False) for p in prompts},
        "special_ids": dict(tok.bagel_ids),
        "image_sizes": {"chat": CHAT_IMAGE, "edit": EDIT_IMAGE},
        "output_shape": config.image_size_pairs()[0][::-1],  # text-to-image's default size
        "knobs": {task: {**GENERATION_DEFAULTS[key], "timestep_shift": shift}
                  for task, key in (("text2image", "generate"), ("edit", "edit"))},
        "chat_levels": args.chat_levels, "image_levels": args.image_levels,
        "requests_per_client": args.requests_per_client, "repeat": args.repeat,
    }
    (tmp / "reference_spec.json").write_text(json.dumps(spec))
    done = subprocess.run([str(python), str(Path(__file__).with_name("bagel_reference.py")),
                           str(tmp / "reference_spec.json")], capture_output=True, text=True)
    if done.returncode:
        return f"the authors' code failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"authors' code at {result['revision'] or args.bagel_src}, "
          f"{result['threads']} threads", flush=True)
    rows = [fastest([Row(REFERENCE, task, int(c), [Timing(*t) for t in timings])
                     for timings in rounds])
            for task, by_level in result["levels"].items() for c, rounds in by_level.items()]
    for r in rows:
        print(r.line(), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--new-tokens", type=int, default=None, help="understanding (default 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="num_timesteps of an image (default 25; quick 6)")
    p.add_argument("--requests-per-client", type=int, default=None, help="default 2; quick 1")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds per level, the fastest kept (default 2; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of every rank (mstar serve --cpu-threads); default: "
                        "the cores divided among the ranks, which differs by layout")
    p.add_argument("--bagel-venv", type=Path, default=DEFAULT_VENV,
                   help="the side venv that runs the authors' code (default %(default)s)")
    p.add_argument("--bagel-src", type=Path, default=DEFAULT_SOURCE,
                   help="the authors' repository: a checkout or a bare git mirror "
                        "(default %(default)s)")
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.steps = args.steps or (6 if args.quick else 25)
    args.requests_per_client = args.requests_per_client or (1 if args.quick else 2)
    args.repeat = args.repeat or (1 if args.quick else 2)
    args.chat_levels, args.image_levels = (1, 16), (1, 4)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the servers inherit it
    print(f"bagel small preset, CPU: {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"understanding {args.new_tokens} greedy tokens of a "
          f"64x48 image; images 64x64, {args.steps - 1} steps",
          flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", preset="small", seed=args.seed)
        for layout, config in LAYOUTS.items():
            rows += run_layout(layout, config, ckpt, Path(tmp), args)
        reference = reference_rows(ckpt, Path(tmp), args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n{HEADER}")
    for r in rows + (reference if isinstance(reference, list) else []):
        print(r.line())
    if isinstance(reference, str):
        print(f"{REFERENCE:<25} not available: {reference}")
    single, parallel = LAYOUTS
    by = {(r.layout, r.task, r.concurrency): r for r in rows}
    print("\nCFG-parallel / 1 rank:")
    for c in args.chat_levels:
        a, b = by[(single, "image2text", c)], by[(parallel, "image2text", c)]
        print(f"  image2text x{c:<3} TTFT {b.ttft_ms() / a.ttft_ms():.2f}, "
              f"tok/s {b.tokens_per_s() / a.tokens_per_s():.2f}")
    for task in IMAGE_TASKS:
        for c in args.image_levels:
            a, b = by[(single, task, c)], by[(parallel, task, c)]
            print(f"  {task:<10} x{c:<3} s/image {b.image_s() / a.image_s():.2f}, "
                  f"wall/image {b.wall_per_image() / a.wall_per_image():.2f} "
                  f"(< 1: CFG-parallel is faster)")

    if isinstance(reference, list):
        ref = {(r.task, r.concurrency): r for r in reference}
        print(f"\nmstar / {REFERENCE} (TTFT, s/image, wall/image: < 1 is mstar faster; "
              "tok/s: > 1):")
        for r in rows:
            a = ref[(r.task, r.concurrency)]
            if r.task in IMAGE_TASKS:
                print(f"  {r.layout:<21} {r.task:<10} x{r.concurrency:<3} s/image "
                      f"{r.image_s() / a.image_s():.2f}, wall/image "
                      f"{r.wall_per_image() / a.wall_per_image():.2f}")
            else:
                print(f"  {r.layout:<21} {r.task:<10} x{r.concurrency:<3} TTFT "
                      f"{r.ttft_ms() / a.ttft_ms():.2f}, tok/s "
                      f"{r.tokens_per_s() / a.tokens_per_s():.2f}")


if __name__ == "__main__":
    main()
