"""Chat with one image over the OpenAI route: what the encoder-output cache and prefix
caching buy when clients repeat the same image and system prompt.

Each request is `POST /v1/chat/completions` (streamed) with a long system prompt, then a
user message holding the same image and a question of its own. Two `mstar-serve`s on the
same weights, one after the other: caches on (the default) and off
(`kv_cache.enable_prefix_caching=false`, `encoder_cache_bytes=0`). For 1 and 16 concurrent
clients it prints time to first token (the first chunk carrying a token) and output tokens/s side
by side, the ratios, and the server's cache counters (from /metrics) for the cached run.

    python benchmarks/bench_chat.py            # ~3 minutes on 2 cores
    python benchmarks/bench_chat.py --quick    # smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import msgspec
from bench_inprocess import Row, Timing, print_table
from bench_serving import launch, summarize
from PIL import Image

from mstar_testvla.checkpoint import write_tiny_checkpoint
from mstar_testvla.config import PRESETS

CACHED, UNCACHED = "caches on", "caches off"
OFF = ["--set", "kv_cache.enable_prefix_caching=false", "--set", "encoder_cache_bytes=0"]
COUNTERS = ("mstar_prefix_cache_hit_tokens_total", "mstar_prompt_tokens_computed_total",
            "mstar_encoder_cache_hits_total")


def image_url(seed: int) -> str:
    """A PNG of random pixels as a data URL (random pixels: a real image's bytes)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (64, 48))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                 for _ in range(64 * 48)])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(system: str, image: str, question: str, new_tokens: int) -> dict:
    return {"model": "testvla", "stream": True, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": question}]}]}


async def stream_chat(client: httpx.AsyncClient, body: dict) -> Timing:
    """One streamed chat: when its first token came (a chunk with logprobs: a token's
    text may still be held back as an incomplete character) and the tokens received (the
    usage chunk's count)."""
    submitted = time.perf_counter()
    first, tokens, reason = 0.0, 0, ""
    body = {**body, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = msgspec.json.decode(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"chat failed: {chunk['error']}")
            for choice in chunk["choices"]:
                if (choice.get("logprobs") or {}).get("content") and not first:
                    first = time.perf_counter()
                reason = choice["finish_reason"] or reason
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Timing(submitted, first or time.perf_counter(), time.perf_counter(), tokens,
                  reason)


async def clients(url: str, system: str, concurrency: int, per_client: int,
                  new_tokens: int, image: str, label: str) -> Row:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(index: int) -> list[Timing]:
            return [await stream_chat(client, chat_body(
                system, image, f"question {index}-{j}: what is in the picture?",
                new_tokens)) for j in range(per_client)]

        per = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return summarize(label, concurrency, [t for ts in per for t in ts], new_tokens)


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--system-chars", type=int, default=600,
                   help="length of the shared system prompt (one token per byte)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="back-to-back requests per client (default 3, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.requests_per_client is None:
        args.requests_per_client = 1 if args.quick else 3
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    system = "".join(rng.choice("abcdefghij klmnop qrstuv wxyz.") for _ in
                     range(args.system_chars))
    image = image_url(args.seed)
    rows: list[Row] = []
    used: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_tiny_checkpoint(ckpt, preset=args.preset, seed=args.seed)
        for label, extra in ((UNCACHED, OFF), (CACHED, [])):
            with launch(["--config", "testvla_single", "--preset", args.preset,
                         "--model-path", str(ckpt), "--log-level", "WARNING", "--set",
                         "max_seq_len=1024", *extra], Path(tmp)) as server:
                url = server.url
                asyncio.run(clients(url, system, 1, 1, args.new_tokens, image_url(999),
                                    "warm-up"))
                before = counters(url)
                for level in (1, 16):
                    rows.append(asyncio.run(clients(url, system, level,
                                                    args.requests_per_client,
                                                    args.new_tokens, image, label)))
                    print(f"{label} x{level}: {rows[-1].tok_s:.1f} tok/s, TTFT "
                          f"{rows[-1].ttft_ms:.0f} ms", flush=True)
                if label == CACHED:
                    after = counters(url)
                    used = {k: after[k] - before[k] for k in COUNTERS}
    print(f"\npreset {args.preset!r}, system prompt {args.system_chars} tokens, one 16x16 "
          f"image (16 tokens), {args.new_tokens} new tokens, greedy")
    print_table(rows)
    for level in (1, 16):
        on = next(r for r in rows if r.system == CACHED and r.concurrency == level)
        off = next(r for r in rows if r.system == UNCACHED and r.concurrency == level)
        print(f"x{level}: caches on / off: tok/s {on.tok_s / off.tok_s:.2f}x, TTFT "
              f"{off.ttft_ms / on.ttft_ms:.2f}x faster")
    print("cached run's counters over the measured requests: " +
          ", ".join(f"{k.removeprefix('mstar_')} {v:.0f}" for k, v in used.items()))


if __name__ == "__main__":
    main()
