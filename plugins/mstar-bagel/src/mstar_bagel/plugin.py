"""The plugin's only entry point: register `bagel` and `bagel_cfg_parallel` by import strings
(no torch here). Both are the same model; they differ in their default deployment. The
deployment YAMLs ship inside the package (`mstar_bagel/configs/`)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec

CONFIGS = ("bagel_single_gpu", "bagel_cfg_parallel", "bagel_pd_disaggregated",
           "bagel_img_disaggregated", "bagel_tp2")
CAPABILITIES = ("generate", "chat", "image_input", "images", "image_edits")


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    for name, default, what in (
            ("bagel", "bagel_single_gpu", "one rank"),
            ("bagel_cfg_parallel", "bagel_cfg_parallel",
             "its two guidance contexts on ranks 1 and 2")):
        registry.add(ModelSpec(
            name=name,
            model_class="mstar_bagel.model:Bagel",
            configs={c: f"mstar_bagel:configs/{c}.yaml" for c in CONFIGS},
            default_config=default,
            presets=("tiny", "small", "7b"),
            weight_sources={"default": "ByteDance-Seed/BAGEL-7B-MoT"},
            capabilities=CAPABILITIES,
            request_schema="mstar_bagel.model:BagelRequest",
            description=f"BAGEL-7B-MoT: a unified model that answers about images and "
                        f"generates and edits them by flow matching ({what}).",
        ))
