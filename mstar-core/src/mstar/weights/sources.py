"""Finding checkpoint files: a local path as is, a Hugging Face hub snapshot, or a single
file behind a URL (`mstar.weights.download`).

Only the files the node's patterns name (plus config.json) are downloaded. When a
`*.index.json` for the patterns is present, its weight map decides the shards: repos often
ship the same weights twice (sharded and consolidated), and only the index says which set
is the model.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mstar.weights.cache import WeightCache, WeightsError, hub_offline, resolve_cache_dir
from mstar.weights.download import DownloadError, download, is_url


class WeightSourceError(RuntimeError):
    """The weights could not be located or fetched; the message says what to do instead."""


def is_hub_repo(source: str) -> bool:
    """Whether a weight source names a hub repo: not a URL, not an existing path."""
    return not (is_url(source) or _looks_local(source) or Path(source).expanduser().exists())


def _looks_local(source: str) -> bool:
    """A hub id is `name` or `owner/name` and never starts with '.', '/' or '~'."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


def resolve_source(source: str, *, patterns: Sequence[str], subfolder: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None,
                   token: str | None = None) -> Path:
    """The local directory (or file) holding the checkpoint named by `source`: an existing
    path; a URL's file, downloaded once into the cache (`resolve_cache_dir(cache_dir)`);
    else a hub repo id pulled (only `patterns` and config.json) into that cache
    (`WeightCache.pull`: one download however many processes ask at once; a snapshot
    missing a file or holding one at a size other than the hub's is refused, naming it)."""
    if is_url(source):
        if revision is not None or subfolder is not None:
            raise WeightSourceError(f"weight source {source!r} is a URL to one file: a "
                                    "revision or subfolder applies to hub repos only")
        try:
            return download(source, resolve_cache_dir(cache_dir), offline=hub_offline())
        except DownloadError as err:
            raise WeightSourceError(f"{err}. Pass a local checkpoint with --model-path, or "
                                    "use --load-format dummy for random weights.") from err
    local = Path(source).expanduser()
    if local.exists():
        path = local / subfolder if subfolder and local.is_dir() else local
        if not path.exists():
            raise WeightSourceError(f"weight path {local} has no subfolder {subfolder!r}")
        return path
    if _looks_local(source):
        raise WeightSourceError(f"weight path {source!r} does not exist")

    prefix = f"{subfolder}/" if subfolder else ""
    allow = [prefix + p for p in patterns] + ["config.json"]
    if subfolder:
        allow.append(prefix + "config.json")
    try:
        snapshot = WeightCache(cache_dir).pull(source, revision, allow_patterns=allow,
                                               token=token or os.environ.get("HF_TOKEN"))
    except WeightsError as err:
        why = (" (HF_HUB_OFFLINE is set: only the cache is looked at)" if hub_offline()
               else "")
        raise WeightSourceError(
            f"could not fetch weights of hub repo {source!r}{why}: {err}. Pass a local "
            "checkpoint with --model-path, download it into the cache beforehand (`mstar "
            "weights pull`, --cache-dir / MSTAR_CACHE_DIR), or use --load-format dummy for "
            "random weights.") from err
    return Path(snapshot) / subfolder if subfolder else Path(snapshot)


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def checkpoint_files(path: str | os.PathLike[str], patterns: Sequence[str]) -> list[Path]:
    """The weight files of a checkpoint, sorted. A file path is returned as is; in a
    directory, an index (`<pattern-matching name>.index.json`) names the shards when present,
    otherwise every file matching `patterns` is used."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint path {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    rel = {p: p.relative_to(root).as_posix() for p in files}
    for index in files:
        name = rel[index]
        if name.endswith(".index.json") and _matches(name.removesuffix(".index.json"), patterns):
            weight_map: dict[str, Any] = json.loads(index.read_text())["weight_map"]
            shards = sorted({index.parent / f for f in weight_map.values()})
            absent = [str(s) for s in shards if not s.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are missing: {absent}")
            return shards
    found = [p for p in files if _matches(rel[p], patterns)]
    if not found:
        raise FileNotFoundError(f"no checkpoint files matching {list(patterns)} in {root}")
    return found


def read_checkpoint_config(path: str | os.PathLike[str],
                           config_files: Sequence[str] = ()) -> dict[str, Any]:
    """The checkpoint's config.json (next to the file when `path` is a file), or {}; each
    of `config_files` (which must exist) added under its file name."""
    root = Path(path)
    directory = root if root.is_dir() else root.parent
    config = directory / "config.json"
    found = json.loads(config.read_text()) if config.is_file() else {}
    for name in config_files:
        file = directory / name
        if not file.is_file():
            raise WeightSourceError(f"the checkpoint in {directory} has no {name} (the model "
                                    f"reads its config from config.json and "
                                    f"{', '.join(config_files)})")
        found[name] = json.loads(file.read_text())
    return found
