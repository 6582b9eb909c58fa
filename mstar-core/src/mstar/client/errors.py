"""The SDK's exceptions: one class per kind of failure a caller may want to handle apart.

A server error keeps what the server said (its OpenAI-shaped `{"error": {...}}` body or an
`error` event of a stream) and the response's `x-request-id`, so a failure can be found in
the server's log. Status codes without a class of their own raise `MStarError` itself.
"""

from __future__ import annotations


class MStarError(Exception):
    """Any failure of an SDK call. `status` is the HTTP status (None when no response came);
    `type`, `param` and `code` are the server's error fields."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status, self.type, self.param, self.code = status, type, param, code
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (request id {self.request_id})" if self.request_id and \
            self.request_id not in self.message else ""
        status = f"{self.status}: " if self.status is not None else ""
        return f"{status}{self.message}{where}"


class BadRequestError(MStarError):
    """400: the request was invalid; `param` names the field when the server knows it."""


class AuthenticationError(MStarError):
    """401: missing or wrong API key."""


class NotFoundError(MStarError):
    """404: no such route or model."""


class PayloadTooLargeError(MStarError):
    """413: the body is over the server's limit."""


class RateLimitError(MStarError):
    """429: the server is at its limit of concurrent requests."""


class ServiceUnavailableError(MStarError):
    """503: the deployment is starting or cannot serve."""


class InternalServerError(MStarError):
    """Any other 5xx, including 504 when a request fell silent past the server's timeout."""


class UnsupportedCapabilityError(MStarError):
    """A model method (e.g. `act`, `tts`) called on a model whose `/v1/models` entry lacks
    the capability it needs; raised before the call is sent."""


class APIConnectionError(MStarError):
    """No usable response: the server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The client's own timeout passed before the server answered."""


_BY_STATUS: dict[int, type[MStarError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError,
    413: PayloadTooLargeError, 429: RateLimitError, 503: ServiceUnavailableError,
}


def error_class(status: int) -> type[MStarError]:
    """The exception class for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return InternalServerError if status >= 500 else MStarError


__all__ = ["APIConnectionError", "APITimeoutError", "AuthenticationError", "BadRequestError",
           "InternalServerError", "MStarError", "NotFoundError", "PayloadTooLargeError",
           "RateLimitError", "ServiceUnavailableError", "UnsupportedCapabilityError",
           "error_class"]
