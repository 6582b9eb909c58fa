"""Our Code2Wav against `transformers`' `Qwen3OmniMoeCode2Wav` (the oracle) on the same
tiny safetensors file, loaded through the shared weight loader: whole utterances, and the
streamed windows cut as the runtime cuts them vs HF's chunked rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeCode2WavConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

from mstar.graph.primitives import ChunkPolicy
from mstar.model import config_from_fields
from mstar.runtime.chunker import StreamChunker, Window, slice_emitted
from mstar.weights import checkpoint_files, iter_checkpoint, load_weights
from mstar_qwen3omni.code2wav import (
    Code2WavConfig,
    Code2WavNode,
    audible_value,
    code2wav_weight_spec,
)

torch.set_num_threads(1)

TOL = 1e-5
#: Two decoder blocks (rates 4, 3) and one ConvNeXt upsampler (2): 24 samples per frame,
#: 15 short at each window's end, more than a whole window of frames in the tests below.
TINY = dict(codebook_size=32, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            sliding_window=4, intermediate_size=64, num_hidden_layers=2, decoder_dim=32,
            upsample_rates=[4, 3], upsampling_ratios=[2])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Qwen3OmniMoeCode2Wav, Code2WavNode]:
    torch.manual_seed(0)
    reference = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(0)
    reference.load_state_dict({k: audible_value(k, v.shape, gen) for k, v in
                               reference.state_dict().items()})
    directory: Path = tmp_path_factory.mktemp("code2wav")
    tensors = {f"code2wav.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    tensors["talker.codec_head.weight"] = torch.zeros(2, 2)  # another node's key: ignored
    save_file(tensors, str(directory / "model.safetensors"))
    cfg = config_from_fields(Code2WavConfig, reference.config.to_dict())
    ours = Code2WavNode(cfg)
    spec = code2wav_weight_spec()
    load_weights(ours, iter_checkpoint(checkpoint_files(directory, spec.patterns), spec.format),
                 spec, dtype=torch.float32)
    return reference, ours.eval()


def codes(frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """[batch, 16, frames] codes."""
    return torch.randint(0, TINY["codebook_size"], (batch, 16, frames),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames", [1, 3, 9])
def test_decode_matches_hf_forward(models, frames: int) -> None:
    reference, ours = models
    c = codes(frames, batch=2, seed=frames)
    with torch.no_grad():
        want = reference(c)[:, 0]
        got = ours.code2wav.decode(c)
    cfg = ours.code2wav.config
    assert got.shape == (2, frames * cfg.total_upsample - cfg.short_by) == want.shape
    assert (got - want).abs().max() <= TOL
    assert 0.02 < float(got.std()) and float(got.abs().max()) < 0.999


def stream_windows(policy: ChunkPolicy, frames: torch.Tensor, step: int) -> list[Window]:
    """The windows the runtime cuts from frames [F, 16] pushed `step` at a time."""
    chunker, windows = StreamChunker(policy), []
    for start in range(0, frames.shape[0], step):
        chunker.push({"codes": frames[start:start + step]})
        windows += iter(chunker.next_window, None)
        chunker.release()
    chunker.end()
    return windows + list(iter(chunker.next_window, None))


def hf_chunked(reference: Qwen3OmniMoeCode2Wav, c: torch.Tensor,
               windows: list[Window]) -> torch.Tensor:
    """HF's `chunked_decode` rule on the given window boundaries: decode each window and
    keep its output after the left context."""
    up = int(reference.total_upsample)
    return torch.cat([reference(c[..., w.win_start:w.win_end])[..., (w.emit_start -
                                                                      w.win_start) * up:]
                      for w in windows], dim=-1)[0, 0]


@pytest.mark.parametrize("first_chunk", [None, 2])
def test_streamed_windows_match_hf_chunked_decode(models, first_chunk: int | None) -> None:
    reference, ours = models
    left, chunk, total = 3, 5, 19
    policy = ChunkPolicy(window=left + chunk, hop=chunk, emit=(left, left + chunk),
                         first_chunk=first_chunk)
    c = codes(total, seed=5)
    windows = stream_windows(policy, c[0].T, step=3)
    items = [{"codes": w.units["codes"]} for w in windows]
    with torch.no_grad():
        audio = ours(items)  # every window in one call, as the engine batches them
        got = torch.cat([slice_emitted(a["audio"], w, rows_per_unit=ours.rows_per_unit["audio"])
                         for a, w in zip(audio, windows)])
        want = hf_chunked(reference, c, windows)
        if first_chunk is None:
            assert torch.equal(want, reference.chunked_decode(c, chunk, left)[0, 0])
    short = ours.code2wav.config.short_by
    assert short > left + chunk  # the runtime could not infer the rows per frame itself
    assert got.shape == want.shape == (total * 24 - short * len(windows),)
    assert (got - want).abs().max() <= TOL


def test_real_size_keys_and_shortfall_match_hf() -> None:
    """At the real size (on the meta device): the hub's `code2wav.*` keys are our
    parameters with their shapes, and a window is 1920 samples per frame less 555."""
    with torch.device("meta"):
        theirs = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig())
        ours = Code2WavNode(Code2WavConfig())
    spec = code2wav_weight_spec()
    hub = {spec.map_key(f"code2wav.{k}"): tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert hub == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert spec.map_key("talker.codec_head.weight") is None
    cfg = ours.code2wav.config
    assert (cfg.total_upsample, cfg.short_by) == (int(theirs.total_upsample), 555)
