"""The authors' V-JEPA 2-AC predictor module (`cc-vjepa2`, installed with --no-deps), the
oracle of the tests and the reference of `benchmarks/bench_vjepa2.py`."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch

from mstar_vjepa2.ac_predictor import ACPredictorConfig
from mstar_vjepa2.checkpoint import AC_PREFIX


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


def authors_ac_predictor(cfg: ACPredictorConfig) -> torch.nn.Module:
    """The authors' `vit_ac_predictor` of `cfg`'s sizes (their init)."""
    return authors_ac_module().vit_ac_predictor(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_frames=cfg.num_frames,
        tubelet_size=cfg.tubelet_size, embed_dim=cfg.embed_dim,
        predictor_embed_dim=cfg.predictor_embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, action_embed_dim=cfg.action_embed_dim,
        use_extrinsics=cfg.use_extrinsics, use_rope=cfg.use_rope,
        is_frame_causal=cfg.is_frame_causal)


def authors_ac_predictor_from(cfg: ACPredictorConfig, checkpoint: Path) -> torch.nn.Module:
    """The authors' predictor holding the predictor weights of an AC checkpoint file (the
    authors' pickled `{"encoder", "predictor"}`)."""
    predictor = authors_ac_predictor(cfg)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["predictor"]
    predictor.load_state_dict({k.removeprefix(AC_PREFIX): v for k, v in stored.items()})
    return predictor.eval()
