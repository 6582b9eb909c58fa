"""What a request's media may cost the server, and the one error every media failure becomes.

Media arrive from untrusted clients (URLs, inline data, uploads), so every path that fetches
or decodes them is bounded by one `MediaLimits`, built from the server settings
(`ServerSettings.media_limits`). A failure is a `MediaError` carrying the HTTP status the API
server answers with, so the routes translate it without knowing which check failed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one media item. Sizes are per item, fetched or inline; pixel and duration
    limits are checked from headers before decoding wherever the format allows."""

    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    fetch_timeout_s: float = 10.0
    max_redirects: int = 5
    allow_private_urls: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "max_redirects":
                if value < 0:
                    raise ValueError(f"MediaLimits.max_redirects must be >= 0, got {value}")
            elif field.name != "allow_private_urls" and value <= 0:
                raise ValueError(f"MediaLimits.{field.name} must be > 0, got {value}")


class MediaError(ValueError):
    """Bad or refused media, with the HTTP status the client should get.

    `status` is 400 for bad, unsupported or refused input (a fetch that times out too: the
    client's URL is at fault) and 413 for input over a size, pixel or duration limit.
    `param` names the request field at fault (e.g. "messages[1].content[0].image_url"); the
    media code never knows it, so the caller sets it before answering.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def too_large(what: str, limit: float | int, unit: str) -> MediaError:
    """The 413 for `what` over `limit` `unit`s (one wording for every limit)."""
    shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
    return MediaError(f"{what} exceeds the limit of {shown} {unit}", status=413)
