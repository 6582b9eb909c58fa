"""Server-sent events, decoded line by line so the sync and async clients share one parser
(each feeds it the lines its own response yields).

Follows the WHATWG rules the server and OpenAI rely on: `event:` names the frame, `data:`
lines are joined by newlines, a blank line ends the frame, `:` starts a comment, and one
space after the colon is dropped. `id:` and `retry:` are ignored (nothing here reconnects).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SSEFrame:
    event: str | None
    data: str


@dataclass
class SSEDecoder:
    """Feed it lines (without their line ending); it returns a frame when one ends."""

    _event: str | None = None
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> SSEFrame | None:
        if not line:
            if not self._data:  # a blank line with no data dispatches nothing
                self._event = None
                return None
            frame = SSEFrame(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return frame
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
