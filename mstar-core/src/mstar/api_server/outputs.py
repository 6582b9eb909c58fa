"""A finished request's outputs by name, for the non-streamed `/generate` answer: as JSON
(`outputs` beside the events) or as one safetensors body (`Accept:
application/vnd.safetensors`), so a script reads `outputs["actions"]` without walking the
events, and a large tensor need not travel as base64.

Names: a `NamedTensor` keeps its own, the audio chunks are "audio", an image is "image"; an
output of completion i > 0 (`n` > 1) gets the suffix `.i`. The pieces of one name (a tensor
per rollout step, audio chunks) are concatenated along their first axis (a 0-d piece counts
as one row), so the output's rank does not depend on how many pieces there were; an image
output is the completion's last image (the events keep every one).
"""

from __future__ import annotations

import io
import json
from typing import Any

from mstar import events

SAFETENSORS = "application/vnd.safetensors"

#: One output: a tensor, the audio (its chunks joined) or an image.
Output = events.TensorData | events.AudioChunk | events.Image


def _key(name: str, index: int) -> str:
    return name if index == 0 else f"{name}.{index}"


def _concat(name: str, pieces: list[events.TensorData]) -> events.TensorData:
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    rows = 0
    for piece in pieces:
        if piece.dtype != first.dtype or piece.shape[1:] != first.shape[1:]:
            raise ValueError(f"output {name!r}: pieces of {first.dtype} {first.shape} and "
                             f"{piece.dtype} {piece.shape} do not concatenate along their "
                             "first axis")
        rows += piece.shape[0] if piece.shape else 1
    return events.TensorData(first.dtype, [rows, *first.shape[1:]],
                             b"".join(piece.data for piece in pieces))


def collect_outputs(collected: list[events.Event]) -> dict[str, Output]:
    """Every output of a finished request by name (see the module docstring)."""
    tensors: dict[str, list[events.TensorData]] = {}
    audio: dict[str, list[events.TensorData]] = {}
    rates: dict[str, int] = {}
    out: dict[str, Output] = {}
    for event in collected:
        if isinstance(event, events.NamedTensor):
            tensors.setdefault(_key(event.name, event.index), []).append(event.tensor)
        elif isinstance(event, events.AudioChunk):
            key = _key("audio", event.index)
            audio.setdefault(key, []).append(event.samples)
            rates[key] = event.sample_rate
        elif isinstance(event, events.Image):
            out[_key("image", event.index)] = event
    for key, pieces in audio.items():
        out[key] = events.AudioChunk(_concat(key, pieces), rates[key])
    for key, pieces in tensors.items():
        if key in out:
            raise ValueError(f"output {key!r}: the model emitted a tensor under the name "
                             "of its audio or image")
        out[key] = _concat(key, pieces)
    return out


def outputs_json(outputs: dict[str, Output]) -> dict[str, Any]:
    """The `outputs` of the JSON answer: a tensor as `{"dtype", "shape", "data"}`, audio as
    `{"sample_rate", "dtype", "shape", "data"}`, an image as `{"mime_type", "data"}` (bytes
    are written as base64 by msgspec)."""
    out: dict[str, Any] = {}
    for key, value in outputs.items():
        if isinstance(value, events.AudioChunk):
            samples = value.samples
            out[key] = {"sample_rate": value.sample_rate, "dtype": samples.dtype,
                        "shape": samples.shape, "data": samples.data}
        elif isinstance(value, events.Image):
            out[key] = {"mime_type": value.mime_type, "data": value.data}
        else:
            out[key] = value
    return out


def safetensors_body(outputs: dict[str, Output], metadata: dict[str, Any]) -> bytes:
    """One safetensors file holding every output by name (audio as its float samples, an
    image as its decoded uint8 pixels [H, W(, C)]); its metadata: the given values
    (JSON-encoded where they are not strings) and `outputs`, each output's kind
    (`{"kind": "tensor" | "audio" | "image", "sample_rate" | "mime_type"}`), so a client
    rebuilds what the JSON answer would give."""
    import numpy as np
    import torch
    from PIL import Image as PILImage
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for key, value in outputs.items():
        if isinstance(value, events.AudioChunk):
            tensors[key] = value.samples.to_tensor()
            kinds[key] = {"kind": "audio", "sample_rate": value.sample_rate}
        elif isinstance(value, events.Image):
            with PILImage.open(io.BytesIO(value.data)) as image:
                tensors[key] = torch.from_numpy(np.array(image))
            kinds[key] = {"kind": "image", "mime_type": value.mime_type}
        else:
            tensors[key] = value.to_tensor()
            kinds[key] = {"kind": "tensor"}
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save(tensors, metadata={**header, "outputs": json.dumps(kinds)})


def _media_ranges(accept: str) -> dict[str, float]:
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if kind:
            ranges[kind.lower()] = max(q, ranges.get(kind.lower(), 0.0))
    return ranges


def wants_safetensors(accept: str | None) -> bool:
    """Whether `Accept` prefers the safetensors answer: it names it with a q above 0, at
    least that of any wildcard and above that of `application/json` (so `*/*`, no header
    and `application/json` keep the JSON answer)."""
    if not accept:
        return False
    ranges = _media_ranges(accept)
    q = ranges.get(SAFETENSORS, 0.0)
    wildcard = max(ranges.get("*/*", 0.0), ranges.get("application/*", 0.0))
    return q > 0 and q >= wildcard and q > ranges.get("application/json", 0.0)


__all__ = ["SAFETENSORS", "Output", "collect_outputs", "outputs_json", "safetensors_body",
           "wants_safetensors"]
