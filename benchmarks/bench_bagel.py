"""BAGEL served by mstar on one rank (`bagel_single_gpu`) and with classifier-free guidance
in parallel on three ranks (`bagel_cfg_parallel`), on the same `small` weights, side by
side: image-to-text time to first token and decode tokens/s at 1 and 16 concurrent
requests, and time per generated image (text-to-image and edit) at 1 and 4, with the
layouts' ratios.

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

    python benchmarks/bench_bagel.py            # ~4 minutes on 2 cores
    python benchmarks/bench_bagel.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from bench_serving import generate_events, launch
from PIL import Image

from mstar import events
from mstar_bagel.checkpoint import write_tiny_checkpoint

LAYOUTS = {"1 rank": "bagel_single_gpu", "CFG-parallel 3 ranks": "bagel_cfg_parallel"}
QUESTION = "Describe this picture in detail, please."
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
        head = f"{self.layout:<21} {self.task:<10} {self.concurrency:>4} {len(self.timings):>4}"
        if self.task in IMAGE_TASKS:
            return (f"{head} {'':>9} {'':>8} {'':>8} {self.image_s():>9.2f} "
                    f"{self.wall_per_image():>10.2f}")
        return (f"{head} {self.ttft_ms():>9.0f} {self.tpot_ms():>8.1f} "
                f"{self.tokens_per_s():>8.1f}")


HEADER = (f"{'layout':<21} {'task':<10} {'conc':>4} {'reqs':>4} {'TTFT ms':>9} {'TPOT ms':>8} "
          f"{'tok/s':>8} {'s/image':>9} {'wall/img s':>10}")


def png_data_url(seed: int, width: int, height: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def understand(client: httpx.AsyncClient, seed: int, new_tokens: int) -> Timing:
    """An image-to-text request: the first token's time and the tokens received."""
    body = {"prompt": QUESTION, "image": png_data_url(seed, 64, 48), "max_tokens": new_tokens,
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
    body = {"mode": "image", "prompt": f"a cat in a hat, picture {seed}", "seed": seed,
            "num_timesteps": steps}
    if edit:
        body["image"] = png_data_url(seed, 64, 64)
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

    with launch(["--config", config, "--model-path", str(ckpt), "--log-level", "WARNING",
                 "--set", "max_seq_len=4096"], tmp) as server:
        asyncio.run(level(server.url, 1, 1, chat))  # warm-up: every node's first forward
        asyncio.run(level(server.url, 1, 1, edit))
        for task, fn, levels in (("image2text", chat, args.chat_levels),
                                 ("text2image", text2image, args.image_levels),
                                 ("edit", edit, args.image_levels)):
            for c in levels:
                rounds = [Row(layout, task, c, asyncio.run(
                    level(server.url, c, args.requests_per_client, fn)))
                    for _ in range(args.repeat)]
                rows.append(min(rounds, key=lambda r: r.wall))  # load only ever slows one
                print(rows[-1].line(), flush=True)
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
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n{HEADER}")
    for r in rows:
        print(r.line())
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


if __name__ == "__main__":
    main()
