"""Load a `DeploymentConfig` from a YAML file or from a config packaged in a plugin.

A plugin ships its YAMLs inside its wheel and names them in `ModelSpec.configs`
("mstar_orpheus:configs/orpheus_colocated.yaml"), so `--config orpheus_colocated` (or
`configs/orpheus_colocated.yaml` where no such file exists) works after a plain `pip
install`, outside the repository. Every way a file can be wrong (YAML syntax, unknown keys,
bad values, overrides that point nowhere) becomes one `ConfigError` listing each bad field
by its dotted path with what is allowed.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from mstar.config.deployment import DeploymentConfig
from mstar.config.validate import ConfigError
from mstar.plugins.manager import model_registry


def packaged_configs() -> dict[str, str]:
    """Config name -> import-resource path, over every installed model. Two plugins
    shipping different files under one name is an error."""
    found: dict[str, str] = {}
    conflicts = []
    for spec in model_registry():
        for name, resource in spec.configs.items():
            if found.setdefault(name, resource) != resource:
                conflicts.append(f"config name {name!r} is shipped twice: {found[name]} and "
                                 f"{resource}")
    if conflicts:
        raise ConfigError(conflicts, source="(packaged configs)")
    return found


def _read_resource(resource: str) -> str:
    package, _, relative = resource.partition(":")
    try:
        return importlib.resources.files(package).joinpath(relative).read_text(encoding="utf-8")
    except (ImportError, OSError) as exc:
        raise ConfigError([f"config: cannot read packaged config {resource!r}: {exc}"]) from exc


def _read(path_or_name: str) -> tuple[str, str]:
    """(YAML text, where it came from): an existing file, else a packaged config name (a
    missing `*.yaml` path falls back to the packaged config of the same stem)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ConfigError([f"config: cannot read {path}: {exc}"]) from exc
    name = path.stem if path.suffix in (".yaml", ".yml") else path_or_name
    configs = packaged_configs()
    if name not in configs:
        raise ConfigError([f"config: no file {path_or_name!r} and no packaged config named "
                           f"{name!r}; packaged configs: {', '.join(sorted(configs)) or 'none'}"])
    return _read_resource(configs[name]), f"{name} ({configs[name]})"


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"yaml ({where}): {exc.problem or exc.context}"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"yaml: {exc}"], source) from None
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping of keys (model, node_groups, ...), "
                           f"got {type(data).__name__}"], source)
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted path ("node_groups.0.tp_size"); missing mapping levels are created."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        index: int | str = part
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError([f"{here}: no such entry (the list has {len(node)})"])
            index = int(part)
        elif not isinstance(node, dict):
            raise ConfigError([f"{here}: {'.'.join(parts[:depth])} is a "
                               f"{type(node).__name__}, not a mapping or a list"])
        elif depth < len(parts) - 1:
            node.setdefault(part, {})
        if depth == len(parts) - 1:
            node[index] = value
        else:
            node = node[index]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set key=value` items -> overrides; values are YAML (`2`, `[0, 1]`, `bfloat16`)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key=value (e.g. max_seq_len=8192)"])
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError([f"--set {item!r}: value is not YAML: {exc}"]) from None
    return overrides


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema class at a pydantic error location (list indices skipped)."""
    current: Any = DeploymentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        current = _inner_model(field.annotation) if field else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_inner_model, get_args(annotation))), None)


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = ".".join(map(str, loc)) or "config"
    if error["type"] == "extra_forbidden":
        schema = _model_at(loc[:-1])
        allowed = ", ".join(schema.model_fields) if schema else "?"
        return f"{path}: unknown key; allowed: {allowed}"
    if error["type"] == "missing":
        return f"{path}: required"
    got = repr(error.get("input"))
    return f"{path}: {error['msg']} (got {got if len(got) <= 60 else got[:57] + '...'})"


def read_config_data(path_or_name: str) -> tuple[dict[str, Any], str]:
    """A deployment YAML (path or packaged name) as data, and where it came from."""
    text, source = _read(path_or_name)
    return _parse(text, source), source


def config_from_data(data: dict[str, Any], source: str,
                     overrides: Mapping[str, Any] | None = None) -> DeploymentConfig:
    """Apply dotted-path `overrides` and check the schema, reporting every problem at once
    (a `server:` section must have been split off: it holds server settings)."""
    problems: list[str] = []
    for key, value in (overrides or {}).items():
        try:
            _set(data, key, value)
        except ConfigError as exc:
            problems += exc.problems
    try:
        config = DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(e) for e in exc.errors()]
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path_or_name: str, *,
                overrides: Mapping[str, Any] | None = None) -> DeploymentConfig:
    """Read, override and check the schema of a deployment config (not yet against its
    model: see `validate_for_model`). `overrides` maps dotted paths to values; a `server:`
    section (settings of `mstar-serve`) is ignored here."""
    data, source = read_config_data(path_or_name)
    data.pop("server", None)
    return config_from_data(data, source, overrides)
