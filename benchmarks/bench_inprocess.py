"""mstar's in-process runtime (`mstar.load`) versus transformers `generate`, side by side.

Why: the runtime's continuous batching must pay for its generality (graph walks, cursors,
messages, a paged cache). On the same Llama weights (testvla's text expert, `small`
preset: ~58 M parameters, fp32) this measures output tokens/s of mstar at several numbers
of concurrent clients (staggered arrivals, ragged prompt lengths, back-to-back requests)
against sequential `generate` and one batched `generate` of 16 aligned requests, then
prints the ratios and the goals of the issue:

- mstar at 16 streams >= batched `generate` of 16 (and >= 5x sequential `generate`);
- mstar at 1 stream within 10 % of sequential `generate`.

Both sides decode greedily exactly `--new-tokens` tokens (HF: no EOS id; mstar:
`ignore_eos`; tokens are counted as produced anyway, and a short request is reported). The
machine is shared and its load varies: `--repeat N` runs every measurement N times and
keeps each row's best run. HF runs first, before mstar's worker thread exists (two threads
running torch ops make libgomp throttle its spin-waits for both; see the README).

`--profile DIR` instead runs only mstar, every thread under cProfile (cProfile alone sees
only the main thread), and prints each thread's hot spots.

    python benchmarks/bench_inprocess.py            # full run, ~2 minutes on 2 cores
    python benchmarks/bench_inprocess.py --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import mstar
from mstar import events
from mstar_testvla.checkpoint import write_tiny_checkpoint
from mstar_testvla.config import PRESETS, TestVLAConfig
from mstar_testvla.tokenizer import BOS, PAD

ALPHABET = "abcdefghijklmnopqrstuvwxyz     "  # no '<': a prompt never holds the image marker
SEQUENTIAL_GOAL = 0.9  # mstar@1 / HF sequential
BATCHED_GOAL = 1.0  # mstar@16 / HF batched-16
SPEEDUP_GOAL = 5.0  # mstar@16 / HF sequential


@dataclass
class Row:
    """One line of the result table."""

    system: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft_ms: float
    tpot_ms: float | None = None
    early_stops: int = 0
    #: mstar only: ms per engine step of `schedule`, `runner`, `worker`, `forward`, and
    #: `steps` (see `host_time`).
    host: dict[str, float] | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Timing:
    """One mstar request as its client saw it."""

    submitted: float
    first_token: float
    done: float
    tokens: int
    reason: str


# ------------------------------------------------------------------------------------------
# Workload


def prompt_text(rng: random.Random, n_bytes: int) -> str:
    """`n_bytes` ASCII bytes: the byte tokenizer makes them ids 0..255 after BOS."""
    return "".join(rng.choice(ALPHABET) for _ in range(n_bytes))


def prompt_ids(text: str) -> list[int]:
    """The ids mstar's testvla gives `text` (BOS + UTF-8 bytes), fed identically to HF."""
    return [BOS, *text.encode("utf-8")]


def ragged_prompts(rng: random.Random, n: int, tokens: int) -> list[str]:
    """Prompts of `tokens` ± 16 tokens (BOS included), e.g. 48..80 for 64."""
    return [prompt_text(rng, rng.randint(tokens - 17, tokens + 15)) for _ in range(n)]


def mstar_request(text: str, new_tokens: int, seed: int) -> dict[str, Any]:
    return {"prompt": text, "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True,
            "seed": seed}


# ------------------------------------------------------------------------------------------
# mstar


