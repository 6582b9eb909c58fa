"""The Python SDK: `MStarClient` (blocking) and `AsyncMStarClient` (asyncio) for an mstar
server, over its native `/generate` and its OpenAI-compatible routes.

Importing it needs httpx and msgspec only (no torch), so it serves client machines that
never run a model.
"""

from mstar.client._async import AsyncByteStream, AsyncMStarClient, AsyncStream
from mstar.client._sync import ByteStream, MStarClient, Stream
from mstar.client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    MStarError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedCapabilityError,
)
from mstar.client.results import (
    Audio,
    ChatChoice,
    ChatDelta,
    ChatResponse,
    GenerateResponse,
    ModelInfo,
    Speech,
)

__all__ = [
    "APIConnectionError", "APITimeoutError", "AsyncByteStream", "Audio", "AsyncMStarClient",
    "AsyncStream", "AuthenticationError", "BadRequestError", "ByteStream", "ChatChoice",
    "ChatDelta", "ChatResponse", "GenerateResponse", "InternalServerError", "MStarClient",
    "MStarError", "ModelInfo", "NotFoundError", "PayloadTooLargeError", "RateLimitError",
    "ServiceUnavailableError", "Speech", "Stream", "UnsupportedCapabilityError",
]
