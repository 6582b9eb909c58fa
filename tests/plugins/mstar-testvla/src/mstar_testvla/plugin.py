"""The plugin's only entry point: register the model by import strings (no torch here).

The deployment YAMLs ship inside the package (`mstar_testvla/configs/`), so `mstar serve
testvla` and `--config testvla_node_split` work from an installed wheel, outside the
repository.
"""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec, RouteSets

#: Packaged deployment configs (files `configs/<name>.yaml` of this package).
CONFIGS = ("testvla_single", "testvla_node_split", "testvla_pd_disaggregated",
           "testvla_stream_rank", "testvla_cfg_parallel", "testvla_tp2")


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="testvla",
        model_class="mstar_testvla.model:TestVLA",
        configs={name: f"mstar_testvla:configs/{name}.yaml" for name in CONFIGS},
        default_config="testvla_single",
        presets=("tiny", "small"),
        capabilities=("generate", "chat", "completions", "image_input", "actions", "latents",
                      "speech", "audio_output", "transcription", "images", "image_edits",
                      "testvla_policy"),
        request_schema="mstar_testvla.model:TestVLARequest",
        description="Tiny vision-language-action test model: Llama text expert, half-width "
                    "action expert (flow matching with CFG), ViT encoder, frame rollout and "
                    "a streamed codec-like consumer (its speech, in chat too; it transcribes "
                    "audio as a spectrogram picture).",
    ))


@hookimpl
def mstar_register_routes(routes: RouteSets) -> None:
    if routes.model == "testvla":
        from mstar_testvla.routes import add_policy_routes  # FastAPI: only when served

        routes.add("testvla_policy", add_policy_routes)