def load_mstar(ckpt: Path, preset: str, max_streams: int, prompt_tokens: int,
               new_tokens: int) -> mstar.LocalDeployment:
    """A deployment whose cache holds every stream at once (no preemption in the figures)."""
    max_seq_len = prompt_tokens + 16 + new_tokens + 16
    pages_per_seq = -(-max_seq_len // 16) + 1
    return mstar.load("testvla", preset=preset, model_path=str(ckpt), max_seq_len=max_seq_len,
                      kv_cache={"page_size": 16, "num_pages": max_streams * pages_per_seq + 16},
                      max_concurrent_requests=max(256, max_streams))


def run_request(deployment: mstar.LocalDeployment, request: dict[str, Any]) -> Timing:
    submitted = time.perf_counter()
    first, tokens, reason = 0.0, 0, ""
    for event in deployment.generate(request):
        if isinstance(event, events.TextDelta):
            if not tokens:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        elif isinstance(event, events.Finished):
            reason = event.reason
        elif isinstance(event, events.Error):
            raise RuntimeError(f"mstar request failed: {event.message}")
    return Timing(submitted, first, time.perf_counter(), tokens, reason)


def mstar_tokens(deployment: mstar.LocalDeployment, text: str, new_tokens: int) -> list[int]:
    ids: list[int] = []
    for event in deployment.generate(mstar_request(text, new_tokens, seed=0)):
        if isinstance(event, events.TextDelta):
            ids.extend(event.token_ids)
    return ids


def run_clients(deployment: mstar.LocalDeployment, concurrency: int, per_client: int,
                prompt_tokens: int, new_tokens: int, stagger_s: float, seed: int) -> Row:
    """`concurrency` client threads, each starting after a random delay in [0, stagger_s)
    and then sending `per_client` ragged requests back to back."""
    rng = random.Random(seed)
    plans = [(rng.uniform(0, stagger_s), ragged_prompts(rng, per_client, prompt_tokens))
             for _ in range(concurrency)]
    timings: list[Timing] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(index: int, delay: float, prompts: list[str]) -> None:
        time.sleep(delay)
        try:
            for j, text in enumerate(prompts):
                t = run_request(deployment, mstar_request(text, new_tokens,
                                                          seed=index * 1000 + j))
                with lock:
                    timings.append(t)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, delay, prompts), name=f"client-{i}")
               for i, (delay, prompts) in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(t.done for t in timings) - min(t.submitted for t in timings)
    tpots = [(t.done - t.first_token) / (t.tokens - 1) for t in timings if t.tokens > 1]
    return Row("mstar", concurrency, len(timings), sum(t.tokens for t in timings), wall,
               1000 * statistics.mean(t.first_token - t.submitted for t in timings),
               1000 * statistics.mean(tpots),
               sum(t.tokens < new_tokens for t in timings))


def host_time(deployment: mstar.LocalDeployment) -> dict[str, float]:
    """Cumulative seconds over every rank: the KV engines' step planning (`schedule`),
    batch building, K/V commit and sampling (`runner`), the node's forward (`forward`),
    the worker loop around the steps (`worker`: messages, cursors, routing), and `steps`."""
    total = {"steps": 0.0, "schedule": 0.0, "runner": 0.0, "forward": 0.0, "worker": 0.0}
    for worker in deployment.workers.values():
        total["worker"] += worker.loop_seconds
        for engine in worker.engines.values():
            for name, value in getattr(engine, "timing", {}).items():
                total[name] += value
    return total


def per_step_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    steps = after["steps"] - before["steps"]
    out = {name: 1000 * (after[name] - before[name]) / max(steps, 1)
           for name in ("schedule", "runner", "worker", "forward")}
    out["steps"] = steps
    return out


