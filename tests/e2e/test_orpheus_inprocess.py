"""Orpheus through the runtime, in one process, on a tiny checkpoint in the hub layouts.

The LLM's tokens are scripted (a logits processor forces each next token), so the codes
are known and may include what the authors' decoder skips (text tokens, the start of
speech, a code in the wrong level band). The oracle is the reference's windowed algorithm
run with the `snac` package on the same codes and weights: every chunk between the first
and the flush equals its window's samples [2048:4096]; the first chunk holds frames 0-1
and the flush the last two frames, so the stream holds exactly 2048 samples per frame.
Noise off on both sides, and on (the real codec's `noise: true`): then the package's
decode of each window draws, block by block, the runtime's keyed noise of that window. Also: short utterances, concurrent requests sharing LM
steps and codec batches, a cancelled request freeing its pages and its codec work."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import wait_for

import mstar
from mstar import events
from mstar.engine.rng import key_seed
from mstar.model.sampling import register_logits_processor
from mstar_orpheus.config import (
    AUDIO_TOKEN_BASE,
    END_OF_SPEECH,
    START_OF_SPEECH,
    TINY_SNAC,
    VOICES,
    SnacConfig,
)
from mstar_orpheus.model import STREAM_POLICY, frame_levels

pytestmark = pytest.mark.timeout(120)

QUIET_SNAC = {**TINY_SNAC, "noise": False}
SAMPLES = 2048


def tokens_for(codes: list[list[int]], *, junk: bool = True) -> list[int]:
    """Tokens of frames of codes (level layout per frame position), with tokens the
    reference skips mixed in: a text token, the start of speech, and a code of position 0
    given when position 3 is expected (its computed code is negative)."""
    out = [START_OF_SPEECH] if junk else []
    for f, frame in enumerate(codes):
        for pos, code in enumerate(frame):
            if junk and f == 1 and pos == 3:
                out += [1234, AUDIO_TOKEN_BASE + 5]  # text token; wrong band: skipped
            out.append(AUDIO_TOKEN_BASE + 4096 * pos + code)
    return out + [END_OF_SPEECH]


def scripted(name: str, script: list[int]) -> str:
    """A logits processor that makes the sampler pick `script` token by token."""
    def force(history, logits):
        row = torch.full_like(logits, float("-inf"))
        row[script[min(len(history), len(script) - 1)]] = 0.0
        return row

    register_logits_processor(name, force)
    return name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from mstar_orpheus.checkpoint import write_tiny_checkpoint
    from mstar_orpheus.snac import write_tiny_snac

    path = tmp_path_factory.mktemp("orpheus") / "ckpt"
    write_tiny_checkpoint(path, preset="tiny", seed=0)
    write_tiny_snac(path / "snac", SnacConfig(**QUIET_SNAC), seed=1)
    return path


@pytest.fixture(scope="module")
def dep(ckpt):
    d = mstar.load("orpheus", preset="tiny", model_path=str(ckpt), max_seq_len=1024,
                   kv_cache={"num_pages": 256})  # the codec's config: snac/config.json
    yield d
    d.close()


@pytest.fixture(scope="module")
def oracle(ckpt):
    snac = pytest.importorskip("snac")
    model = snac.SNAC.from_pretrained(str(ckpt / "snac")).eval()

    def decode(frames: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.decode(frame_levels(frames[None]))[0, 0]

    return decode


def speak(dep, script: list[int], name: str, **fields) -> tuple[torch.Tensor, list]:
    evs = list(dep.generate({"input": "hello there", "voice": "leo", "max_tokens": 200,
                             "logits_processors": [scripted(name, script)], **fields}))
    assert isinstance(evs[-1], events.Finished), evs[-1]
    chunks = [e.samples.to_tensor() for e in evs if isinstance(e, events.AudioChunk)]
    assert all(e.sample_rate == 24000 for e in evs if isinstance(e, events.AudioChunk))
    return chunks, evs


def random_codes(frames: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 4096, (frames, 7), generator=g).tolist()


def test_the_stream_matches_the_reference_windows(dep, oracle):
    codes = random_codes(9, seed=3)
    chunks, evs = speak(dep, tokens_for(codes), "script-9")
    frames = torch.tensor(codes)
    assert evs[-1].reason == "stop"
    # first chunk: frames 0-1 of window 0-3; then one frame per window; then the flush
    assert [c.numel() for c in chunks] == [2 * SAMPLES] + [SAMPLES] * 7
    assert torch.allclose(chunks[0], oracle(frames[0:4])[: 2 * SAMPLES], atol=1e-5)
    for k in range(4, 9):  # the reference's chunks: window k-3..k, samples [2048:4096]
        want = oracle(frames[k - 3:k + 1])[SAMPLES:2 * SAMPLES]
        assert torch.allclose(chunks[k - 3], want, atol=1e-5), k
    tail = torch.cat(chunks[6:])  # the flush: frames 7 and 8, nothing lost at the end
    assert tail.numel() == 2 * SAMPLES
    assert torch.allclose(tail[:SAMPLES], oracle(frames[6:9])[SAMPLES:2 * SAMPLES], atol=1e-5)
    assert torch.allclose(tail[SAMPLES:], oracle(frames[7:9])[SAMPLES:2 * SAMPLES], atol=1e-5)
    assert sum(c.numel() for c in chunks) == 9 * SAMPLES
    assert evs[-1].usage.completion_tokens == len(tokens_for(codes))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A checkpoint whose codec adds noise (TINY_SNAC, as the real one, has `noise: true`),
    served; and the `snac` package's model of the same files."""
    snac = pytest.importorskip("snac")
    from mstar_orpheus.checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("orpheus-noisy") / "ckpt", seed=4)
    assert json.loads((path / "snac" / "config.json").read_text())["noise"] is True
    dep = mstar.load("orpheus", preset="tiny", model_path=str(path), max_seq_len=1024,
                     kv_cache={"num_pages": 256})
    yield dep, snac.SNAC.from_pretrained(str(path / "snac")).eval()
    dep.close()


