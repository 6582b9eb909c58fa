"""`RequestError`: a request's own input is wrong, and it fails alone.

It lives at the top of the package because every layer raises or catches it: the model's
`process_prompt` and the engines raise it, the runtime turns it into an `Error` event and
the HTTP app into a 4xx answer.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request's input is wrong (HTTP 400 unless `code` says otherwise): it fails alone,
    the batch goes on. `param` names the field at fault, as OpenAI's errors do."""

    def __init__(self, message: str, *, code: int = 400, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


__all__ = ["RequestError"]
