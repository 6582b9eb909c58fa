"""Tensor parallelism's overhead on the CPU: BAGEL's LLM decoding text on one rank
(`bagel_single_gpu`) versus sharded over two (`bagel_tp2`, gloo), served, side by side.

Why: on a machine with few cores TP cannot speed a decode step up (two ranks share the
cores one rank already used), but it adds per step the leader's `TPStep` message to the
follower and two all-reduces per layer. This measures what that costs, per decode step: the
client's time per output token (TPOT: time between streamed tokens) at 1 and `--streams`
concurrent greedy streams, and the mean forward time per LLM step each rank reports
(`mstar_step_seconds`). Expect TP2 to be slower here; the ratio is the overhead, not a
speed-up a multi-GPU machine would see.

    python benchmarks/bench_tp.py                    # small preset, ~2 minutes on 2 cores
    python benchmarks/bench_tp.py --preset tiny --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_serving import generate_events, launch
from prometheus_client.parser import text_string_to_metric_families

from mstar import events

LAYOUTS = {"TP1": "bagel_single_gpu", "TP2": "bagel_tp2"}


@dataclass
class Figures:
    """One layout's decode figures (milliseconds)."""

    tpot: dict[int, float]  # streams -> median time per output token after the first
    forward: dict[int, float]  # rank -> mean forward time per LLM step, 1 stream


async def stream_tpot(client: httpx.AsyncClient, seed: int, tokens: int) -> float:
    """One greedy text stream's time per token after its first (s)."""
    body = {"prompt": f"describe a quiet morning, take {seed}", "mode": "text",
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    first = last = None
    count = 0
    async for event in generate_events(client, body):
        if isinstance(event, events.TextDelta) and event.token_ids:
            last = time.perf_counter()
            first = first or last
            count += len(event.token_ids)
    if count != tokens:
        raise RuntimeError(f"asked {tokens} tokens, got {count}")
    return (last - first) / (tokens - 1)


async def level(url: str, streams: int, tokens: int) -> float:
    """Median time per token (ms) of `streams` concurrent streams: each decode step gives
    every stream a token, so it is the decode step's time."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        tpots = await asyncio.gather(*(stream_tpot(client, i, tokens) for i in range(streams)))
    return 1000 * statistics.median(tpots)


def forward_ms(url: str) -> dict[int, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {int(s.labels["rank"]): 1000 * s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "mstar_step_seconds" and s.labels.get("node") == "LLM"}


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Figures]:
    """Both layouts served at once, their rounds alternating (TP1, TP2, TP1, ...) so that
    the machine's load hits both alike; each figure keeps its best round."""
    options = ["--preset", args.preset, "--load-format", "dummy", "--log-level", "WARNING",
               "--tensor-comm-protocol", "SHM", "--set", "max_seq_len=2048",
               "--set", "kv_cache.num_pages=512"]
    figures = {name: Figures({}, {}) for name in LAYOUTS}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(launch(["--config", config, *options], tmp)).url
                for name, config in LAYOUTS.items()}
        for url in urls.values():
            asyncio.run(level(url, 1, 8))  # warm-up
        for _ in range(args.repeat):
            for streams in (1, args.streams):
                for name, url in urls.items():
                    got, ms = figures[name], asyncio.run(level(url, streams, args.tokens))
                    got.tpot[streams] = min(ms, got.tpot.get(streams, ms))
                    if streams == 1:  # the report of the steps just run (a node idle
                        for rank, ms in forward_ms(url).items():  # since keeps its last)
                            got.forward[rank] = min(ms, got.forward.get(rank, ms))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=8, help="the concurrent level")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is kept")
    parser.add_argument("--quick", action="store_true", help="16 tokens, one round")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeat = 16, 1
    import torch

    print(f"BAGEL {args.preset} (dummy weights), text decode, {args.tokens} tokens/stream; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args, Path(tmp))
    one, two = figures["TP1"], figures["TP2"]
    print(f"{'decode step (ms)':<34}{'TP1':>10}{'TP2':>10}{'TP2/TP1':>10}")
    for streams in one.tpot:
        print(f"{f'client TPOT, {streams} stream(s)':<34}{one.tpot[streams]:>10.2f}"
              f"{two.tpot[streams]:>10.2f}{two.tpot[streams] / one.tpot[streams]:>10.2f}")
    for rank in sorted(two.forward):
        base = one.forward.get(0, float("nan"))
        print(f"{f'LLM forward/step, 1 stream, rank {rank}':<34}{base:>10.2f}"
              f"{two.forward[rank]:>10.2f}{two.forward[rank] / base:>10.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
