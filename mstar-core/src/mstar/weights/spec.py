"""WeightSpec: where a node's weights come from and how checkpoint keys become parameters.

A model declares one per node (`Model.weight_spec`); the shared loader does the rest. Keys
are first stripped of `strip_prefixes` (each checked once, in order), then mapped by
`key_map`: ordered `(regex, replacement)` rules matched with `re.fullmatch`; the first rule
that matches wins, its replacement may use groups (`\\1`), and a replacement of None
ignores the key. A key no rule matches keeps its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class WeightSpec:
    """`source`: a name in the model's weight sources, a hub repo id or a local path.
    `dtype`: the dtype floating parameters end in (None: as the module was built)."""

    source: str = "default"
    subfolder: str | None = None
    patterns: tuple[str, ...] = ("*.safetensors",)
    key_map: tuple[tuple[str, str | None], ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    format: Literal["auto", "safetensors", "torch"] = "auto"
    dtype: torch.dtype | None = None

    def map_key(self, key: str) -> str | None:
        """The parameter name for checkpoint `key`, or None when the key is ignored."""
        for prefix in self.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        for pattern, replacement in self.key_map:
            match = re.fullmatch(pattern, key)
            if match:
                return None if replacement is None else match.expand(replacement)
        return key
