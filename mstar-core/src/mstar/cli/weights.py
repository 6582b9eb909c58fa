"""`mstar weights`: the weight cache from the command line (list, pull, rm, verify, pin,
unpin, gc, path), over `mstar.weights.cache.WeightCache`.

A target is an installed model's name (every hub repo of its `weight_sources`; Orpheus
has two) or a hub repo id. `--revision` is per weight source as in `mstar serve`
(`default=<sha>`, `snac=<tag>`; a bare REV is the default source's, or the repo's). The
cache directory and the eviction limits come from the same layers as serving
(`--cache-dir` > `MSTAR_*` > `--config`'s `server:` section > defaults), so a command acts
on the cache the servers use. Every refusal is one message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar.cli.serve import _cli_layer, add_cache_limit_options
from mstar.config import ConfigError, loader
from mstar.config.settings import ServerSettings, layered_settings, parse_revisions
from mstar.config.units import format_size
from mstar.plugins import model_registry

if TYPE_CHECKING:
    from mstar.weights.cache import CacheEntry, WeightCache

EXIT_ERROR = 1


class TargetError(ValueError):
    """A name that is neither an installed model nor a hub repo id, or a revision for a
    source the model does not have."""


@dataclass(frozen=True)
class Target:
    """One thing to act on: a hub repo at a revision (None: its default), or a URL
    source's file (`url`, pulled only)."""

    repo: str
    revision: str | None = None
    url: bool = False

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def targets(name: str, revision: Sequence[str] | None) -> list[Target]:
    """The repos `name` stands for, each at its revision from `revision`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from mstar.weights.download import is_url

    try:
        revisions = parse_revisions(list(revision)) if revision else {}
    except ValueError as exc:
        raise TargetError(f"--revision: {exc}") from None
    try:
        sources = model_registry(strict=False).get(name).weight_sources
    except KeyError:
        sources = None
    if sources is None:
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise TargetError(f"{name!r} is neither an installed model (see `mstar models`) "
                              "nor a hub repo id (owner/name)") from None
        unknown = set(revisions) - {"default"}
        if unknown:
            raise TargetError(f"{name!r} is a repo: give --revision REV, not "
                              f"{', '.join(sorted(unknown))}=REV")
        return [Target(name, revisions.get("default"))]
    unknown = set(revisions) - set(sources)
    if unknown:
        raise TargetError(f"model {name!r} has no weight source "
                          f"{', '.join(map(repr, sorted(unknown)))}; its sources: "
                          f"{', '.join(sources)}")
    found = []
    for source, location in sources.items():
        if is_url(location):
            found.append(Target(location, url=True))
        else:
            try:
                validate_repo_id(location)
            except HFValidationError:
                continue  # a local path: nothing to cache
            found.append(Target(location, revisions.get(source)))
    if not found:
        raise TargetError(f"model {name!r} has no hub weight sources")
    return found


def _settings(args: argparse.Namespace) -> ServerSettings:
    """The server settings these commands share with serving (cache dir, limits)."""
    section = None
    if args.config is not None:
        section = loader.read_config_data(args.config)[0].get("server")
    return layered_settings(_cli_layer(args), section)


def _cache(args: argparse.Namespace) -> WeightCache:
    from mstar.weights.cache import WeightCache

    return WeightCache(_settings(args).cache_dir)


# ------------------------------------------------------------------------------------------
# Commands


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{int(seconds // scale)}{unit} ago"
    return "just now"


def _entry_json(entry: CacheEntry) -> dict[str, Any]:
    return {"repo": entry.repo, "revision": entry.revision, "refs": list(entry.refs),
            "size_bytes": entry.size_bytes, "last_used": entry.last_used,
            "pinned": entry.pinned, "path": str(entry.path),
            "in_use_by": [{"server": lease.server, "pid": lease.pid, "host": lease.host}
                          for lease in entry.leases]}


def cmd_list(args: argparse.Namespace) -> int:
    """Every cached repo revision: size, last use, the servers using it, pinned."""
    from mstar.cli.main import _table

    cache = _cache(args)
    entries = sorted(cache.entries(), key=lambda e: (e.repo, e.revision))
    files = _url_files(cache.cache_dir)
    if args.json:
        print(json.dumps({"repos": [_entry_json(e) for e in entries],
                          "url_files": [{"path": str(f), "size_bytes": f.stat().st_size}
                                        for f in files]}, indent=2))
        return 0
    if not entries and not files:
        print(f"no weights cached in {cache.cache_dir}")
        return 0
    now = time.time()
    rows = [[e.repo, e.revision[:12] + (f" ({', '.join(e.refs)})" if e.refs else ""),
             format_size(e.size_bytes), _ago(e.last_used, now),
             ", ".join(sorted({lease.server for lease in e.leases})) or "-",
             "yes" if e.pinned else "-"] for e in entries]
    rows += [[str(f.relative_to(cache.cache_dir)), "-", format_size(f.stat().st_size),
              "-", "-", "-"] for f in files]
    print(_table(["REPO", "REVISION", "SIZE", "LAST USED", "IN USE BY", "PINNED"], rows))
    total = sum(e.size_bytes for e in entries) + sum(f.stat().st_size for f in files)
    print(f"{len(entries)} revision(s), {len(files)} URL file(s), {format_size(total)} "
          f"in {cache.cache_dir}")
    return 0


def _url_files(cache_dir: Path) -> list[Path]:
    """The complete files of URL sources (`mstar.weights.download`'s
    `<cache>/mstar-urls/<key>/<name>`; a download in progress is a hidden `.part`)."""
    return sorted(f for f in (cache_dir / "mstar-urls").glob("*/*")
                  if f.is_file() and not f.name.startswith("."))


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model's hub repos (or one repo) into the cache, once per deployment."""
    cache = _cache(args)
    for target in targets(args.target, args.revisions):
        if target.url:
            from mstar.weights.cache import hub_offline
            from mstar.weights.download import download

            print(download(target.repo, cache.cache_dir, offline=hub_offline()))
        else:
            print(cache.pull(target.repo, target.revision, progress=not args.quiet))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove a model's (or repo's) cached revision; refused while a server uses it."""
    cache = _cache(args)
    for target in targets(args.target, args.revisions):
        if target.url:
            file = _url_file(target, cache.cache_dir)
            freed = file.stat().st_size
            file.unlink()
        else:
            freed = cache.remove(target.repo, target.revision)
        print(f"removed {target} ({format_size(freed)} freed)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file's size and hash (one model or repo, else the whole cache); each
    bad file is named and the exit status is 1."""
    cache = _cache(args)
    if args.target is None:
        checked = [Target(e.repo, e.revision) for e in cache.entries()]
    else:
        checked = _hub(targets(args.target, args.revisions))
    bad = 0
    for target in checked:
        problems = cache.verify(target.repo, target.revision)
        bad += len(problems)
        for problem in problems:  # each names the repo, revision and file
            print(problem)
        if not problems:
            print(f"{target}: ok")
    return EXIT_ERROR if bad else 0


