"""The authors' V-JEPA 2-AC predictor module (`cc-vjepa2`, installed with --no-deps), the
oracle of the tests and the reference of `benchmarks/bench_vjepa2.py`."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def authors_ac_module() -> Any:
    """vjepa2.models.ac_predictor. Its modules.py imports timm only for `drop_path`
    (stochastic depth, off at drop_path_rate 0 and in eval): the identity stands in when timm
    is absent, since timm would pull torchvision beside the CPU torch."""
    if "timm.models.layers" not in sys.modules:
        try:
            import timm.models.layers  # noqa: F401
        except ImportError:
            layers = types.ModuleType("timm.models.layers")
            layers.drop_path = lambda x, drop_prob=0.0, training=False: x  # type: ignore[attr-defined]
            for name, module in (("timm", types.ModuleType("timm")),
                                 ("timm.models", types.ModuleType("timm.models")),
                                 ("timm.models.layers", layers)):
                sys.modules.setdefault(name, module)
    return importlib.import_module("vjepa2.models.ac_predictor")
