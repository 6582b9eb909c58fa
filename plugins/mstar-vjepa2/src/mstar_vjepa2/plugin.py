"""The plugin's only entry point: register `vjepa2` and `vjepa2_ac` by import strings (no
torch here). The deployment YAMLs ship inside the package (`mstar_vjepa2/configs/`)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec

VJEPA2_CONFIGS = ("vjepa2", "vjepa2_tiny")
AC_CONFIGS = ("vjepa2_ac", "vjepa2_ac_tiny", "vjepa2_ac_split")
PRESETS = ("tiny", "small", "large", "giant")
#: The authors' release of V-JEPA 2-AC: not on the Hugging Face hub, one pickled file.
AC_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/vjepa2/vjepa2-ac-vitg.pt"


def _configs(names: tuple[str, ...]) -> dict[str, str]:
    return {name: f"mstar_vjepa2:configs/{name}.yaml" for name in names}


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="vjepa2",
        model_class="mstar_vjepa2.model:VJepa2",
        configs=_configs(VJEPA2_CONFIGS),
        default_config="vjepa2",
        presets=PRESETS,
        weight_sources={"default": "facebook/vjepa2-vitl-fpc64-256"},
        capabilities=("generate", "video_input", "latents"),
        request_schema="mstar_vjepa2.model:VJepa2Request",
        description="V-JEPA 2 video world model: a ViT with 3D tubelets and 3D RoPE encodes "
                    "a clip into latents; its predictor predicts the latents of masked "
                    "patches.",
    ))
    registry.add(ModelSpec(
        name="vjepa2_ac",
        model_class="mstar_vjepa2.model:VJepa2AC",
        configs=_configs(AC_CONFIGS),
        default_config="vjepa2_ac",
        presets=PRESETS,
        weight_sources={"default": AC_WEIGHTS_URL},
        capabilities=("generate", "video_input", "latents", "rollout", "planning"),
        request_schema="mstar_vjepa2.model:VJepa2ACRequest",
        description="V-JEPA 2-AC action-conditioned world model: rolls a robot's encoded "
                    "camera frames forward under actions with a persistent KV cache, and "
                    "plans actions toward a goal image by the cross-entropy method.",
    ))
