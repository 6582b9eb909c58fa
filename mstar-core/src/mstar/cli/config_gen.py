"""`mstar config gen`: a starting YAML with every server setting, its default and what it
does, so options are discovered in the file rather than in `--help`.

The `server:` section lists each `ServerSettings` field under a one-line comment (the
field's description, else the `mstar-serve` option's help). Settings whose default is the
command's own (`mstar serve` picks per-user sockets and SHM) are written commented out: an
explicit value in the YAML would outrank that default. With `--config` the deployment of
that config (a path or packaged name) comes first, so the file serves as it is
(`mstar-serve --config mstar.yaml`); without it the file is the `server:` section alone,
to paste into a deployment YAML.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from mstar.config import ConfigError, loader
from mstar.config.settings import ServerSettings


def _option_help() -> dict[str, str]:
    """`mstar-serve`'s help per settings field, without its `(default: ...)`."""
    from mstar.cli.serve import build_serve_parser

    return {action.dest: re.sub(r"\s*\(default: .*?\)\s*$", "", action.help)
            for action in build_serve_parser()._actions if action.help}


def _comment(name: str, helps: dict[str, str]) -> str:
    field = ServerSettings.model_fields[name]
    text = field.description or helps.get(name) or name.replace("_", " ")
    return " ".join(text.split())


def _scalar(value: Any) -> str:
    """`value` as one line of YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix(" ...")


def server_section(values: dict[str, Any] | None = None) -> str:
    """The commented `server:` section: every field at its default (or at `values[name]`,
    e.g. the base config's own), command-dependent ones commented out."""
    from mstar.cli.serve import serve_defaults

    values = values or {}
    command_owned = set(serve_defaults())
    helps = _option_help()
    lines = ["server:"]
    for name, field in ServerSettings.model_fields.items():
        lines.append(f"  # {_comment(name, helps)}")
        value = values.get(name, field.default)
        if name in command_owned and name not in values:
            lines.append(f"  # {name}: {_scalar(value)}  (mstar serve has its own default)")
        else:
            lines.append(f"  {name}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def generate(config: str | None = None) -> str:
    """The YAML text: the deployment of `config` (if given), then the server section
    (keeping the values that config's `server:` sets)."""
    if config is None:
        return server_section()
    data, source = loader.read_config_data(config)
    server = data.pop("server", None) or {}
    from mstar.cli.serve import _Dumper

    head = f"# deployment from {source}\n" + yaml.dump(data, Dumper=_Dumper, sort_keys=False)
    return head + server_section(dict(server))


def cmd_config_gen(args: argparse.Namespace) -> int:
    """Write a YAML with every server setting, its default and a comment."""
    try:
        text = generate(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def add_config_command(commands: argparse._SubParsersAction) -> None:
    """Register `mstar config gen` on the `mstar` command's subparsers."""
    config = commands.add_parser("config", help="generate deployment YAML",
                                 description="Deployment YAML helpers.")
    sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    gen = sub.add_parser("gen", help="write every server setting with its default",
                         description=cmd_config_gen.__doc__)
    gen.add_argument("--output", "-o", metavar="PATH",
                     help="file to write (default: standard output)")
    gen.add_argument("--config", metavar="PATH_OR_NAME",
                     help="start from this deployment (a path or packaged config name), "
                          "so the file serves as it is; without it only the server: section "
                          "is written")
    gen.set_defaults(func=cmd_config_gen)