def _set_pinned(args: argparse.Namespace, pinned: bool) -> int:
    cache = _cache(args)
    for target in _hub(targets(args.target, args.revisions)):
        (cache.pin if pinned else cache.unpin)(target.repo, target.revision)
        print(f"{'pinned' if pinned else 'unpinned'} {target}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    """Keep a model's (or repo's) revision from eviction."""
    return _set_pinned(args, True)


def cmd_unpin(args: argparse.Namespace) -> int:
    """Let eviction take a pinned revision again."""
    return _set_pinned(args, False)


def cmd_gc(args: argparse.Namespace) -> int:
    """Evict by the cache limits of the layered settings (least recently used first; never
    a pinned or in-use revision); `--dry-run` only lists what would go."""
    from mstar.weights.cache import WeightCache

    settings = _settings(args)
    policy = settings.eviction_policy()
    cache = WeightCache(settings.cache_dir)
    evicted = cache.gc(policy, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in evicted:
        print(f"{verb} {entry.repo}@{entry.revision[:12]} ({format_size(entry.size_bytes)})")
    limits = (policy.max_size_bytes, policy.min_free_space_bytes, policy.unused_threshold,
              policy.max_models)
    if all(limit is None for limit in limits):
        print("no cache limits set (cache_max_size, cache_min_free_space, "
              "cache_unused_threshold, cache_max_models): nothing to evict")
    else:
        print(f"{verb} {len(evicted)} revision(s), "
              f"{format_size(sum(e.size_bytes for e in evicted))}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    """Print the local snapshot directory of each of a model's repos (or of one repo)."""
    cache = _cache(args)
    for target in targets(args.target, args.revisions):
        print(_url_file(target, cache.cache_dir) if target.url
              else cache.path(target.repo, target.revision))
    return 0


