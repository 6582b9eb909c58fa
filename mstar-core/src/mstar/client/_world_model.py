"""The world-model calls (`encode_video`, `rollout`, `plan`; V-JEPA 2 and V-JEPA 2-AC): their
`/generate` fields, and the arrays read back from the answer.

One request schema serves the three calls, told apart by `mode`; the clip goes as `video`
(a file, bytes or URL: the server decodes and samples it) or, given as an array, as
`frames` (pixels the caller already holds, [T, H, W, 3] uint8 or [T, 3, H, W] float). A
rollout's steps arrive as one `rollout` tensor each, so a streamed rollout yields every
step's latents as the server computes it, and a non-streamed one stacks the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar import events
from mstar.client import _protocol as protocol
from mstar.client import _tensors as tensors
from mstar.client._media import _URL_SCHEMES
from mstar.client.errors import MStarError
from mstar.client.results import GenerateResponse

if TYPE_CHECKING:
    import numpy as np

#: The output holding one rollout step's predicted latents.
ROLLOUT_OUTPUT = "rollout"


def clip(value: object, name: str = "video") -> object:
    """A clip as a field value: a str that is no URL is a file path (a `Path`, read and
    sent as its bytes); anything else as given."""
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, str) and not value.startswith(_URL_SCHEMES):
        return Path(value)
    return value


def video_fields(video: object) -> dict[str, Any]:
    """`{"frames": array}` for pixels as an array, else `{"video": clip}`."""
    if tensors.is_tensor(video):
        return {"frames": video}
    return {"video": clip(video)}


def _given(**fields: Any) -> dict[str, Any]:
    """The fields the caller set (None leaves the server's default)."""
    return {name: value for name, value in fields.items() if value is not None}


def encode_fields(video: object, fields: dict[str, Any]) -> dict[str, Any]:
    return {**video_fields(video), "mode": "encode", **fields}


def rollout_fields(video: object, actions: object, states: object, steps: int | None,
                   fields: dict[str, Any]) -> dict[str, Any]:
    return {**video_fields(video), "mode": "rollout",
            **_given(actions=actions, states=states, rollout_steps=steps), **fields}


def plan_fields(video: object, goal: object, states: object, fields: dict[str, Any],
                **cem: int | None) -> dict[str, Any]:
    """A plan's fields; `cem` holds samples, iterations, horizon and topk (None: the
    authors' planner defaults, which the server applies)."""
    return {**video_fields(video), "mode": "plan", "goal": clip(goal, "goal"),
            **_given(states=states, **cem), **fields}


def output(answer: GenerateResponse, name: str) -> np.ndarray:
    """The answer's output `name` (a numpy array)."""
    if name not in answer.outputs:
        raise MStarError(f"the answer has no {name!r} output (it has: "
                         f"{', '.join(answer.outputs) or 'none'})", request_id=answer.request_id)
    return answer.outputs[name]


def step_latents(tensor: events.TensorData) -> np.ndarray:
    """One rollout step's latents as [tokens, dim] (whatever leading axes of 1 it came with)."""
    array = tensors.to_numpy(tensor.dtype, list(tensor.shape), tensor.data)
    return array.reshape(-1, array.shape[-1])


def rollout_steps(answer: GenerateResponse) -> np.ndarray:
    """A finished rollout's latents, [steps, tokens, dim], from its per-step events."""
    import numpy as np

    steps = [step_latents(e.tensor) for e in answer.events
             if isinstance(e, events.NamedTensor) and e.name == ROLLOUT_OUTPUT]
    if not steps:
        output(answer, ROLLOUT_OUTPUT)  # raises, naming what the answer has
    return np.stack(steps)


def parse_rollout_frame(frame: protocol.SSEFrame, rid: str | None) -> Sequence[np.ndarray]:
    """One SSE frame of a streamed rollout: a step's latents, or nothing (other events)."""
    return [step_latents(e.tensor) for e in protocol.parse_generate_frame(frame, rid)
            if isinstance(e, events.NamedTensor) and e.name == ROLLOUT_OUTPUT]


#: `/generate` streamed as the rollout's steps (the route's answer, not streamed, is as
#: `GENERATE`'s).
ROLLOUT: protocol.Route[GenerateResponse, Any] = protocol.Route(
    "POST", "/generate", protocol.parse_generate, parse_rollout_frame)
