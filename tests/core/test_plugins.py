"""Plugin discovery and `mstar plugins` / `mstar models`, against throwaway distributions
found through real entry points (in a subprocess where the CLI's output or imports
matter)."""

from __future__ import annotations

import pytest

from mstar.plugins import DuplicateNameError, manager
from mstar.plugins.registry import ModelRegistry

GOOD_PLUGIN = '''
from mstar.plugins import ModelSpec, TransportSpec, hookimpl


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name="toy", model_class="toyplug.model:Toy",
                           configs={"toy_single": "toyplug:configs/toy_single.yaml"},
                           default_config="toy_single", presets=("tiny", "small"),
                           capabilities=("chat", "speech")))
    registry.add(ModelSpec(name="toy_cfg", model_class="toyplug.model:Toy",
                           capabilities=("images",)))


@hookimpl
def mstar_register_transports(registry):
    registry.add(TransportSpec("toynet", "toyplug.net:ToyNet"))
'''

# The model module imports torch: listing must never import it.
TOY_MODEL = '''
import torch
from mstar.model import contract


class Toy(contract.Model):
    pass


class NotAModel:
    pass
'''


def _claims(name: str) -> str:
    return f'''
from mstar.plugins import ModelSpec, hookimpl


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name="{name}", model_class="elsewhere:Model"))
'''


@pytest.fixture
def good(plugin_dir):
    plugin_dir.add("toy-plugin", "toyplug", {"__init__.py": GOOD_PLUGIN, "model.py": TOY_MODEL})
    return plugin_dir


def test_good_plugin_is_listed_with_models_and_capabilities(good):
    result = good.cli("plugins")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("toyplug "))
    assert row.split()[1:4] == ["toy-plugin", "0.1", "ok"]
    assert "toy [chat, speech]" in row and "toy_cfg [images]" in row and "TOYNET" in row

    models = good.cli("models")
    assert models.returncode == 0, models.stderr
    row = next(line for line in models.stdout.splitlines() if line.startswith("toy "))
    assert "toyplug (toy-plugin)" in row
    assert "tiny, small" in row and "chat, speech" in row and row.endswith("toy_single")