def _url_file(target: Target, cache_dir: Path) -> Path:
    """The cached file of a URL source; `WeightsError` when it is not cached."""
    from mstar.weights.cache import WeightsError
    from mstar.weights.download import cached_path

    file = cached_path(target.repo, cache_dir)
    if not file.is_file():
        raise WeightsError(f"{target.repo} is not in the cache {cache_dir} (`mstar weights "
                           "pull` downloads it)")
    return file


def _hub(found: list[Target]) -> list[Target]:
    """The hub repos of `found` (a URL source's file has no revision, pin or hashes to
    check: it is pulled, listed, removed and located only)."""
    repos = [target for target in found if not target.url]
    if not repos:
        raise TargetError(f"{', '.join(map(str, found))}: a URL file, not a hub repo (only "
                          "pull, list, rm and path apply)")
    return repos


# ------------------------------------------------------------------------------------------
# Parser


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; a refusal is `error: <message>` and exit status 1."""
    from mstar.weights.cache import WeightsError
    from mstar.weights.download import DownloadError

    try:
        return args.weights_func(args)
    except (TargetError, ConfigError, WeightsError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def add_weights_command(commands: argparse._SubParsersAction) -> None:
    """Register `mstar weights ...` on the `mstar` command's subparsers."""
    group = commands.add_parser("weights", help="manage the model weight cache",
                                description=__doc__.split("\n\n")[0])
    sub = group.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help: str, *, target: str | None = "required",
            revision: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, description=func.__doc__)
        if target is not None:
            parser.add_argument("target", nargs=None if target == "required" else "?",
                                metavar="MODEL_OR_REPO",
                                help="an installed model (all its hub repos) or a hub repo "
                                     "id")
        if revision:
            parser.add_argument("--revision", action="append", dest="revisions",
                                metavar="[SOURCE=]REV",
                                help="revision (branch, tag or commit) per weight source, "
                                     "as in `mstar serve`; default: the cached or hub "
                                     "default")
        parser.add_argument("--cache-dir", help="weight cache (default: MSTAR_CACHE_DIR, "
                                                "HF_HUB_CACHE, HF_HOME/hub, "
                                                "~/.cache/huggingface/hub)")
        parser.add_argument("--config", metavar="PATH_OR_NAME",
                            help="deployment YAML whose server: section gives the cache "
                                 "dir and limits")
        parser.set_defaults(func=_run, weights_func=func)
        return parser

    add("list", cmd_list, "cached revisions, sizes, last use, users, pins", target=None,
        revision=False).add_argument("--json", action="store_true",
                                     help="one JSON array of the entries")
    add("pull", cmd_pull, "download into the cache (with a progress bar)").add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar")
    add("rm", cmd_rm, "remove from the cache (refused while in use)")
    add("verify", cmd_verify, "check sizes and hashes; names each bad file",
        target="optional")
    add("pin", cmd_pin, "keep from eviction")
    add("unpin", cmd_unpin, "allow eviction again")
    gc = add("gc", cmd_gc, "evict by the cache limits", target=None, revision=False)
    gc.add_argument("--dry-run", action="store_true",
                    help="list what would be removed, remove nothing")
    add_cache_limit_options(gc, background=False)
    add("path", cmd_path, "print the local snapshot directory")
