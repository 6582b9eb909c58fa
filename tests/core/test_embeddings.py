"""The shared position/time embeddings against diffusers' implementations of the same DiT/MAE
conventions (an independent implementation), and patchify's round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from mstar.model.layers.embeddings import (
    PositionTable,
    flattened_position_ids,
    patchify,
    period_sincos,
    sincos_2d_table,
    timestep_frequencies,
    unpatchify,
)


@pytest.mark.parametrize(("dim", "side"), [(8, 3), (32, 5)])
def test_sincos_table_matches_diffusers(dim: int, side: int) -> None:
    ref = get_2d_sincos_pos_embed(dim, side, base_size=side, output_type="pt")
    torch.testing.assert_close(sincos_2d_table(dim, side), ref.float(), atol=1e-6, rtol=0)
    table = PositionTable(side, dim)
    ids = flattened_position_ids(2 * 4, 3 * 4, 4, side)
    assert ids.tolist() == [0, 1, 2, side, side + 1, side + 2]
    torch.testing.assert_close(table(ids), ref.float()[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_frequencies_match_diffusers(dim: int) -> None:
    t = torch.tensor([0.0, 0.25, 0.999, 3.5])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_frequencies(t, dim), ref, atol=1e-5, rtol=0)


def test_period_sincos_spans_min_to_max_period() -> None:
    """Periods 0.5, 1, 2 (geometric, both ends) at t = 0.25: angles pi, pi/2, pi/4."""
    got = period_sincos(torch.tensor([0.25, 0.0]), 6, min_period=0.5, max_period=2.0)
    h = 0.5 ** 0.5
    want = torch.tensor([[0.0, 1.0, h, -1.0, 0.0, h], [0, 0, 0, 1, 1, 1]])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="must be even"):
        period_sincos(torch.zeros(1), 5, min_period=0.5, max_period=2.0)


def test_patchify_orders_row_col_channel_and_round_trips() -> None:
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    patches = patchify(image, 2)
    assert patches.shape == (2 * 3, 2 * 2 * 3)
    # patch (1, 2), inner (row 1, col 0), channel 2 == pixel (2, row 3, col 4)
    assert patches[1 * 3 + 2, (1 * 2 + 0) * 3 + 2] == image[2, 3, 4]
    assert torch.equal(unpatchify(patches, (2, 3), 2), image)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(image, 4)


def test_interpolated_ids_spread_over_the_table() -> None:
    ids = flattened_position_ids(4, 4, 2, 4, interpolate=True)  # a 2x2 grid on a 4x4 table
    assert ids.tolist() == [0, 2, 8, 10]
    assert np.unique(flattened_position_ids(64, 64, 8, 4, interpolate=True)).size == 16
    with pytest.raises(ValueError, match="does not fit"):
        flattened_position_ids(40, 8, 8, 4)
