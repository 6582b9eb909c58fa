"""The `mstar` command: one subcommand per task (`plugins`, `models`, `serve`, `weights`,
`config gen`).

Listing commands read the registries only, so they import no torch and start fast. They
print what they can even when two plugins claim one name, then report the conflict and
exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from mstar.cli.config_gen import add_config_command
from mstar.cli.serve import add_serve_command
from mstar.cli.weights import add_weights_command
from mstar.plugins.manager import get_plugins, model_registry, transport_registry
from mstar.plugins.registry import DuplicateNameError

_NO_PLUGINS = "a model family is a plugin: pip install mstar-<family>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           notes: Mapping[int, str] | None = None) -> str:
    """Aligned columns; `notes[i]` is printed indented under row i (outside the columns,
    so a long error does not widen them)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if notes and i - 1 in notes:
            lines.append(f"    ^ {notes[i - 1]}")
    return "\n".join(lines)


def _report_conflicts() -> int:
    """Print names registered twice (fatal for serving) to stderr; the exit status."""
    status = 0
    for registry in (model_registry, transport_registry):
        try:
            registry()
        except DuplicateNameError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


def _with_capabilities(model: str, capabilities: Sequence[str]) -> str:
    return f"{model} [{', '.join(capabilities)}]" if capabilities else model


def cmd_plugins(args: argparse.Namespace) -> int:
    """Every plugin: status, models (with capabilities), transports; errors on one line."""
    models = model_registry(strict=False)
    rows, errors = [], {}
    for plugin in get_plugins():
        names = [_with_capabilities(name, models.get(name).capabilities)
                 for name in plugin.models]
        rows.append([plugin.name, plugin.distribution or "?", plugin.version or "?",
                     plugin.status, ", ".join(names) or "-",
                     ", ".join(plugin.transports) or "-"])
        if plugin.error:
            errors[len(rows) - 1] = plugin.error.splitlines()[0]
    if rows:
        print(_table(["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "MODELS", "TRANSPORTS"],
                     rows, errors))
    else:
        print(f"no plugins installed ({_NO_PLUGINS})")
    return _report_conflicts()


def cmd_models(args: argparse.Namespace) -> int:
    """Every installed model: its plugin, presets, capabilities and default config."""
    plugins = get_plugins()
    plugin_of = {name: plugin for plugin in plugins for name in plugin.models}
    rows = []
    for spec in model_registry(strict=False):
        plugin = plugin_of[spec.name]
        rows.append([spec.name, f"{plugin.name} ({plugin.distribution or '?'})",
                     ", ".join(spec.presets) or "-", ", ".join(spec.capabilities) or "-",
                     spec.default_config or "-"])
    if rows:
        print(_table(["MODEL", "PLUGIN", "PRESETS", "CAPABILITIES", "DEFAULT CONFIG"], rows))
    else:
        print(f"no models installed ({_NO_PLUGINS})")
    broken = [plugin.name for plugin in plugins if plugin.status == "error"]
    if broken:
        print(f"warning: plugins with errors: {', '.join(broken)} (see `mstar plugins`)",
              file=sys.stderr)
    return _report_conflicts()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mstar", description="Serve composite multimodal models (mstar).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("plugins", help="list installed plugins, their models and transports",
                        description=cmd_plugins.__doc__).set_defaults(func=cmd_plugins)
    commands.add_parser("models", help="list installed models",
                        description=cmd_models.__doc__).set_defaults(func=cmd_models)
    add_serve_command(commands)
    add_weights_command(commands)
    add_config_command(commands)
    # Further subcommands register here: add_parser(...).set_defaults(func=...).
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
