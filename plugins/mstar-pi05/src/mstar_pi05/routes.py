"""Pi0.5's openpi policy route (capability "openpi_policy"): openpi's websocket policy
protocol, so a robot stack built on `openpi_client.websocket_client_policy.
WebsocketClientPolicy` talks to mstar unchanged.

The protocol (openpi's `WebsocketPolicyServer`): on connect the server sends its metadata;
then each binary frame is one observation dict and is answered by one frame
`{"actions": float32 [H, robot action dim], "server_timing": {"infer_ms": ...}}`, all
msgpack with numpy arrays packed as openpi's `msgpack_numpy` does; an error goes back as a
text frame (the client raises `RuntimeError` with it) and the connection stays usable.

Each observation becomes one request of the model's own `/generate` body
(`context.generate`), so websocket robots are batched with HTTP ones. The observation's
format is told from its keys (`FORMATS`: openpi's DROID and LIBERO dicts as its
`DroidInputs` / `LiberoInputs` read them, or the native `images`/`state`/`prompt`), images
are taken as openpi's `_parse_image` takes them (uint8 or float [0, 1], HWC or CHW), and the
answer is cut to the format's action width (openpi's `DroidOutputs` / `LiberoOutputs`).

Served at `/v1/pi05/policy` on the main port and, with `--policy-ws-port`, at `/` on that
port (where openpi clients connect: `ws://host:port`). Core's `RouteContext` does the rest
(the API key, here as openpi's `Authorization: Api-Key <key>`, ids, limits, metrics,
cancellation when the client leaves).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict

from mstar import events
from mstar.api_server.plugin_routes import Caller, RouteContext
from mstar.api_server.request_flow import ApiError

PATH = "/v1/pi05/policy"
#: numpy dtype kinds an array in an observation may have: bool, ints, floats
ARRAY_KINDS = "biuf"


@dataclass(frozen=True)
class ObservationFormat:
    """An openpi observation dict: which key holds which camera, which keys (in order) make
    the state, and how many action dimensions the robot takes."""

    name: str
    cameras: Mapping[str, str]
    state: tuple[str, ...]
    action_dim: int

    def describe(self) -> dict[str, Any]:
        return {"images": dict(self.cameras), "state": list(self.state), "prompt": "prompt",
                "action_dim": self.action_dim}


#: By the key that tells each apart (its first camera), as openpi's `DroidInputs` /
#: `LiberoInputs` read them and its `DroidOutputs` / `LiberoOutputs` cut the actions.
FORMATS = {
    "observation/exterior_image_1_left": ObservationFormat(
        "droid", {"observation/exterior_image_1_left": "base_0_rgb",
                  "observation/wrist_image_left": "left_wrist_0_rgb"},
        ("observation/joint_position", "observation/gripper_position"), 8),
    "observation/image": ObservationFormat(
        "libero", {"observation/image": "base_0_rgb",
                   "observation/wrist_image": "left_wrist_0_rgb"},
        ("observation/state",), 7),
}
#: mstar's extras an openpi observation may carry (replayable chunks, fewer flow steps).
OPTIONS = ("seed", "num_steps")
#: The native observation: the `/generate` body's fields, arrays allowed.
NATIVE_KEYS = ("images", "prompt", "state", "action_dim", *OPTIONS, "noise")


# -- openpi's msgpack-numpy framing ------------------------------------------------------------
def _unpack(value: Any) -> Any:
    """msgpack-numpy's packed arrays and scalars (maps keyed `b"__ndarray__"` /
    `b"__npgeneric__"`) back to numpy, everywhere in a decoded frame."""
    if isinstance(value, dict):
        if b"__ndarray__" in value:
            return _array(value)
        if b"__npgeneric__" in value:
            return _scalar(value)
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


def _dtype(packed: Mapping[bytes, Any]) -> np.dtype:
    try:
        dtype = np.dtype(packed[b"dtype"])
    except (KeyError, TypeError) as exc:
        raise ApiError(400, f"a packed array's dtype is missing or unknown: {exc}") from None
    if dtype.kind not in ARRAY_KINDS:
        raise ApiError(400, f"unsupported array dtype {dtype.str!r} (bool, int, uint and "
                            "float arrays only)")
    return dtype


def _array(packed: Mapping[bytes, Any]) -> np.ndarray:
    dtype, data, shape = _dtype(packed), packed.get(b"data"), packed.get(b"shape")
    if not isinstance(data, bytes) or not isinstance(shape, list) or not all(
            isinstance(d, int) and d >= 0 for d in shape):
        raise ApiError(400, "a packed array needs bytes data and a shape of non-negative "
                            "integers")
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ApiError(400, f"a packed {dtype.str} array of shape {shape} holds "
                            f"{int(np.prod(shape)) * dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _scalar(packed: Mapping[bytes, Any]) -> np.generic:
    dtype = _dtype(packed)
    try:
        return dtype.type(packed.get(b"data"))
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"a packed {dtype.str} scalar: {exc}") from None


def _pack(value: Any) -> Any:
    """msgspec's hook for what it cannot encode: numpy as msgpack-numpy packs it."""
    if isinstance(value, np.ndarray):
        return {b"__ndarray__": True, b"data": value.tobytes(), b"dtype": value.dtype.str,
                b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise NotImplementedError(f"cannot pack {type(value).__name__}")


class MsgpackNumpy:
    """openpi's framing as core's websocket codec: msgpack-numpy both ways, answers without
    frame ids, an error as a text frame (which openpi_client raises as RuntimeError)."""

    answers_carry_id = False

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_pack)

    def decode(self, frame: bytes | str) -> dict[str, Any]:
        if not isinstance(frame, bytes):
            raise ApiError(400, "this route takes msgpack-numpy observations in binary "
                                "frames")
        try:
            value = msgspec.msgpack.decode(frame)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the frame is not valid msgpack: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "an observation is a msgpack map")
        return _unpack(value)

    def encode(self, answer: Mapping[str, Any]) -> bytes:
        return self._encoder.encode(answer)

    def error(self, status: int, body: Mapping[str, Any]) -> str:
        error = body["error"]
        param = f" (param: {error['param']})" if error.get("param") else ""
        return f"{status} {error['type']}{param}: {error['message']}"


