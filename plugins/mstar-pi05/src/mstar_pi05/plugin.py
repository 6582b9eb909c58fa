"""The plugin's only entry point: register `pi05` by import strings (no torch here), and
its openpi websocket policy route. The deployment YAMLs ship inside the package
(`mstar_pi05/configs/`)."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import ModelRegistry, ModelSpec, RouteSets

CONFIGS = ("pi05", "pi05_droid", "pi05_tiny", "pi05_split")
#: "openpi_policy": the openpi websocket policy protocol (`mstar_pi05.routes`).
CAPABILITIES = ("generate", "image_input", "actions", "openpi_policy")


@hookimpl
def mstar_register_models(registry: ModelRegistry) -> None:
    registry.add(ModelSpec(
        name="pi05",
        model_class="mstar_pi05.model:Pi05",
        configs={name: f"mstar_pi05:configs/{name}.yaml" for name in CONFIGS},
        default_config="pi05",
        presets=("tiny", "small", "base"),
        # the PaliGemma tokenizer: lerobot's checkpoints ship none
        weight_sources={"default": "lerobot/pi05_base",
                        "tokenizer": "google/paligemma-3b-pt-224"},
        capabilities=CAPABILITIES,
        request_schema="mstar_pi05.model:Pi05Request",
        description="Pi0.5 vision-language-action policy: SigLIP cameras, a PaliGemma "
                    "prefix and a flow-matching action expert turn images, an instruction "
                    "and the robot's state into a chunk of actions.",
    ))


@hookimpl
def mstar_register_routes(routes: RouteSets) -> None:
    if routes.model == "pi05":
        from mstar_pi05.routes import add_policy_routes  # FastAPI: only when served

        routes.add("openpi_policy", add_policy_routes)