def warm_up(deployment: mstar.LocalDeployment, new_tokens: int, prompt_tokens: int) -> None:
    """Prefill and decode paths at 1 and several streams (first-call costs out of the way)."""
    run_clients(deployment, 1, 1, prompt_tokens, new_tokens // 4, 0.0, seed=12345)
    run_clients(deployment, 4, 1, prompt_tokens, new_tokens // 4, 0.01, seed=54321)


# ------------------------------------------------------------------------------------------
# transformers


def load_hf(ckpt: Path, cfg: TestVLAConfig, max_positions: int) -> Any:
    """`LlamaForCausalLM` of testvla's text expert: the checkpoint's Llama keys, strictly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu",
        tie_word_embeddings=False, max_position_embeddings=max_positions,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    weights = load_file(str(ckpt / "model.safetensors"))
    llama = {k: v for k, v in weights.items()
             if (k.startswith("model.") and "_moe_gen" not in k) or k.startswith("lm_head.")}
    model.load_state_dict(llama, strict=True)
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, like ignore_eos
    model.generation_config.pad_token_id = PAD
    return model


def hf_generate(model: Any, batch: Sequence[Sequence[int]], new_tokens: int) -> torch.Tensor:
    """Greedy `generate` of aligned prompts; returns only the new tokens."""
    ids = torch.tensor(batch, dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=new_tokens, use_cache=True)
    new = out[:, ids.shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"HF generated {new.shape[1]} tokens, expected {new_tokens}")
    return new


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_rows(model: Any, prompts: list[list[int]], new_tokens: int, batch: int,
            batch_reps: int) -> list[Row]:
    """Sequential `generate` over `prompts`, then `batch_reps` batched calls of `batch`
    aligned prompts. TTFT: a `generate` of one new token (prefill + first sample)."""
    hf_generate(model, prompts[:1], 4)  # warm-up
    seq_s = sum(timed(lambda p=p: hf_generate(model, [p], new_tokens)) for p in prompts)
    seq_ttft = statistics.mean(timed(lambda p=p: hf_generate(model, [p], 1)) for p in prompts)
    aligned = (prompts * batch)[:batch]
    hf_generate(model, aligned, 4)
    batch_s = sum(timed(lambda: hf_generate(model, aligned, new_tokens))
                  for _ in range(batch_reps))
    batch_ttft = timed(lambda: hf_generate(model, aligned, 1))
    return [Row("HF generate (sequential)", 1, len(prompts), len(prompts) * new_tokens, seq_s,
                1000 * seq_ttft),
            Row(f"HF generate (batched {batch})", batch, batch * batch_reps,
                batch * batch_reps * new_tokens, batch_s, 1000 * batch_ttft)]


# ------------------------------------------------------------------------------------------
# Profiling every thread


@contextmanager
def profile_threads() -> Iterator[dict[str, list[cProfile.Profile]]]:
    """cProfile every thread started inside the block (by thread name); stats are complete
    once those threads have ended."""
    profiles: dict[str, list[cProfile.Profile]] = {}
    lock = threading.Lock()

    def bootstrap(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile()
        name = threading.current_thread().name
        with lock:
            profiles.setdefault(name.split("-")[0] if name.startswith("client-") else name,
                                []).append(prof)
        prof.enable()

    threading.setprofile(bootstrap)
    try:
        yield profiles
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]


def print_profile(name: str, profs: list[cProfile.Profile], top: int, out_dir: Path,
                  tag: str) -> None:
    stats = pstats.Stats(*profs)
    path = out_dir / f"{tag}-{name.replace(':', '')}.prof"
    stats.dump_stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    print(f"\n[{tag}] thread {name!r}: {total:.2f} s profiled ({len(profs)} thread(s)); "
          f"top {top} by own time (saved to {path})")
    print(f"  {'own %':>6} {'own s':>7} {'cum s':>7} {'calls':>9}  function")
    for (file, line, func), (_, ncalls, tt, ct, _) in rows[:top]:
        where = func if file == "~" else f"{_short(file)}:{line}:{func}"
        print(f"  {100 * tt / total:6.1f} {tt:7.2f} {ct:7.2f} {ncalls:9d}  {where}")


def _short(file: str) -> str:
    for marker in ("site-packages/", "src/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


# ------------------------------------------------------------------------------------------
# Report


def print_table(rows: list[Row]) -> None:
    print(f"{'system':<28} {'streams':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} "
          f"{'tok/s':>8} {'TTFT ms':>8} {'TPOT ms':>8}")
    for r in rows:
        tpot = f"{r.tpot_ms:8.1f}" if r.tpot_ms is not None else f"{'-':>8}"
        print(f"{r.system:<28} {r.concurrency:>7} {r.requests:>8} {r.tokens:>7} "
              f"{r.seconds:8.2f} {r.tok_s:8.1f} {r.ttft_ms:8.1f} {tpot}")
    stops = sum(r.early_stops for r in rows)
    if stops:
        print(f"note: {stops} mstar request(s) ended before max_tokens (their tokens are "
              "counted as produced)")


def print_host(rows: list[Row]) -> None:
    """Per engine step of the mstar rows: host ms (scheduler + runner + worker loop) and
    their share of the step (host + the node's forward)."""
    print("\nmstar host time per engine step (ms; share of the step = host / (host + forward)):")
    print(f"{'streams':>7} {'steps':>6} {'schedule':>9} {'runner':>8} {'worker':>8} "
          f"{'host':>8} {'forward':>8} {'host %':>7}")
    for r in rows:
        if r.host is None:
            continue
        h = r.host
        host = h["schedule"] + h["runner"] + h["worker"]
        print(f"{r.concurrency:>7} {int(h['steps']):>6} {h['schedule']:9.2f} {h['runner']:8.2f} "
              f"{h['worker']:8.2f} {host:8.2f} {h['forward']:8.2f} "
              f"{100 * host / (host + h['forward']):6.1f}%")


def print_ratios(rows: list[Row], batch: int) -> None:
    by = {(r.system, r.concurrency): r for r in rows}
    seq = by.get(("HF generate (sequential)", 1))
    bat = by.get((f"HF generate (batched {batch})", batch))
    m1, mb = by.get(("mstar", 1)), by.get(("mstar", batch))
    print("\nratios (output tokens/s):")
    checks = [(m1, seq, "mstar@1 / HF sequential", SEQUENTIAL_GOAL),
              (mb, bat, f"mstar@{batch} / HF batched-{batch}", BATCHED_GOAL),
              (mb, seq, f"mstar@{batch} / HF sequential", SPEEDUP_GOAL)]
    for num, den, label, goal in checks:
        if num is None or den is None:
            print(f"  {label:<32} n/a (not measured in this run)")
            continue
        ratio = num.tok_s / den.tok_s
        verdict = "met" if ratio >= goal else "NOT met"
        print(f"  {label:<32} {ratio:6.2f}   goal >= {goal:.2f}: {verdict}")


def compare_tokens(ours: list[int], theirs: list[int]) -> None:
    """Same weights, same greedy ids? (fp32 reduction order may flip a late near-tie.)"""
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if same is None and len(ours) == len(theirs):
        print(f"greedy check: mstar and HF produce the same {len(ours)} token ids")
    else:
        print(f"greedy check: first difference at new token {same} "
              f"(mstar {len(ours)} tokens, HF {len(theirs)})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests and rounds: a ~30 s smoke run")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--concurrency", default="1,4,16,64",
                   help="comma-separated numbers of concurrent mstar clients")
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="back-to-back requests per mstar client (default 3, quick 1)")
    p.add_argument("--hf-requests", type=int, default=None,
                   help="sequential HF requests (default 4, quick 2)")
    p.add_argument("--batch", type=int, default=16, help="aligned HF batch size")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stagger-ms", type=float, default=200.0,
                   help="each client starts after a random delay below this")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for both systems (default: all cores)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint directory (written there if it has no model.safetensors)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds of every measurement; the best of each is kept (default 2, "
                        "quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("hf", "mstar"), default=None,
                   help="internal: run one system in this process and print JSON lines")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="profile mstar only (every thread, cProfile) into DIR; no HF")
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    return resolve_defaults(args)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Levels from `--concurrency`, and the `--quick`-dependent defaults (shared with
    bench_serving.py)."""
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.requests_per_client is None:
        args.requests_per_client = 1 if args.quick else 3
    if args.hf_requests is None:
        args.hf_requests = 2 if args.quick else 4
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TestVLAConfig(**PRESETS[args.preset])
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) of "
          f"{os.cpu_count()} cores; load average {load_before[0]:.2f}; preset {args.preset!r}: "
          f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; "
          f"prompts ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or Path(tmp)
        if not (ckpt / "model.safetensors").exists():
            write_tiny_checkpoint(ckpt, preset=args.preset, seed=args.seed)
        if args.profile is not None:
            profile(args, ckpt)
            return
        if args.only is not None:
            run_one(args, ckpt, cfg)
            return
        benchmark(args, ckpt, cfg)
    load_after = os.getloadavg()
    print(f"\nload average at the end: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")


def benchmark(args: argparse.Namespace, ckpt: Path, cfg: TestVLAConfig) -> None:
    """Each system in a fresh process of its own: torch work on two threads of one process
    (the caller's and a worker's) runs two OpenMP teams, which slows both (see the README),
    and neither system should pay for the other."""
    rows: list[Row] = []
    tokens: dict[str, list[int]] = {}
    for system in ("hf", "mstar"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", system, "--ckpt", str(ckpt)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        for line in proc.stdout.splitlines():
            kind, _, payload = line.partition(" ")
            if kind == "ROW":
                rows.append(Row(**json.loads(payload)))
            elif kind == "TOKENS":
                tokens[system] = json.loads(payload)
            else:
                print(line, flush=True)
    print(f"\nbest of {args.repeat} round(s) per row; TTFT: mean time to the first token "
          "(HF: a 1-token `generate`); TPOT: mean time per further token")
    print_table(rows)
    print_host(rows)
    print_ratios(rows, args.batch)
    compare_tokens(tokens["mstar"], tokens["hf"])


def run_one(args: argparse.Namespace, ckpt: Path, cfg: TestVLAConfig) -> None:
    """The `--only` half: one system's rounds, best row per level as `ROW <json>` lines."""
    rng = random.Random(args.seed)
    aligned = [prompt_text(rng, args.prompt_tokens - 1) for _ in range(args.hf_requests)]
    best: dict[tuple[str, int], Row] = {}

    def keep(row: Row) -> None:
        key = (row.system, row.concurrency)
        if key not in best or row.tok_s > best[key].tok_s:
            best[key] = row
        print(f"  {row.system:<28} @ {row.concurrency:>3}: {row.tok_s:7.1f} tok/s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)

    if args.only == "hf":
        model = load_hf(ckpt, cfg, max_positions=2 * (args.prompt_tokens + args.new_tokens) + 64)
        for round_ in range(args.repeat):
            print(f"HF round {round_ + 1} of {args.repeat}:")
            for row in hf_rows(model, [prompt_ids(t) for t in aligned], args.new_tokens,
                               args.batch, batch_reps=1 if args.quick else 2):
                keep(row)
        ids = hf_generate(model, [prompt_ids(aligned[0])], args.new_tokens)[0].tolist()
    else:
        with load_mstar(ckpt, args.preset, max(args.levels), args.prompt_tokens,
                        args.new_tokens) as deployment:
            warm_up(deployment, args.new_tokens, args.prompt_tokens)
            for round_ in range(args.repeat):
                print(f"mstar round {round_ + 1} of {args.repeat}:")
                for c in args.levels:
                    before = host_time(deployment)
                    row = run_clients(deployment, c, args.requests_per_client,
                                      args.prompt_tokens, args.new_tokens,
                                      args.stagger_ms / 1000, seed=args.seed + c + 1000 * round_)
                    row.host = per_step_ms(before, host_time(deployment))
                    keep(row)
            ids = mstar_tokens(deployment, aligned[0], args.new_tokens)
    for row in best.values():
        print("ROW " + json.dumps(dataclasses.asdict(row)))
    print("TOKENS " + json.dumps(ids))


def profile(args: argparse.Namespace, ckpt: Path) -> None:
    """One fresh deployment per level, every thread profiled (warm-up included)."""
    args.profile.mkdir(parents=True, exist_ok=True)
    for c in args.levels:
        with profile_threads() as profiles:
            with load_mstar(ckpt, args.preset, c, args.prompt_tokens,
                            args.new_tokens) as deployment:
                warm_up(deployment, args.new_tokens, args.prompt_tokens)
                row = run_clients(deployment, c, args.requests_per_client, args.prompt_tokens,
                                  args.new_tokens, args.stagger_ms / 1000, seed=args.seed + c)
        print(f"\nmstar @ {c} streams under cProfile: {row.tok_s:.1f} tok/s "
              f"(profiling slows Python code; compare hot spots, not speed)")
        for name in sorted(profiles):
            print_profile(name, profiles[name], args.profile_top, args.profile, f"c{c}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
