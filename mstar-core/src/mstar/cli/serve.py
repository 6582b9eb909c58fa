"""`mstar-serve --config X` and `mstar serve <model>`: resolve and check everything a
deployment needs, then hand it to `mstar.serving.run_server`.

Both commands share one path (`serve`): read the YAML (a path or a packaged config name),
split off its `server:` section, layer the server settings (CLI > `MSTAR_*` environment >
`server:` > the command's own defaults > field defaults), apply `--set` overrides, resolve
the tensor protocol, and validate the deployment against its model (built from `--preset`
or the checkpoint's config.json) before any process starts. `mstar serve` only adds a
model's default config and single-node plumbing. A user error is one message per bad
field and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from mstar.config import (
    ConfigError,
    DeploymentConfig,
    loader,
    parse_overrides,
    placement,
    validate_for_model,
    with_preset_cap,
)
from mstar.config.devices import device_plan, gpus_problem, visible_cuda_devices
from mstar.config.nodes import node_ranks
from mstar.config.settings import ServerSettings, layered_settings
from mstar.plugins import load_model_class, model_registry
from mstar.plugins.registry import DuplicateNameError

if TYPE_CHECKING:
    from mstar.model.contract import Model

PROTOCOLS = ("RDMA", "TCP", "SHM")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Exit statuses: an invalid config or setting; a usage error (argparse's own status).
EXIT_INVALID, EXIT_USAGE = 1, 2


# ------------------------------------------------------------------------------------------
# Options


def _shown(name: str, shown_defaults: Mapping[str, str]) -> str:
    if name in shown_defaults:
        return shown_defaults[name]
    default = ServerSettings.model_fields[name].default
    return "off" if default is False else "none" if default is None else str(default)


def add_cache_limit_options(parser: argparse.ArgumentParser, *, background: bool = True) -> None:
    """The weight cache's eviction options (serving and `mstar weights gc`); `background`:
    with the server's own `--cache-gc` and `--cache-check-interval`."""
    cache = parser.add_argument_group("weight cache (sizes: 50GB, 512MiB; durations: 7d, "
                                      "1h; see `mstar weights`)")
    cache.add_argument("--cache-max-size", metavar="SIZE",
                       help="evict least recently used models while the cache holds more "
                            "(default: no limit)")
    cache.add_argument("--cache-min-free-space", metavar="SIZE",
                       help="evict least recently used models while the disk has less free "
                            "(default: no limit)")
    cache.add_argument("--cache-unused-threshold", metavar="DURATION",
                       help="evict models unused for longer (default: never for age)")
    cache.add_argument("--cache-max-models", type=int, metavar="N",
                       help="evict least recently used models beyond N (default: no limit)")
    if not background:
        return
    cache.add_argument("--cache-check-interval", metavar="DURATION",
                       help="how often --cache-gc applies the limits (default: 1h)")
    cache.add_argument("--cache-gc", action="store_true", default=None,
                       help="evict by these limits in the background while serving "
                            "(default: off; `mstar weights gc` evicts on demand)")


