"""Server settings (not the deployment): layered CLI > `MSTAR_*` environment > the YAML's
`server:` section > defaults. `mstar-serve` and `mstar serve` build one `ServerSettings`
(`layered_settings`) and hand it, with the `DeploymentConfig`, to
`mstar.serving.run_server`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mstar.config.units import parse_duration, parse_size
from mstar.config.validate import ConfigError

if TYPE_CHECKING:
    from mstar.media.limits import MediaLimits
    from mstar.weights.eviction import EvictionPolicy

Protocol = Literal["SHM", "TCP", "RDMA"]


def parse_revisions(value: Any) -> dict[str, str] | None:
    """Hub revisions per weight source, from `--revision` (repeatable), `MSTAR_REVISION`,
    `server.revision` or `mstar.load(revision=)`: `SOURCE=REV` names a source's revision, a
    bare `REV` is the `default` source's; several come repeated, comma-separated or as a
    mapping. None: every source at its hub default."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else {str(k): str(v) for k, v in value.items()}
    revisions: dict[str, str] = {}
    for item in [value] if isinstance(value, str) else value:
        for part in filter(None, (p.strip() for p in str(item).split(","))):
            name, has_name, rev = part.partition("=")
            source, rev = (name.strip(), rev.strip()) if has_name else ("default", part)
            if not source or not rev:
                raise ValueError(f"{part!r}: expected REVISION or SOURCE=REVISION")
            if revisions.setdefault(source, rev) != rev:
                raise ValueError(f"two revisions for weight source {source!r}: "
                                 f"{revisions[source]!r} and {rev!r}")
    return revisions or None