def decode_with_keyed_noise(model, frames: torch.Tensor, seed: int,
                            iteration: int) -> torch.Tensor:
    """The package's decode of one window whose k-th NoiseBlock draws its `torch.randn`
    from the global generator seeded as the runtime keys that block's noise (request seed,
    child 0, site "snac_noise/k", the codec loop's iteration): the same noise, drawn by the
    package's own code."""
    blocks = [m for m in model.decoder.modules() if type(m).__name__ == "NoiseBlock"]
    assert blocks

    def seeding(k: int):
        def hook(*_: object) -> None:
            torch.manual_seed(key_seed(seed, 0, f"snac_noise/{k}", iteration))
        return hook

    hooks = [block.register_forward_pre_hook(seeding(k)) for k, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            return model.decode(frame_levels(frames[None]))[0, 0]
    finally:
        for hook in hooks:
            hook.remove()


def test_with_noise_on_the_stream_matches_the_reference_windows(noisy):
    dep, reference = noisy
    codes = random_codes(9, seed=6)
    chunks, _ = speak(dep, tokens_for(codes), "script-noisy", seed=77)
    frames = torch.tensor(codes)
    # the reference's windows, one per codec iteration: frames 0-3 keeping frames 0-1;
    # then k-3..k keeping frame k-2; the flush: frames 6-8 keeping 7, 7-8 keeping 8
    windows = ([(0, 4, slice(0, 2 * SAMPLES))]
               + [(k - 3, k + 1, slice(SAMPLES, 2 * SAMPLES)) for k in range(4, 9)]
               + [(6, 9, slice(SAMPLES, 2 * SAMPLES)), (7, 9, slice(SAMPLES, 2 * SAMPLES))])
    assert len(chunks) == len(windows)
    quiet = []
    for iteration, ((start, end, keep), got) in enumerate(zip(windows, chunks)):
        window = frames[start:end]
        want = decode_with_keyed_noise(reference, window, 77, iteration)[keep]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"window {iteration}")
        with torch.inference_mode():
            quiet.append(reference.decode(frame_levels(window[None]))[0, 0][keep])
    # the noise is there: the package's own draws (other noise) give other audio
    assert (torch.cat(chunks) - torch.cat(quiet)).abs().max() > 0.01


@pytest.mark.parametrize("n_frames", [1, 3])
def test_an_utterance_shorter_than_a_window_still_speaks(dep, oracle, n_frames):
    codes = random_codes(n_frames, seed=n_frames)
    chunks, _ = speak(dep, tokens_for(codes, junk=False), f"script-short-{n_frames}")
    audio = torch.cat(chunks)
    assert audio.numel() == n_frames * SAMPLES
    whole = oracle(torch.tensor(codes))
    assert torch.allclose(audio[:2 * SAMPLES], whole[:2 * SAMPLES], atol=1e-5)


def test_a_partial_frame_is_dropped_and_an_invalid_window_is_silence(dep):
    codes = random_codes(5, seed=8)
    script = tokens_for(codes, junk=False)[:-1]
    script[2 * 7 + 2] = AUDIO_TOKEN_BASE + 4096 * 2 + 4096 + 7  # frame 2: code 4103
    chunks, _ = speak(dep, script + script[:3] + [END_OF_SPEECH], "script-invalid")
    audio = torch.cat(chunks)
    assert audio.numel() == 5 * SAMPLES  # the 3 codes after frame 4 make no frame
    # windows holding frame 2 are silence: frames 0-1 (window 0-3), 2 (1-4), 3 (flush 2-4);
    # frame 4's flush window (3-4) does not hold it
    assert torch.count_nonzero(audio[:4 * SAMPLES]) == 0
    assert torch.count_nonzero(audio[4 * SAMPLES:]) > 0