# -- observation -> the /generate body ---------------------------------------------------------
class Observation(BaseModel):
    """One openpi observation dict, whatever its format: checked and mapped by
    `generate_body`, which names the openpi key at fault."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def observation_format(obs: Mapping[str, Any]) -> ObservationFormat | None:
    """The openpi format of `obs` (None: the native one); 400 when it is neither."""
    for key, fmt in FORMATS.items():
        if key in obs:
            return fmt
    if "images" in obs:
        return None
    raise ApiError(400, "unknown observation format: expected openpi's DROID keys ("
                        f"{', '.join(_keys(FORMATS['observation/exterior_image_1_left']))}), "
                        "its LIBERO keys ("
                        f"{', '.join(_keys(FORMATS['observation/image']))}) or mstar's "
                        f"({', '.join(NATIVE_KEYS[:3])}); got {sorted(map(str, obs))}")


def _keys(fmt: ObservationFormat) -> list[str]:
    return [*fmt.cameras, *fmt.state, "prompt"]


def image_tensor(value: Any, key: str) -> dict[str, Any]:
    """An observation's camera image as the `/generate` tensor form of an image: uint8 HWC,
    converted as openpi's `_parse_image` does (float [0, 1] -> uint8 by `255 * x`, CHW ->
    HWC; other integer arrays of 0..255 are taken as uint8, a float outside [0, 1] is
    clipped rather than wrapped)."""
    image = np.asarray(value) if isinstance(value, np.ndarray | list) else None
    if image is None or image.dtype.kind not in "iuf" or image.ndim != 3 or (
            image.dtype.kind == "f" and not np.isfinite(image).all()) or (
            image.dtype.kind in "iu" and image.size and not 0 <= image.min() <= image.max()
            <= 255):
        raise ApiError(400, f"{key}: not an image: expected an array [H, W, 3] (uint8, or "
                            "float in [0, 1]; [3, H, W] too), got "
                            f"{_shown(value)}", param=key)
    if image.dtype.kind == "f":
        image = np.clip(255 * image, 0, 255)
    image = image.astype(np.uint8)
    if image.shape[0] == 3:
        image = image.transpose(1, 2, 0)
    if image.shape[2] != 3:
        raise ApiError(400, f"{key}: not an image: expected [H, W, 3] RGB, got "
                            f"{_shown(image)}", param=key)
    return _tensor_json(image)


def _tensor_json(array: np.ndarray) -> dict[str, Any]:
    """The JSON tensor form of `/generate` (the body travels to the data worker as is)."""
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode()}


def _shown(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def _vector(value: Any, key: str) -> np.ndarray:
    """A state part as a 1-D float vector (a scalar, as a gripper position may be, is one
    value)."""
    vector = np.atleast_1d(np.asarray(value)) if isinstance(
        value, np.ndarray | np.generic | list | int | float) else None
    if vector is None or vector.dtype.kind not in ARRAY_KINDS or vector.ndim != 1:
        raise ApiError(400, f"{key}: expected a vector of numbers, got {_shown(value)}",
                       param=key)
    vector = vector.astype(np.float64)
    if not np.isfinite(vector).all():  # named here: the model sees only the joined state
        raise ApiError(400, f"{key}: every value must be finite, got {vector.tolist()}",
                       param=key)
    return vector


def _prompt(obs: Mapping[str, Any]) -> dict[str, str]:
    prompt = obs.get("prompt")
    if isinstance(prompt, bytes):  # as openpi's DroidInputs takes it
        prompt = prompt.decode("utf-8", errors="replace")
    return {} if prompt is None else {"prompt": prompt}


def generate_body(obs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's `/generate` body for openpi observation `obs` (see the module
    docstring); the model checks the rest (cameras, state length, prompt) and names it."""
    fmt = observation_format(obs)
    if fmt is None:
        return _native_body(obs)
    missing = [key for key in (*fmt.cameras, *fmt.state) if key not in obs]
    if missing:
        raise ApiError(400, f"{missing[0]}: required in a {fmt.name} observation (keys: "
                            f"{', '.join(_keys(fmt))})", param=missing[0])
    state = np.concatenate([_vector(obs[key], key) for key in fmt.state])
    return {"images": {camera: image_tensor(obs[key], key) for key, camera in
                       fmt.cameras.items()},
            "state": state.tolist(), "action_dim": fmt.action_dim, **_prompt(obs),
            **_numbers(obs, OPTIONS)}


