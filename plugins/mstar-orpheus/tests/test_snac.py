"""Our SNAC decoder against the `snac` package (the oracle) on the same checkpoint files,
loaded through the shared weight loader as the runtime loads the codec node."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import snac
import torch

from mstar.runtime.chunker import StreamChunker, slice_emitted
from mstar.weights import (
    WeightLoadError,
    checkpoint_files,
    iter_checkpoint,
    load_weights,
    read_checkpoint_config,
    resolve_source,
)
from mstar_orpheus.config import (
    AUDIO_TOKEN_BASE,
    CODEBOOK_SIZE,
    SAMPLES_PER_FRAME,
    TINY_SNAC,
    SnacConfig,
)
from mstar_orpheus.model import STREAM_POLICY
from mstar_orpheus.snac import SnacDecoder, snac_weight_spec, write_tiny_snac

torch.set_num_threads(1)  # tests/conftest.py does not reach plugin test folders

TOL = 1e-5


def load_ours(directory: Path) -> SnacDecoder:
    """Build and load the codec as `mstar.runtime.builder.build_module` does."""
    spec = snac_weight_spec()
    path = resolve_source(str(directory), patterns=spec.patterns, subfolder=spec.subfolder)
    module = SnacDecoder(SnacConfig(**read_checkpoint_config(path))).to(dtype=torch.float32)
    files = checkpoint_files(path, spec.patterns)
    load_weights(module, iter_checkpoint(files, spec.format), spec,
                 dtype=spec.dtype or torch.float32)
    return module.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("snac_tiny")
    write_tiny_snac(directory, SnacConfig(**TINY_SNAC), seed=0)
    return directory


@pytest.fixture(scope="module")
def models(tiny_dir: Path) -> tuple[torch.nn.Module, SnacDecoder]:
    return snac.SNAC.from_pretrained(str(tiny_dir)), load_ours(tiny_dir)


def random_frames(n: int, batch: int, seed: int) -> torch.Tensor:
    """[batch, n, 7] codes: one Orpheus frame is 7 codes (1 + 2 + 4 over the levels)."""
    return torch.randint(0, 4096, (batch, n, 7), generator=torch.Generator().manual_seed(seed))


def levels(frames: torch.Tensor) -> list[torch.Tensor]:
    """Orpheus' frame layout -> SNAC levels: [c0], [c1, c4], [c2, c3, c5, c6] per frame."""
    b, n, _ = frames.shape
    return [frames[..., [0]].reshape(b, n), frames[..., [1, 4]].reshape(b, 2 * n),
            frames[..., [2, 3, 5, 6]].reshape(b, 4 * n)]


def zero_noise(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape)


@pytest.mark.parametrize("num_frames", [1, 2, 4])
def test_decode_matches_package(models, num_frames: int, monkeypatch) -> None:
    reference, ours = models
    codes = levels(random_frames(num_frames, batch=2, seed=num_frames))
    with torch.no_grad():
        torch.manual_seed(123)
        want = reference.decode(codes)
        torch.manual_seed(123)
        got = ours.decode(codes)
        got_quiet = ours.decode(codes, noise=zero_noise)
        monkeypatch.setattr(snac.layers.NoiseBlock, "forward", lambda self, x: x)
        want_quiet = reference.decode(codes)
    assert got.shape == (2, 1, SAMPLES_PER_FRAME * num_frames)
    assert (got - want).abs().max() <= TOL
    assert (got_quiet - want_quiet).abs().max() <= TOL
    # Neither side is trivial: the signal is unsaturated and the noise really is added.
    assert 0.01 < got_quiet.std() and got_quiet.abs().max() < 0.999
    assert (got - got_quiet).abs().max() > 0.01


