"""The plugin's only entry point: register `orpheus` by import strings (no torch here).
The deployment YAMLs ship inside the package (`mstar_orpheus/configs/`)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec

CONFIGS = ("orpheus_colocated", "orpheus_pd_disaggregated", "orpheus_codec_split",
           "orpheus_tp2")


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="orpheus",
        model_class="mstar_orpheus.model:Orpheus",
        configs={name: f"mstar_orpheus:configs/{name}.yaml" for name in CONFIGS},
        default_config="orpheus_colocated",
        presets=("tiny", "small", "3b"),
        weight_sources={"default": "canopylabs/orpheus-3b-0.1-ft",
                        "snac": "hubertsiuzdak/snac_24khz"},
        capabilities=("generate", "speech"),
        request_schema="mstar_orpheus.model:OrpheusRequest",
        description="Orpheus TTS: a Llama-3.2-3B speech LM whose audio codes stream into "
                    "the SNAC 24 kHz codec while it generates.",
    ))