def _add_options(parser: argparse.ArgumentParser, shown_defaults: Mapping[str, str]) -> None:
    """The options both commands share. Each server option defaults to None ("not given"),
    so that only options given on the command line outrank the other layers; the help
    shows the effective default (`shown_defaults` where the command has its own)."""
    def d(name: str) -> str:
        return f"(default: {_shown(name, shown_defaults)})"

    server = parser.add_argument_group("server")
    server.add_argument("--host", help=f"bind address {d('host')}")
    server.add_argument("--port", type=int, help=f"HTTP port {d('port')}")
    server.add_argument("--tensor-comm-protocol", type=str.upper, choices=PROTOCOLS,
                        help="tensor transport between workers "
                             f"{d('tensor_comm_protocol')}")
    server.add_argument("--cache-dir", help=f"Hugging Face weight cache {d('cache_dir')}")
    server.add_argument("--socket-path-prefix",
                        help=f"ZMQ IPC socket prefix {d('socket_path_prefix')}")
    server.add_argument("--upload-dir", help=f"temp directory for uploaded media "
                                             f"{d('upload_dir')}")
    server.add_argument("--image-url-ttl", type=float,
                        help="seconds a generated image stays at its URL "
                             "(response_format=url of the image routes; 0: off) "
                             f"{d('image_url_ttl')}")
    server.add_argument("--timeout", type=float,
                        help="per-request timeout in seconds; also the deployment's "
                             f"request_timeout unless the YAML sets it {d('timeout')}")
    server.add_argument("--mooncake-port", type=int,
                        help=f"port of the Mooncake RDMA transfer engine {d('mooncake_port')}")
    server.add_argument("--tcp-transfer-device",
                        help="network device for TCP tensor transport (default: auto)")
    server.add_argument("--enable-nvtx", action="store_true", default=None,
                        help="emit NVTX markers for profiling (a no-op on CPU)")
    server.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help=f"logging level {d('log_level')}")
    server.add_argument("--api-key", help="require this bearer key on every route but "
                                          "/health (also MSTAR_API_KEY)")
    server.add_argument("--policy-ws-port", type=int,
                        help="serve a policy model's websocket protocol (e.g. Pi0.5's openpi "
                             "protocol) on this port too")
    server.add_argument("--data-parallel-size", "--dp-size", type=int,
                        dest="data_parallel_size", metavar="N",
                        help="run N copies (replicas) of the layout behind this server, "
                             "replica k on the config's ranks shifted by k x its rank count; "
                             "each request runs on one (default: the config's replicas, 1)")
    server.add_argument("--cpu-threads", type=int,
                        help="torch threads of each rank's worker process on CPU (default: "
                             "the cores divided among the ranks)")
    server.add_argument("--data-workers", type=int,
                        help="processes that run the model's request preprocessing and "
                             f"output postprocessing, off the API server {d('data_workers')}")
    nodes = parser.add_argument_group("multi-node (one server per node; the config's "
                                      "`nodes` or `ranks_per_node` places the ranks)")
    nodes.add_argument("--nnodes", type=int, help=f"nodes of the deployment {d('nnodes')}")
    nodes.add_argument("--node-rank", type=int,
                       help=f"this node (0 serves HTTP, the others run their ranks) "
                            f"{d('node_rank')}")
    nodes.add_argument("--master-addr", help=f"node 0's address {d('master_addr')}")
    nodes.add_argument("--master-port", type=int,
                       help=f"node 0's join port; the ports after it carry the control "
                            f"messages {d('master_port')}")
    nodes.add_argument("--dist-init-addr", metavar="HOST:PORT",
                       help="--master-addr and --master-port in one (SGLang's form)")
    media = parser.add_argument_group("media (chat images, audio, video)")
    media.add_argument("--allow-private-media-urls", action="store_true", default=None,
                       help="let media URLs reach private, loopback and link-local "
                            "addresses (refused by default)")
    media.add_argument("--media-max-bytes", type=int,
                       help=f"bytes per media item {d('media_max_bytes')}")
    media.add_argument("--media-max-image-pixels", type=int,
                       help=f"width x height per image {d('media_max_image_pixels')}")
    media.add_argument("--media-max-audio-seconds", type=float,
                       help=f"seconds per audio item {d('media_max_audio_seconds')}")
    media.add_argument("--media-max-video-seconds", type=float,
                       help=f"seconds per video {d('media_max_video_seconds')}")
    media.add_argument("--media-fetch-timeout", type=float,
                       help=f"seconds per URL fetch {d('media_fetch_timeout')}")
    model = parser.add_argument_group("model and weights")
    model.add_argument("--model-path", help="local checkpoint directory (default: the "
                                            "model's hub repo)")
    model.add_argument("--revision", action="append", metavar="[SOURCE=]REV",
                       help="hub revision of a weight source (default=<sha>, snac=<tag>; "
                            "a bare REV is the default source's); repeatable or "
                            "comma-separated")
    model.add_argument("--load-format", choices=("auto", "dummy"),
                       help="auto: read the checkpoint; dummy: seeded random weights of the "
                            f"real shapes {d('load_format')}")
    model.add_argument("--preset", help="model size preset (tiny, small, ...) instead of "
                                        "the checkpoint's config.json")
    add_cache_limit_options(parser)
    config = parser.add_argument_group("deployment config")
    config.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a deployment config field by dotted path, value in "
                             "YAML (e.g. max_seq_len=8192, node_groups.0.ranks=[1]); "
                             "repeatable")
    config.add_argument("--validate-config", action="store_true",
                        help="print the merged deployment config and server settings as "
                             "YAML and exit 0, or print every error and exit non-zero")


