"""WeightSpec: where a node's weights come from and how checkpoint keys become parameters.

A model declares one per node (`Model.weight_spec`); the shared loader does the rest. Keys
are first stripped of `strip_prefixes` (each checked once, in order), then mapped by
`key_map`: ordered `(regex, replacement)` rules matched with `re.fullmatch`; the first rule
that matches wins, its replacement may use groups (`\\1`), and a replacement of None
ignores the key. A key no rule matches keeps its name.

Pickled checkpoints (`.pt`, `.bin`) are read with `torch.load(weights_only=True)` only:
an object of another type in the pickle (a config dataclass saved beside the state dict)
is refused unless the model lists its class in `safe_globals`, which allowlists exactly
those for this node's load. Nothing is ever unpickled without that check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class WeightSpec:
    """`source`: a name in the model's weight sources, a hub repo id, a local path or an
    `https://` URL of one file. `dtype`: the dtype floating parameters end in (None: as
    the module was built). `safe_globals`: classes (or functions) a pickled checkpoint may
    hold besides tensors and containers, trusted for this load."""

    source: str = "default"
    subfolder: str | None = None
    patterns: tuple[str, ...] = ("*.safetensors",)
    key_map: tuple[tuple[str, str | None], ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    format: Literal["auto", "safetensors", "torch"] = "auto"
    dtype: torch.dtype | None = None
    safe_globals: tuple[Any, ...] = ()

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
