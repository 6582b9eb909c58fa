"""Qwen3-Omni served by mstar, co-located (`qwen3omni_colocated`: every part on one rank)
versus split (`qwen3omni_2gpu`: encoders and Thinker on rank 1, Talker and Code2Wav on
rank 0), on the same `small` preset with dummy weights, side by side: time to the first
text token, time to the first audio packet and audio-seconds per wall-second at 1, 4 and
16 concurrent spoken requests, then TTFA at 16 streams over TTFA at 1 (flat is the goal).

Every request is a streamed `POST /generate` asking for text and audio. Dummy weights never
choose to stop, so every request writes exactly `--text-tokens` text tokens and speaks
exactly `--frames` codec frames (`ignore_eos`, `talker_max_tokens`): the two layouts do the
same work. Both run as `mstar-serve` processes (API server, data worker, conductor, one
worker per rank), one after the other.

    python benchmarks/bench_qwen3omni.py            # a few minutes on 2 cores
    python benchmarks/bench_qwen3omni.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_serving import generate_events, launch

from mstar import events

TEXT = "Tell me a short story about a lighthouse keeper and a storm."
LAYOUTS = {"co-located (1 rank)": "qwen3omni_colocated", "split (2 ranks)": "qwen3omni_2gpu"}


@dataclass
class Result:
    system: str
    concurrency: int
    ttft_ms: float  # mean time to the first text token
    ttfa_ms: float  # mean time to the first audio packet
    audio_per_wall: float  # audio seconds produced per wall second, all requests

    def row(self) -> str:
        return (f"{self.system:<22} {self.concurrency:>4} {self.ttft_ms:>9.0f} "
                f"{self.ttfa_ms:>9.0f} {self.audio_per_wall:>8.3f}")


async def speak(client: httpx.AsyncClient, args: argparse.Namespace,
                seed: int) -> tuple[float, float, float]:
    """One streamed spoken request: (s to the first text, s to the first audio, audio s)."""
    body = {"prompt": TEXT, "modalities": ["text", "audio"], "max_tokens": args.text_tokens,
            "ignore_eos": True, "talker_max_tokens": args.frames + 1, "seed": seed}
    start = time.perf_counter()
    first_text = first_audio = 0.0
    seconds = 0.0
    async for event in generate_events(client, body):
        now = time.perf_counter()
        if isinstance(event, events.TextDelta) and not first_text:
            first_text = now
        elif isinstance(event, events.AudioChunk):
            first_audio = first_audio or now
            seconds += len(event.samples.data) / 4 / event.sample_rate
    return first_text - start, first_audio - start, seconds


async def clients(url: str, concurrency: int, args: argparse.Namespace,
                  system: str) -> Result:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        wall = time.perf_counter()
        runs = await asyncio.gather(*(speak(client, args, 100 * i + concurrency)
                                      for i in range(concurrency)))
        wall = time.perf_counter() - wall
    return Result(system, concurrency, 1000 * statistics.mean(r[0] for r in runs),
                  1000 * statistics.mean(r[1] for r in runs),
                  sum(r[2] for r in runs) / wall)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="small")
    p.add_argument("--text-tokens", type=int, default=None, help="default 48 (quick 12)")
    p.add_argument("--frames", type=int, default=None,
                   help="codec frames spoken per request (default 48, quick 12)")
    args = p.parse_args(argv)
    args.text_tokens = args.text_tokens or (12 if args.quick else 48)
    args.frames = args.frames or (12 if args.quick else 48)
    levels = (1, 4) if args.quick else (1, 4, 16)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for system, config in LAYOUTS.items():
            with launch(["--config", config, "--preset", args.preset, "--load-format",
                         "dummy", "--log-level", "WARNING"], Path(tmp)) as server:
                asyncio.run(clients(server.url, 1, args, "warm-up"))
                for level in levels:
                    results.append(asyncio.run(clients(server.url, level, args, system)))
                    print(results[-1].row(), flush=True)
    print(f"\n{args.text_tokens} text tokens and {args.frames} codec frames per request, "
          f"preset {args.preset}")
    print(f"{'system':<22} {'conc':>4} {'TTFT ms':>9} {'TTFA ms':>9} {'audio/s':>8}")
    for r in results:
        print(r.row())
    by = {(r.system, r.concurrency): r for r in results}
    top = max(levels)
    for system in LAYOUTS:
        print(f"{system}: TTFA x{top} / TTFA x1 = "
              f"{by[system, top].ttfa_ms / by[system, 1].ttfa_ms:.2f}")
    split, colocated = list(LAYOUTS)[1], list(LAYOUTS)[0]
    for level in levels:
        a, b = by[split, level], by[colocated, level]
        print(f"x{level}: split / co-located: TTFA {a.ttfa_ms / b.ttfa_ms:.2f}, "
              f"audio per wall-second {a.audio_per_wall / b.audio_per_wall:.2f}")


if __name__ == "__main__":
    main()