def _cli_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The server settings given on the command line (and only those)."""
    return {name: value for name in ServerSettings.model_fields
            if (value := getattr(args, name, None)) is not None}


# ------------------------------------------------------------------------------------------
# Resolution


def _read_config(path_or_name: str | None, model: str | None) -> tuple[dict[str, Any], str]:
    """(YAML data, where it came from). No config at all (a model that ships none) means
    every node on rank 0, as `mstar.load` does."""
    if path_or_name is None:
        return {"model": model}, f"(model {model!r} ships no config: every node on rank 0)"
    return loader.read_config_data(path_or_name)


def _deployment(data: dict[str, Any], source: str,
                overrides: Mapping[str, Any]) -> DeploymentConfig:
    """The deployment part of the YAML (the `server:` section already split off), with
    `--set` overrides applied, schema-checked."""
    problems = [f"--set {key}: --set changes the deployment config; give server settings "
                "as options (e.g. --port) or MSTAR_* variables"
                for key in overrides if key.split(".")[0] == "server"]
    try:
        config = loader.config_from_data(data, source, {
            k: v for k, v in overrides.items() if k.split(".")[0] != "server"})
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, source)
    return config


def _with_protocol(settings: ServerSettings) -> ServerSettings:
    """The settings with the tensor protocol resolved by the launcher's own rule (RDMA
    needs Mooncake; without it the default is SHM on one node, TCP across nodes, logged),
    so an explicit RDMA without Mooncake fails here and `--validate-config` prints what will
    run."""
    from mstar.serving.launcher import resolve_protocol

    try:
        protocol = resolve_protocol(settings.tensor_comm_protocol, node_count=settings.nnodes)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return settings.model_copy(update={"tensor_comm_protocol": protocol})


def model_for(config: DeploymentConfig, settings: ServerSettings) -> Model:
    """The model the deployment serves, configured as the workers will build it (from
    `--preset`, else the checkpoint's config.json, plus `model_kwargs`); each failure is
    blamed on the option or field that caused it."""
    from mstar.runtime.builder import LoadOptions, make_model
    from mstar.weights import WeightSourceError

    try:
        spec = model_registry().get(config.model)
        cls = load_model_class(config.model)
    except KeyError as exc:
        raise ConfigError([f"model: {exc.args[0]}"]) from None
    except (ImportError, TypeError, DuplicateNameError) as exc:
        raise ConfigError([f"model: {exc}"]) from None
    if settings.preset is not None and settings.preset not in cls.presets:
        raise ConfigError([f"--preset: unknown preset {settings.preset!r} for model "
                           f"{config.model!r}; allowed: "
                           f"{', '.join(sorted(cls.presets)) or 'none'}"])
    try:
        options = LoadOptions.of(spec, load_format=settings.load_format,
                                 model_path=settings.model_path, cache_dir=settings.cache_dir,
                                 revisions=settings.revision or {})
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    needs_preset = (settings.preset is None and settings.load_format == "dummy"
                    and not settings.model_path)
    if needs_preset:
        field = "--preset"
    elif config.model_kwargs:
        field = "model_kwargs"
    else:
        field = "--preset" if settings.preset else "--model-path"
    try:
        return make_model(spec, config.model_kwargs, preset=settings.preset, options=options)
    except WeightSourceError as exc:
        raise ConfigError([f"--model-path: {exc}"]) from None
    except (OSError, TypeError, ValueError) as exc:
        raise ConfigError([f"{field}: {exc}"]) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mstar").setLevel(level)


def _same_model_class(a: str, b: str) -> bool:
    """Whether two registered names are one model class (a plugin may register a model
    under a second name whose default config is another layout, `bagel_cfg_parallel`):
    its configs name the first, and serving them under the second is the same model."""
    try:
        registry = model_registry()
        return registry.get(a).model_class == registry.get(b).model_class
    except KeyError:
        return False


def prepare(path_or_name: str | None, cli: Mapping[str, Any], overrides: Sequence[str] = (),
            *, model: str | None = None,
            defaults: Mapping[str, Any] | None = None) -> tuple[ServerSettings,
                                                                 DeploymentConfig]:
    """Everything `run_server` needs, checked: (server settings, deployment config).
    `model` (from `mstar serve <model>`) must be the model the config serves. Raises
    `ConfigError` with every problem found (settings and config schema together, then the
    placement against the model)."""
    data, source = _read_config(path_or_name, model)
    server_section = data.pop("server", None)
    problems: list[str] = []
    settings = config = None
    try:
        settings = layered_settings(cli, server_section, defaults)
    except ConfigError as exc:
        problems += exc.problems
    explicit_len = False
    try:
        parsed = parse_overrides(overrides)
        explicit_len = "max_seq_len" in parsed
        config = _deployment(data, source, parsed)
    except ConfigError as exc:
        problems += exc.problems
    if config is not None and model is not None and config.model != model:
        if _same_model_class(config.model, model):  # another name (default layout) of it
            config = config.model_copy(update={"model": model})
        else:
            problems.append(f"model: the config serves {config.model!r}, not {model!r}")
    if settings is not None:
        _configure_logging(settings.log_level)
        try:
            settings = _with_protocol(settings)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, source)
    assert settings is not None and config is not None
    if config.request_timeout is None:
        config = config.model_copy(update={"request_timeout": settings.timeout})
    if settings.data_parallel_size is not None:  # over the YAML's replicas
        config = config.model_copy(update={"replicas": settings.data_parallel_size})
    try:
        model_instance = model_for(config, settings)
        config = with_preset_cap(config, model_instance, settings.preset,
                                 explicit=explicit_len)
        validate_for_model(config, model_instance)
        where = placement(config, model_instance)
        device_plan(config, where)  # devices exist, TP on one kind
        node_ranks(config, where.ranks(), settings.nnodes)  # every rank on a node given
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    return settings, config


class _Dumper(yaml.SafeDumper):
    """Block mappings; lists of scalars on one line (`ranks: [0, 1]`), as configs are
    written by hand."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value,
    flow_style=not any(isinstance(v, dict | list) for v in value)))


