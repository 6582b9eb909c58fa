"""Stop strings: the text of a completion ends before the first stop string it contains
(OpenAI's `stop`). Text that could be the start of a stop string is held back until the
next text shows whether it is one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.matched = False
        self._held = ""

    def push(self, text: str) -> str:
        """The text that can be emitted now; after a match, the text before the stop
        string (and `matched` is set: nothing more is emitted)."""
        if self.matched:
            return ""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self._held = True, ""
            return buf[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What is held back when the completion ends without a match."""
        held, self._held = self._held, ""
        return "" if self.matched else held
