"""How `/generate` names a finished request's outputs (`mstar.api_server.outputs`), for the
cases testvla cannot produce end to end (it is served in tests/e2e/test_outputs.py): the
outputs of completion i > 0, 0-d pieces, the last of several images, a name clash, and
pieces that do not concatenate."""

from __future__ import annotations

import pytest
import torch

from mstar import events
from mstar.api_server.outputs import collect_outputs, wants_safetensors


def tensor(*values: float, shape: list[int] | None = None) -> events.TensorData:
    t = torch.tensor(values, dtype=torch.float32)
    return events.TensorData.from_tensor(t.reshape(shape) if shape is not None else t)


def test_completions_after_the_first_get_their_index_as_suffix():
    out = collect_outputs([
        events.NamedTensor("loss", tensor(1.0, shape=[])),
        events.NamedTensor("loss", tensor(2.0, shape=[])),
        events.NamedTensor("loss", tensor(3.0, shape=[]), index=1),
        events.AudioChunk(tensor(0.5, 0.25), 24000, index=1),
        events.Image(b"first", index=1), events.Image(b"last", index=1),
        events.Finished("stop")])
    assert out.keys() == {"loss", "loss.1", "audio.1", "image.1"}
    assert out["loss"].to_tensor().tolist() == [1.0, 2.0]  # 0-d pieces are rows
    assert out["loss.1"].to_tensor().shape == ()  # a lone piece keeps its shape
    assert out["audio.1"].sample_rate == 24000
    assert out["audio.1"].samples.to_tensor().tolist() == [0.5, 0.25]
    assert out["image.1"].data == b"last"


def test_a_clash_or_pieces_that_do_not_concatenate_are_errors():
    with pytest.raises(ValueError, match="'audio'"):
        collect_outputs([events.AudioChunk(tensor(0.5), 16000),
                         events.NamedTensor("audio", tensor(1.0))])
    with pytest.raises(ValueError, match=r"'x': pieces of float32 \[1, 2\] and float32 \[3\]"):
        collect_outputs([events.NamedTensor("x", tensor(1, 2, shape=[1, 2])),
                         events.NamedTensor("x", tensor(1, 2, 3))])


@pytest.mark.parametrize(("accept", "binary"), [
    (None, False), ("*/*", False), ("application/json", False),
    ("application/vnd.safetensors", True), ("application/vnd.safetensors, */*", True),
    ("application/json, application/vnd.safetensors", False),
    ("application/json;q=0.9, application/vnd.safetensors", True),
    ("application/vnd.safetensors;q=0", False), ("application/vnd.safetensors;q=x", False),
    ("*/*;q=1, application/vnd.safetensors;q=0.5", False)])
def test_accept_picks_the_safetensors_answer_only_when_preferred(accept, binary):
    assert wants_safetensors(accept) is binary