def render(settings: ServerSettings, config: DeploymentConfig) -> str:
    """The merged config as YAML, with the settings as its `server:` section: valid input
    for `--config` again. The API key is never printed."""
    data = {**config.model_dump(mode="json"),
            "server": settings.model_dump(mode="json", exclude={"api_key"})}
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False)
    return text + ("# server.api_key is set (not printed)\n" if settings.api_key else "")


def serve(args: argparse.Namespace, *, config: str | None, model: str | None = None,
          defaults: Mapping[str, Any] | None = None) -> int:
    """The path both commands share: prepare, then print the merged config
    (`--validate-config`) or launch; the exit status."""
    try:
        settings, deployment = prepare(config, _cli_layer(args), args.overrides, model=model,
                                       defaults=defaults)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.validate_config:
        sys.stdout.write(render(settings, deployment))
        return 0
    from mstar.serving import run_server

    return run_server(settings, deployment)


# ------------------------------------------------------------------------------------------
# mstar-serve --config X


def build_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mstar-serve",
        description="Start an mstar server (API server, data workers, conductor, one worker "
                    "per rank) from an explicit deployment config. Settings: command line > "
                    "MSTAR_* environment > the YAML's server: section > defaults.")
    parser.add_argument("--config", required=True, metavar="PATH_OR_NAME",
                        help="deployment YAML: a path, or the name of a config packaged in "
                             "a plugin (see `mstar models`)")
    _add_options(parser, {"tensor_comm_protocol": "RDMA if Mooncake is installed, else SHM",
                          "cache_dir": "the Hugging Face default"})
    return parser


def serve_main(argv: Sequence[str] | None = None) -> int:
    """The `mstar-serve` console script."""
    args = build_serve_parser().parse_args(argv)
    return serve(args, config=args.config)


# ------------------------------------------------------------------------------------------
# mstar serve <model>


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return str(os.getuid())


def serve_defaults() -> dict[str, Any]:
    """`mstar serve`'s plumbing: a single-node-safe protocol, per-user socket and upload
    directories (users sharing a host never collide), the Hugging Face cache."""
    from huggingface_hub import constants

    user = _user()
    return {"tensor_comm_protocol": "SHM", "socket_path_prefix": f"/tmp/mstar_{user}/",
            "upload_dir": f"/tmp/mstar_uploads_{user}/", "cache_dir": constants.HF_HUB_CACHE}


def _devices(value: str) -> str:
    if not re.fullmatch(r"[^,\s]+(,[^,\s]+)*", value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected device ids separated by "
                                         "commas, e.g. 0 or 0,1,2")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an installed model with its packaged default config (or --config) and
    single-node plumbing; everything else as `mstar-serve`."""
    try:
        spec = model_registry().get(args.model)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except DuplicateNameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus  # before torch counts devices
        problem = gpus_problem(args.gpus, visible_cuda_devices())
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_INVALID
    defaults = serve_defaults()
    if (args.nnodes or 1) > 1:
        del defaults["tensor_comm_protocol"]  # SHM is per node: the default rule picks
    return serve(args, config=args.config or spec.default_config, model=spec.name,
                 defaults=defaults)


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    """Register `mstar serve <model>` on the `mstar` command's subparsers."""
    parser = commands.add_parser(
        "serve", help="serve an installed model with its default config",
        description=cmd_serve.__doc__)
    parser.add_argument("model", help="an installed model (see `mstar models`)")
    parser.add_argument("--config", metavar="PATH_OR_NAME",
                        help="deployment YAML path or packaged config name (default: the "
                             "model's default config)")
    parser.add_argument("--gpus", type=_devices,
                        help="the CUDA devices to use (sets CUDA_VISIBLE_DEVICES), e.g. 0 "
                             "or 0,1,2; rank r runs on the r-th of them unless the config "
                             "maps devices (default: all visible; an error without CUDA)")
    _add_options(parser, {"tensor_comm_protocol": "SHM",
                          "socket_path_prefix": "/tmp/mstar_<user>/",
                          "upload_dir": "/tmp/mstar_uploads_<user>/",
                          "cache_dir": "the Hugging Face default"})
    parser.set_defaults(func=cmd_serve)