def test_concurrent_requests_in_four_voices_share_lm_steps_and_codec_batches(dep):
    names = [scripted(f"script-batch-{i}", tokens_for(random_codes(8, seed=20 + i)))
             for i in range(4)]
    before_lm = len(dep.step_log("LLM"))
    before_codec = len(dep.step_log("snac_decoder"))
    results: dict[int, list] = {}

    def one(i: int) -> None:
        results[i] = list(dep.generate({"input": f"line {i}", "voice": VOICES[i],
                                        "max_tokens": 200, "logits_processors": [names[i]]}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(4):
        audio = [e for e in results[i] if isinstance(e, events.AudioChunk)]
        assert sum(e.samples.to_tensor().numel() for e in audio) == 8 * SAMPLES
    lm = dep.step_log("LLM")[before_lm:]
    codec = dep.step_log("snac_decoder")[before_codec:]
    assert max(len({e["request_id"] for e in s.entries}) for s in lm) >= 2
    assert max(len({e["request_id"] for e in s.entries}) for s in codec) >= 2


def test_a_cancelled_request_frees_its_pages_and_stops_its_codec(dep):
    name = scripted("script-long", tokens_for(random_codes(60, seed=5)))
    stream = dep.generate({"input": "a long one", "max_tokens": 600,
                           "logits_processors": [name]})
    first = next(e for e in stream if isinstance(e, events.AudioChunk))
    assert first.samples.to_tensor().numel() == 2 * SAMPLES
    # the first audio left after the first window, long before the utterance's 420 tokens
    ran = sum(len(s.entries) for s in dep.step_log("LLM")
              if any(e["request_id"] == stream.request_id for e in s.entries))
    assert ran < 200, ran
    stream.close()
    wait_for(lambda: dep.pages_in_use() == 0 and dep.frontend.live_requests() == 0)
    codec_steps = len(dep.step_log("snac_decoder"))
    lm_steps = len(dep.step_log("LLM"))
    speak(dep, tokens_for(random_codes(4, seed=6)), "script-after")  # both engines step on
    for node, since in (("LLM", lm_steps), ("snac_decoder", codec_steps)):
        later = dep.step_log(node)[since:]
        assert later and all(e["request_id"] != stream.request_id for s in later
                             for e in s.entries), f"{node} kept running the cancelled request"


def test_a_long_run_of_tokens_that_make_no_frame_never_stalls_the_stream(dep):
    """200 tokens that make no frame (ten times `max_buffered`) before the codes: they are
    credited back at once, so the LLM never waits for a window that cannot form."""
    junk = [1234] * 200
    assert len(junk) >= 10 * STREAM_POLICY.max_buffered
    codes = random_codes(5, seed=11)
    script = junk + tokens_for(codes, junk=False)
    chunks, evs = speak(dep, script, "script-junk-run", max_tokens=len(script))
    assert evs[-1].reason == "stop"
    assert sum(c.numel() for c in chunks) == 5 * SAMPLES


def test_a_dummy_checkpoint_speaks_to_the_end():
    """Random weights make mostly tokens that are no audio code (the issue's repro)."""
    with mstar.load("orpheus", preset="tiny", load_format="dummy", max_seq_len=4096) as d:
        evs = list(d.generate({"input": "hi", "max_tokens": 200}))
    assert isinstance(evs[-1], events.Finished), evs[-1]


def test_bad_requests_name_the_field(dep):
    for body, words in (({"input": "   "}, "input: must not be empty"),
                        ({"input": "hi", "voice": "bob"}, "unknown voice 'bob'; voices: tara"),
                        ({"input": "hi", "n": 2}, "n must be 1"),
                        ({"input": "hello there " * 600}, "longer than max_seq_len")):
        with pytest.raises(mstar.RequestError, match=words):
            list(dep.generate(body))


def test_the_prompt_is_the_authors_format(dep, ckpt):
    model = dep.model
    ids = model.prompt_ids("hello there", "leo")
    tokenizer_json = json.loads((ckpt / "tokenizer.json").read_text())
    assert tokenizer_json  # the tiny tokenizer in the hub layout was used
    assert ids[0] == 128259 and ids[1] == 128000
    assert ids[-4:] == [128009, 128260, 128261, 128257]
    assert model.tokenizer().decode(ids[2:-4]) == "leo: hello there"