def test_listing_never_imports_torch(good):
    result = good.run("import sys\nfrom mstar.cli.main import main\n"
                      "main(['plugins']); main(['models'])\n"
                      "print('torch imported:', 'torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert "toy [chat, speech]" in result.stdout
    assert result.stdout.strip().endswith("torch imported: False")


def test_broken_plugin_is_reported_and_the_others_still_load(good):
    good.add("broken-plugin", "brokenplug",
             {"__init__.py": "raise RuntimeError('boom from brokenplug\\nsecond line')\n"})
    result = good.cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    broken = next(i for i, line in enumerate(lines) if line.startswith("brokenplug "))
    assert lines[broken].split()[1:4] == ["broken-plugin", "0.1", "error"]
    assert "RuntimeError: boom from brokenplug second line" in lines[broken + 1]
    assert any(line.startswith("toyplug ") and " ok " in line for line in lines)


def test_failing_misspelt_or_self_conflicting_hooks_register_nothing(good):
    good.add("hook-fails", "hookfails", {"__init__.py": '''
        from mstar.plugins import ModelSpec, hookimpl

        @hookimpl
        def mstar_register_models(registry):
            registry.add(ModelSpec(name="half", model_class="x:Y"))
            raise ValueError("hook broke")
        '''})
    good.add("typo-plugin", "typoplug", {"__init__.py": '''
        from mstar.plugins import hookimpl

        @hookimpl
        def mstar_register_model(registry):
            pass
        '''})
    good.add("self-dup", "selfdup", {"__init__.py": '''
        from mstar.plugins import ModelSpec, hookimpl

        @hookimpl
        def mstar_register_models(registry):
            for _ in range(2):
                registry.add(ModelSpec(name="twice", model_class="x:Y"))
        '''})
    plugins = {p.name: p for p in manager.get_plugins()}
    assert plugins["hookfails"].status == "error"
    assert plugins["hookfails"].error == "ValueError: hook broke"
    assert plugins["typoplug"].status == "error"
    assert "mstar_register_model" in plugins["typoplug"].error
    assert plugins["selfdup"].status == "error"
    assert "'twice' is registered twice: by self-dup and by self-dup" in plugins["selfdup"].error
    assert plugins["toyplug"].models == ("toy", "toy_cfg")
    assert plugins["toyplug"].transports == ("TOYNET",)
    assert "half" not in manager.model_registry()  # nothing of a broken plugin is kept
    assert "twice" not in manager.model_registry()
    assert "toy" in manager.model_registry() and "TOYNET" in manager.transport_registry()


def test_a_name_registered_twice_names_both_distributions(plugin_dir):
    plugin_dir.add("first-dist", "firstplug", {"__init__.py": _claims("same")})
    plugin_dir.add("second-dist", "secondplug", {"__init__.py": _claims("same")})
    result = plugin_dir.cli("plugins")
    assert result.returncode == 1
    assert "firstplug" in result.stdout and "secondplug" in result.stdout
    assert "'same' is registered twice: by first-dist and by second-dist" in result.stderr
    assert plugin_dir.cli("models").returncode == 1

    with pytest.raises(DuplicateNameError, match="first-dist and by second-dist"):
        manager.model_registry()
    assert "same" in manager.model_registry(strict=False)


def test_load_model_class_imports_the_model_and_lists_installed_on_unknown(good):
    from mstar.model.contract import Model

    cls = manager.load_model_class("toy")
    assert issubclass(cls, Model) and cls.__name__ == "Toy"
    with pytest.raises(KeyError, match="installed models: .*toy, toy_cfg"):
        manager.load_model_class("nope")


def test_load_model_class_rejects_what_is_not_a_model(plugin_dir):
    plugin_dir.add("odd-plugin", "oddplug", {"model.py": TOY_MODEL, "__init__.py": '''
        from mstar.plugins import ModelSpec, hookimpl

        @hookimpl
        def mstar_register_models(registry):
            registry.add(ModelSpec(name="odd", model_class="oddplug.model:NotAModel"))
            registry.add(ModelSpec(name="gone", model_class="oddplug.missing:Model"))
        '''})
    with pytest.raises(TypeError, match="not an mstar.model.Model"):
        manager.load_model_class("odd")
    with pytest.raises(ImportError, match="'gone' from odd-plugin: cannot import"):
        manager.load_model_class("gone")


def test_registries_are_cached_until_reset(good):
    first = manager.model_registry()
    assert manager.model_registry() is first
    manager.reset()
    again = manager.model_registry()
    assert again is not first and isinstance(again, ModelRegistry)
    assert again.names() == first.names()


def _routes_for(model: str, capability: str, *, only_own: bool = True) -> str:
    """A plugin registering `model`, whose route hook adds a set enabled by `capability`
    (for its own model only, or, `only_own=False`, for whichever model it is asked about)."""
    guard = f"if routes.model == {model!r}:" if only_own else "if True:"
    return f'''
from mstar.plugins import ModelSpec, hookimpl


def add(context):
    pass


@hookimpl
def mstar_register_models(registry):
    registry.add(ModelSpec(name={model!r}, model_class="x:Y", capabilities=({capability!r},)))


@hookimpl
def mstar_register_routes(routes):
    {guard}
        routes.add({capability!r}, add)
'''


def test_a_models_routes_come_from_its_own_plugin_only(good):
    good.add("routed-dist", "routedplug", {"__init__.py": _routes_for("routed", "status")})
    good.add("greedy-dist", "greedyplug",
             {"__init__.py": _routes_for("greedy", "takeover", only_own=False)})
    assert [(s.capability, s.owner) for s in manager.model_routes("routed")] == [
        ("status", "routed-dist")]
    assert [(s.capability, s.owner) for s in manager.model_routes("greedy")] == [
        ("takeover", "greedy-dist")]
    assert manager.model_routes("toy") == []  # its plugin adds none; greedy is not asked
    assert manager.model_routes("nope") == []


def test_a_failing_route_hook_names_its_plugin(plugin_dir):
    plugin_dir.add("sour-dist", "sourplug", {"__init__.py": '''
        from mstar.plugins import ModelSpec, hookimpl

        @hookimpl
        def mstar_register_models(registry):
            registry.add(ModelSpec(name="sour", model_class="x:Y"))

        @hookimpl
        def mstar_register_routes(routes):
            raise ImportError("no module named fastapi_extra")
        '''})
    with pytest.raises(RuntimeError, match="'sour': the routes of sour-dist failed to "
                                           "register: ImportError: no module named"):
        manager.model_routes("sour")


def test_a_plugin_route_the_app_already_serves_is_refused(plugin_dir):
    from fastapi import APIRouter, FastAPI
    from pydantic import BaseModel

    from mstar.api_server.backend import ModelInfo
    from mstar.api_server.plugin_routes import add_plugin_routes
    from mstar.config.settings import ServerSettings

    plugin_dir.add("clash-dist", "clashplug", {"__init__.py": _routes_for("clash", "mine")})
    module = __import__("clashplug")

    class Body(BaseModel):
        prompt: str

    async def answer(caller, body):
        return {}

    def add(context):
        context.websocket("/v1/clash/socket", Body, answer)
        context.post("/generate", Body, answer, description="the model's own generate")

    module.add = add
    app, router = FastAPI(), APIRouter()
    router.add_api_route("/generate", answer, methods=["POST"])
    info = ModelInfo(name="clash", capabilities=["mine"], max_model_len=8,
                     max_concurrent_requests=1, request_schema=None)
    with pytest.raises(ValueError, match=r"clash-dist \(capability 'mine'\) adds routes the "
                                         r"app already serves: \[\('POST', '/generate'\)\]"):
        add_plugin_routes(app, router, None, info, ServerSettings(api_key=None))
