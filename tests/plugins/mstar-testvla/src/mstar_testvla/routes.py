"""testvla's policy routes (capability "testvla_policy"), the shape of a robot policy
server: an observation in, an action chunk out, over HTTP (`POST /v1/testvla/act`, JSON) or
a WebSocket (`/v1/testvla/policy`, msgpack frames, one observation per frame, as openpi's
policy server). With `--policy-ws-port`, a second WebSocket route in a framing of its own
(`JsonFrames`: JSON text frames, answers without ids) is also served on that port, as a
robot protocol is. Only the protocols are here: what every route needs (the API key,
request ids, limits, errors, metrics, cancellation, the own port) is core's
`RouteContext`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from mstar import events
from mstar.api_server.plugin_routes import Caller, RouteContext
from mstar.api_server.request_flow import ApiError

#: Frame format of the WebSocket route, sent in its first frame.
PROTOCOL = "testvla-policy/1"


class Observation(BaseModel):
    """What the robot sees and is told; denoising settings of the action chunk."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="The instruction.")
    image: list[list[list[float]]] | None = Field(
        None, description="Camera pixels [3][H][W] (H and W multiples of the patch size).")
    num_steps: int = Field(10, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(1.0, ge=1.0, le=100.0, description="CFG scale.")
    seed: int | None = Field(None, ge=0, lt=2 ** 63)


class JsonFrames:
    """A framing other than core's default: a JSON object per text frame; answers are
    JSON text without the frame's id; an error is `{"status", "message"}`."""

    answers_carry_id = False

    def decode(self, frame: bytes | str) -> dict[str, Any]:
        try:
            value = msgspec.json.decode(frame)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the frame is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the frame must be a JSON object")
        return value

    def encode(self, answer: Mapping[str, Any]) -> str:
        return msgspec.json.encode(answer).decode()

    def error(self, status: int, body: Mapping[str, Any]) -> str:
        return self.encode({"status": status, "message": body["error"]["message"]})


def native(obs: Observation) -> dict[str, Any]:
    """The model's own `/generate` request for `obs` (act mode; the image, if any, before
    the prompt)."""
    return {**obs.model_dump(exclude_none=True), "mode": "act"}


def add_policy_routes(context: RouteContext) -> None:
    async def act(caller: Caller, obs: Observation) -> Mapping[str, Any]:
        evs = await context.generate(caller, native(obs))
        for event in evs:
            if isinstance(event, events.NamedTensor) and event.name == "actions":
                return {"actions": event.tensor}
        raise ApiError(500, "the model finished without actions")

    context.post("/v1/testvla/act", Observation, act, description="An observation; the "
                 "answer's `actions` is the action chunk as a tensor.")
    hello = {"protocol": PROTOCOL, "model": context.model["name"]}
    context.websocket("/v1/testvla/policy", Observation, act, hello=hello)
    if context.settings.policy_ws_port is not None:
        context.websocket("/v1/testvla/policy-json", Observation, act, hello=hello,
                          codec=JsonFrames(), port=context.settings.policy_ws_port)