def _numbers(obs: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`keys` of `obs` that are there, numpy scalars (or 0-d arrays) as Python numbers."""
    return {key: obs[key].item() if isinstance(obs[key], np.generic | np.ndarray) and
            np.ndim(obs[key]) == 0 else obs[key] for key in keys if key in obs}


def _native_body(obs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(str(k) for k in obs if k not in NATIVE_KEYS)
    if unknown:
        raise ApiError(400, f"{unknown[0]}: not a field of the observation (fields: "
                            f"{', '.join(NATIVE_KEYS)})", param=unknown[0])
    images = obs["images"]
    if isinstance(images, list):
        images = [_native_image(image, f"images[{i}]") for i, image in enumerate(images)]
    elif isinstance(images, dict):
        images = {cam: _native_image(image, f"images.{cam}") for cam, image in images.items()}
    else:
        raise ApiError(400, "images: expected a map of camera name -> image, or a list",
                       param="images")
    body = {**obs, **_prompt(obs), "images": images,
            **_numbers(obs, ("action_dim", *OPTIONS))}
    if "state" in obs:
        body["state"] = _vector(obs["state"], "state").tolist()
    if isinstance(obs.get("noise"), np.ndarray):
        body["noise"] = _tensor_json(obs["noise"].astype(np.float32))
    return body


def _native_image(image: Any, key: str) -> Any:
    """A native observation's image: an array as `image_tensor`; a URL or data URL as it
    is."""
    return image if isinstance(image, str) else image_tensor(image, key)


def actions_of(evs: list[events.Event]) -> np.ndarray:
    for event in evs:
        if isinstance(event, events.NamedTensor) and event.name == "actions":
            return event.tensor.to_tensor().numpy().astype(np.float32)
    raise ApiError(500, "the model finished without actions")


def metadata(context: RouteContext) -> dict[str, Any]:
    """What the server tells each client on connect (openpi_client's
    `get_server_metadata()`): the model, its action chunk and the observation formats."""
    config = context.model.get("config", {})
    described = {"model": context.model["name"], "protocol": "openpi-websocket-policy",
                 "observation_formats": {fmt.name: fmt.describe() for fmt in FORMATS.values()}}
    for key in ("action_horizon", "action_dim", "state_dim", "cameras",
                "num_inference_steps"):
        if key in config:
            described[key] = config[key]
    return described


def add_policy_routes(context: RouteContext) -> None:
    async def infer(caller: Caller, obs: Observation) -> Mapping[str, Any]:
        body = generate_body(obs.fields())
        started = time.monotonic()
        actions = actions_of(await context.generate(caller, body))
        return {"actions": actions,
                "server_timing": {"infer_ms": (time.monotonic() - started) * 1000}}

    # with --policy-ws-port, core serves it on that port too, at "/" as well (openpi's)
    context.websocket(PATH, Observation, infer, hello=metadata(context), codec=MsgpackNumpy(),
                      port=context.settings.policy_ws_port)