def keyed_noise(seeds: list[int]) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """Noise for a batch of windows, row w drawn from its own generator seeded `seeds[w]`:
    what `torch.manual_seed(seeds[w])` then a lone decode of window w draws."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])
    return draw


def reference_stream(reference: torch.nn.Module, frames: torch.Tensor,
                     seeds: Iterator[int]) -> list[torch.Tensor]:
    """The reference windowing, written from Orpheus' `tokens_decoder`: once 4 frames are
    in, each new frame decodes the last 4 with the package and keeps samples [2048:4096]
    (one frame of left context, two of lookahead); the first window also gives its frame
    0, samples [0:2048], which the reference drops and we keep (see `mstar_orpheus.model`).
    One chunk per window, each window decoded alone after seeding the global RNG."""
    chunks = []
    for end in range(4, frames.shape[0] + 1):
        torch.manual_seed(next(seeds))
        audio = reference.decode(levels(frames[None, end - 4:end]))[0, 0]
        chunks.append(audio[:4096] if end == 4 else audio[2048:4096])
    return chunks


def test_streaming_windows_match_package(models) -> None:
    """Our side untouched: the LM's tokens go through Orpheus' chunk policy (its frame
    assembler, core's `StreamChunker`), our decoder decodes the ready windows in one batch
    (row w with window w's noise) and core's `slice_emitted` keeps each window's frames."""
    reference, ours = models
    frames = torch.randint(1, 4096, (7, 7), generator=torch.Generator().manual_seed(7))
    tokens = AUDIO_TOKEN_BASE + CODEBOOK_SIZE * torch.arange(7) + frames  # position bands
    chunker = StreamChunker(STREAM_POLICY)
    chunker.push({"token_ids": tokens.reshape(-1)})
    windows = list(iter(chunker.next_window, None))  # before the end: no flush windows
    seeds = [1000 + w for w in range(len(windows))]
    with torch.no_grad():
        want = reference_stream(reference, frames, iter(seeds))
        batch = torch.stack([w.units["token_ids"] for w in windows])
        audio = ours.decode(levels(batch), noise=keyed_noise(seeds))
    got = [slice_emitted(audio[i, 0], w) for i, w in enumerate(windows)]
    assert [g.numel() for g in got] == [w.numel() for w in want] == [2 * SAMPLES_PER_FRAME] + [
        SAMPLES_PER_FRAME] * 3
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL


def test_real_config_keys_map_both_ways() -> None:
    """Every key of the real snac_24khz state dict is loaded into one of our parameters or
    deliberately ignored (encode-only), and every parameter of ours is filled."""
    spec = snac_weight_spec()
    config = SnacConfig()
    with torch.device("meta"):
        theirs = snac.SNAC(**dataclasses.asdict(config)).state_dict()
        ours = SnacDecoder(config)
    targets = ours.state_dict()
    mapped: dict[str, str] = {}
    for key, tensor in theirs.items():
        name = spec.map_key(key)
        if name is None:
            assert key.startswith("encoder.") or ".in_proj." in key, key
            continue
        assert name in targets, f"{key} -> {name}: no such parameter"
        assert targets[name].shape == tensor.shape, key
        assert name not in mapped, f"{key} and {mapped[name]} both map to {name}"
        mapped[name] = key
    assert set(mapped) == set(targets)
    assert any(".parametrizations.weight.original1" in k for k in mapped.values())
    report = load_weights(ours, theirs.items(), spec)  # the loader agrees (meta: no copies)
    assert sorted(report.loaded) == sorted(targets)


def test_missing_decoder_key_fails_clearly(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    key = "decoder.model.3.block.1.parametrizations.weight.original1"
    del state[key]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(WeightLoadError) as err:
        load_ours(tmp_path)
    assert err.value.missing == ["decoder.model.3.block.1.weight_v"]
    assert "decoder.model.3.block.1.weight_v" in str(err.value)


def test_bad_input_and_config_are_refused() -> None:
    with pytest.raises(ValueError, match="attn_window_size=32"):
        SnacDecoder(SnacConfig(**{**TINY_SNAC, "attn_window_size": 32}))
    decoder = SnacDecoder(SnacConfig(**TINY_SNAC))
    codes = levels(random_frames(2, batch=1, seed=0))
    with pytest.raises(ValueError, match="stride equal"):
        decoder.decode([codes[0], codes[1], codes[2][:, :-1]])
    with pytest.raises(ValueError, match="3 code levels"):
        decoder.decode(codes[:2])
