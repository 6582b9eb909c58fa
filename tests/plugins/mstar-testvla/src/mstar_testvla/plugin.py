"""The plugin's only entry point: register the model by import strings (no torch here)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="testvla",
        model_class="mstar_testvla.model:TestVLA",
        presets=("tiny", "small"),
        capabilities=("generate", "chat", "actions", "latents"),
        request_schema="mstar_testvla.model:TestVLARequest",
        description="Tiny vision-language-action test model: Llama text expert, half-width "
                    "action expert (flow matching with CFG), ViT encoder, frame rollout and "
                    "a streamed codec-like consumer.",
    ))
