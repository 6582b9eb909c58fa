"""Orpheus TTS served by mstar (co-located, and the codec on its own rank) versus the
sequential baseline (transformers `generate`, then one SNAC decode of the utterance), on
the same `small` weights: time to first audio, real-time factor and audio-seconds per
wall-second at 1, 4 and 16 concurrent requests, side by side, as ratios.

The weights are random, so a random LM would rarely emit audio codes. The benchmark's
checkpoint is the `small` preset given a band structure: every audio token's embedding
points to the next frame position's band, the layers' output projections are zero (the
forwards cost what they cost, the residual stream carries the embedding), so each sampled
token is an audio code of the right position and every request speaks for exactly
`--frames` frames (`ignore_eos`). Both systems sample with the authors' defaults
(temperature 0.6, top_p 0.8, repetition penalty 1.3).

    python benchmarks/bench_orpheus.py            # ~5 minutes on 2 cores
    python benchmarks/bench_orpheus.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from bench_serving import generate_events, launch

from mstar import events
from mstar_orpheus.checkpoint import make_it_speak, write_tiny_checkpoint
from mstar_orpheus.config import CODES_PER_FRAME, SAMPLES_PER_FRAME

RATE = 24000
TEXT = "Hello there, this is a benchmark sentence for the speech model."
LAYOUTS = {"mstar co-located": "orpheus_colocated", "mstar codec rank": "orpheus_codec_split"}
SEQUENTIAL = "HF generate + SNAC"


@dataclass
class Result:
    system: str
    concurrency: int
    ttfa_ms: float
    rtf: float  # wall time of a request / its audio duration (mean)
    audio_per_wall: float  # audio seconds produced per wall second, all requests

    def row(self) -> str:
        return (f"{self.system:<20} {self.concurrency:>4} {self.ttfa_ms:>9.0f} "
                f"{self.rtf:>6.2f} {self.audio_per_wall:>8.2f}")


async def speak(client: httpx.AsyncClient, frames: int, seed: int) -> tuple[float, float, float]:
    """One streamed request: (seconds to the first audio, seconds in all, audio seconds)."""
    body = {"input": TEXT, "max_tokens": frames * CODES_PER_FRAME, "ignore_eos": True,
            "seed": seed}
    start = time.perf_counter()
    first, samples = 0.0, 0
    async for event in generate_events(client, body):
        if isinstance(event, events.AudioChunk):
            first = first or time.perf_counter()
            samples += len(event.samples.data) // 4
    return first - start, time.perf_counter() - start, samples / RATE


async def clients(url: str, concurrency: int, per_client: int, frames: int,
                  system: str) -> Result:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        wall = time.perf_counter()
        runs = await asyncio.gather(*(
            _client(client, i, per_client, frames) for i in range(concurrency)))
        wall = time.perf_counter() - wall
    flat = [r for rs in runs for r in rs]
    return Result(system, concurrency, 1000 * statistics.mean(r[0] for r in flat),
                  statistics.mean(r[1] / r[2] for r in flat),
                  sum(r[2] for r in flat) / wall)


async def _client(client: httpx.AsyncClient, index: int, count: int,
                  frames: int) -> list[tuple[float, float, float]]:
    return [await speak(client, frames, 100 * index + j) for j in range(count)]


SEQUENTIAL_SCRIPT = r'''
import json, sys, time
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
import snac
from mstar_orpheus.config import (AUDIO_TOKEN_BASE, CODEBOOK_SIZE, CODES_PER_FRAME,
                                  PROMPT_END, START_OF_HUMAN)
from mstar_orpheus.model import frame_levels

ckpt, frames, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
lm = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
codec = snac.SNAC.from_pretrained(ckpt + "/snac").eval()
tok = AutoTokenizer.from_pretrained(ckpt)
ids = [START_OF_HUMAN] + tok(f"tara: {sys.argv[4]}")["input_ids"] + list(PROMPT_END)
times = []
for seed in range(requests):
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.generate(torch.tensor([ids]), max_new_tokens=frames * CODES_PER_FRAME,
                          min_new_tokens=frames * CODES_PER_FRAME, do_sample=True,
                          temperature=0.6, top_p=0.8, repetition_penalty=1.3)
        new = out[0, len(ids):].tolist()
        codes = [t - AUDIO_TOKEN_BASE - CODEBOOK_SIZE * (i % CODES_PER_FRAME)
                 for i, t in enumerate(new)]
        grid = torch.tensor(codes).clamp(0, CODEBOOK_SIZE - 1).reshape(1, -1, CODES_PER_FRAME)
        audio = codec.decode(frame_levels(grid))
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "samples": int(audio.shape[-1])}))
'''


def sequential(ckpt: Path, frames: int, requests: int) -> Result:
    done = subprocess.run([sys.executable, "-c", SEQUENTIAL_SCRIPT, str(ckpt), str(frames),
                           str(requests), TEXT], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the sequential baseline failed:\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = data["samples"] / RATE
    mean = statistics.mean(data["times"])
    return Result(SEQUENTIAL, 1, 1000 * mean, mean / seconds, seconds / mean)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per utterance (2048 samples each; default 48, quick 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    frames = args.frames or (16 if args.quick else 48)
    levels = (1, 4) if args.quick else (1, 4, 16)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_tiny_checkpoint(ckpt, preset="small", seed=args.seed, tie_word_embeddings=False)
        make_it_speak(ckpt, args.seed)
        print(f"{frames} frames per utterance ({frames * SAMPLES_PER_FRAME / RATE:.2f} s of "
              "audio); sequential baseline first", flush=True)
        results.append(sequential(ckpt, frames, 2))
        print(results[-1].row(), flush=True)
        for system, config in LAYOUTS.items():
            # sizes: the checkpoint's (no preset)
            with launch(["--config", config, "--model-path", str(ckpt), "--log-level",
                         "WARNING", "--set", "max_seq_len=4096"], Path(tmp)) as server:
                url = server.url
                asyncio.run(clients(url, 1, 1, 4, "warm-up"))
                for level in levels:
                    results.append(asyncio.run(clients(url, level, 1, frames, system)))
                    print(results[-1].row(), flush=True)
    print(f"\n{'system':<20} {'conc':>4} {'TTFA ms':>9} {'RTF':>6} {'audio/s':>8}")
    for r in results:
        print(r.row())
    base = results[0]
    for r in results[1:]:
        print(f"{r.system} x{r.concurrency}: TTFA {base.ttfa_ms / r.ttfa_ms:.1f}x sooner, "
              f"audio per wall-second {r.audio_per_wall / base.audio_per_wall:.2f}x the "
              f"sequential baseline")


if __name__ == "__main__":
    main()