#: Parsed by `parse_revisions` from every layer (the environment's value is not JSON).
Revisions = Annotated[dict[str, str] | None, NoDecode, BeforeValidator(parse_revisions)]


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`parse`, letting None (no limit) through."""
    return lambda value: None if value is None else parse(value)


#: Bytes, given as `50GB`, `512MiB` or a plain count in every layer.
Size = Annotated[int | None, BeforeValidator(_optional(parse_size))]
#: Seconds, given as `7d`, `1h` or a plain number in every layer.
Duration = Annotated[float | None, BeforeValidator(_optional(parse_duration))]


class ServerSettings(BaseSettings):
    """Every option of `mstar-serve` (the original M* server's, same names and defaults) plus
    the offline/weights options.

    `tensor_comm_protocol=None` means "the default": RDMA when Mooncake is installed,
    else SHM on a single node (logged). `mstar serve` passes SHM explicitly.
    """

    model_config = SettingsConfigDict(env_prefix="MSTAR_", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    tensor_comm_protocol: Protocol | None = None
    cache_dir: str | None = Field(None, description="Weight cache: --cache-dir, else "
                                  "MSTAR_CACHE_DIR, HF_HUB_CACHE, HF_HOME/hub, "
                                  "~/.cache/huggingface/hub.")
    cache_max_size: Size = Field(None, ge=0, description="Evict least recently used "
                                 "models while the cache holds more (e.g. 50GB, 512GiB); "
                                 "null: no limit.")
    cache_min_free_space: Size = Field(None, ge=0, description="Evict least recently "
                                       "used models while the cache's disk has less free "
                                       "(e.g. 20GB); null: no limit.")
    cache_unused_threshold: Duration = Field(None, ge=0, description="Evict models unused "
                                             "for longer (e.g. 7d, 12h); null: never for "
                                             "age.")
    cache_max_models: int | None = Field(None, ge=1, description="Evict least recently "
                                         "used models beyond this many; null: no limit.")
    cache_check_interval: Annotated[float, BeforeValidator(parse_duration)] = Field(
        3600.0, gt=0, description="How often a server with cache_gc applies the limits "
                                  "(e.g. 1h, 30m); leases expire after three of these.")
    cache_gc: bool = Field(False, description="The server evicts by the cache limits in "
                                              "the background (`mstar weights gc` does it "
                                              "on demand).")
    socket_path_prefix: str = "/tmp/mstar"
    upload_dir: str = "/tmp/mstar_uploads"
    image_url_ttl: float = Field(3600.0, ge=0, description="Seconds a generated image "
                                 "stays at its URL (images response_format=url); 0: url "
                                 "output is off.")
    timeout: float = Field(600.0, gt=0, description="Per-request timeout (seconds).")
    mooncake_port: int = Field(8080, ge=0, le=65535)
    tcp_transfer_device: str | None = None
    enable_nvtx: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    model_path: str | None = None
    revision: Revisions = None
    load_format: Literal["auto", "dummy"] = "auto"
    weights_from_peers: bool = Field(False, description="Workers serve their weights to "
                                     "peers and a starting worker takes them from a running "
                                     "peer before reading the checkpoint (off: the service "
                                     "hands weights to anyone reaching the worker).")
    preset: str | None = None
    api_key: str | None = None
    policy_ws_port: int | None = Field(None, ge=1, le=65535, description="Also serve a "
                                       "policy model's websocket protocol (e.g. Pi0.5's "
                                       "openpi protocol) on this port (the model's plugin "
                                       "reads it).")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    startup_timeout: float = Field(600.0, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
    data_workers: int = Field(1, ge=1, description="Processes running the model's "
                              "process_prompt and postprocess, off the API server.")
    data_parallel_size: int | None = Field(None, ge=1, description="Data-parallel "
                                           "replicas of the layout (sets the deployment's "
                                           "`replicas`); None: the YAML's.")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads of each rank's "
                                    "worker process (CPU); None: the machine's cores "
                                    "divided among the ranks.")
    allow_private_media_urls: bool = Field(False, description="Fetch media URLs whose host "
                                           "is private, loopback or link-local (SSRF guard "
                                           "off).")
    media_max_bytes: int = Field(20 * 1024 * 1024, gt=0,
                                 description="Per media item, fetched, inline or uploaded.")
    media_max_image_pixels: int = Field(4096 * 4096, gt=0)
    media_max_audio_seconds: float = Field(600.0, gt=0)
    media_max_video_seconds: float = Field(600.0, gt=0)
    media_fetch_timeout: float = Field(10.0, gt=0, description="Seconds for a whole media "
                                       "URL fetch, redirects included.")
    nnodes: int = Field(1, ge=1, description="Machines the deployment spans (one "
                        "mstar-serve each; the config maps ranks to them).")
    node_rank: int = Field(0, ge=0, description="This machine's node: 0 serves HTTP and "
                           "runs the conductor; the others only run their ranks.")
    master_addr: str = Field("127.0.0.1", min_length=1, description="Node 0's address, "
                             "reachable from every node.")
    master_port: int = Field(29600, ge=1, le=65535, description="Node 0's port where the "
                             "other nodes join; the deployment's control endpoints and "
                             "tensor-parallel rendezvous take the ports after it.")
    dist_init_addr: str | None = Field(None, pattern=r"^\[?[^\s\]]+\]?:\d+$",
                                       description="HOST:PORT, the same as --master-addr "
                                       "HOST --master-port PORT (SGLang's name).")

    @model_validator(mode="after")
    def _nodes(self) -> ServerSettings:
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            self.master_addr, self.master_port = host.strip("[]"), int(port)
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not a node of --nnodes "
                             f"{self.nnodes} (0..{self.nnodes - 1})")
        return self

    def eviction_policy(self) -> EvictionPolicy:
        """The cache limits of these settings, for `WeightCache.gc` (a server's background
        eviction and `mstar weights gc` alike)."""
        from mstar.weights.eviction import EvictionPolicy  # weights import torch

        return EvictionPolicy(max_size_bytes=self.cache_max_size,
                              min_free_space_bytes=self.cache_min_free_space,
                              unused_threshold=self.cache_unused_threshold,
                              max_models=self.cache_max_models,
                              check_interval=self.cache_check_interval)

    def media_limits(self) -> MediaLimits:
        """The `MediaLimits` these settings give every media fetch, decode and upload."""
        # Imported here: mstar.media pulls in Pillow, soundfile and PyAV, which commands
        # that only read settings never need.
        from mstar.media.limits import MediaLimits

        return MediaLimits(max_bytes=self.media_max_bytes,
                           max_image_pixels=self.media_max_image_pixels,
                           max_audio_seconds=self.media_max_audio_seconds,
                           max_video_seconds=self.media_max_video_seconds,
                           fetch_timeout_s=self.media_fetch_timeout,
                           allow_private_urls=self.allow_private_media_urls)


@functools.cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    field = ServerSettings.model_fields[name]
    if not field.metadata:
        return TypeAdapter(field.annotation)
    return TypeAdapter(Annotated[field.annotation, *field.metadata])


def _error_text(exc: ValidationError) -> str:
    error = exc.errors()[0]
    got = repr(error.get("input"))
    return f"{error['msg']} (got {got if len(got) <= 60 else got[:57] + '...'})"


def _check_layer(values: Mapping[str, Any], name: Callable[[str], str],
                 problems: list[str]) -> dict[str, Any]:
    """One layer's values, each validated on its own (so a bad value is blamed on the layer
    it came from, not on the merged result); problems are appended."""
    checked = {}
    for key, value in values.items():
        if key not in ServerSettings.model_fields:
            problems.append(f"{name(key)}: unknown setting; allowed: "
                            f"{', '.join(ServerSettings.model_fields)}")
            continue
        try:
            checked[key] = _field_adapter(key).validate_python(value)
        except ValidationError as exc:
            problems.append(f"{name(key)}: {_error_text(exc)}")
    return checked


def layered_settings(cli: Mapping[str, Any], yaml_section: Any = None,
                     defaults: Mapping[str, Any] | None = None) -> ServerSettings:
    """Merge the layers, highest first: `cli` (options given on the command line), the
    `MSTAR_*` environment, the YAML's `server:` section, `defaults` (a command's own
    defaults, e.g. `mstar serve`'s plumbing), then the field defaults. Raises `ConfigError`
    naming every bad value by its source: `--port`, `MSTAR_PORT`, `server.port`."""
    problems: list[str] = []
    try:
        env = ServerSettings()
        from_env = {key: getattr(env, key) for key in env.model_fields_set}
    except ValidationError as exc:
        from_env = {}
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"MSTAR_{key.upper()}: {error['msg']} (got {error.get('input')!r})")
    if yaml_section is None:
        yaml_section = {}
    if not isinstance(yaml_section, Mapping):
        problems.append(f"server: expected a mapping of settings (port, host, ...), got "
                        f"{type(yaml_section).__name__}")
        yaml_section = {}
    merged = {
        **_check_layer(defaults or {}, lambda key: f"default {key}", problems),
        **_check_layer(yaml_section, lambda key: f"server.{key}", problems),
        **from_env,
        **_check_layer(cli, lambda key: "--" + key.replace("_", "-"), problems),
    }
    if problems:
        raise ConfigError(problems, source="(server settings)")
    try:
        return ServerSettings(**merged)
    except ValidationError as exc:  # the settings' checks across fields (node rank)
        raise ConfigError([str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()],
                          source="(server settings)") from None
