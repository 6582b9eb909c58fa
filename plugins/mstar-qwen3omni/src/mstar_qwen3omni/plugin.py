"""The plugin's only entry point: register `qwen3_omni` by import strings (no torch here).
The deployment YAMLs ship inside the package (`mstar_qwen3omni/configs/`)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec

CONFIGS = ("qwen3omni_2gpu", "qwen3omni_colocated", "qwen3omni_pd_disaggregated",
           "qwen3omni_text_only", "qwen3omni_thinker_tp2")
CAPABILITIES = ("chat", "generate", "image_input", "audio_input", "video_input",
                "audio_output", "transcription")


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="qwen3_omni",
        model_class="mstar_qwen3omni.model:Qwen3Omni",
        configs={name: f"mstar_qwen3omni:configs/{name}.yaml" for name in CONFIGS},
        default_config="qwen3omni_2gpu",
        presets=("tiny", "small", "30b-a3b"),
        weight_sources={"default": "Qwen/Qwen3-Omni-30B-A3B-Instruct"},
        capabilities=CAPABILITIES,
        request_schema="mstar_qwen3omni.model:Qwen3OmniRequest",
        description="Qwen3-Omni-30B-A3B: a Thinker that reads text, images, audio and video "
                    "and writes text, and a Talker and Code2Wav that speak it as it is "
                    "written.",
    ))
