"""`petald config show [COMMAND [FLAGS...]]`: the settings a command would run with, one TOML line
each (so the output can seed a config file), with where each came from: the config file, the
environment, a flag given here, or the built-in default. Without COMMAND: every command the
file or the environment sets something for. The layers themselves: petald.cli.config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from petald.cli.config import DEFAULT_FILE, ENV_FILE, Layers, commands, flags


def add_command(sub: Any) -> None:
    """Adds `petald config` to the subcommands `sub` (argparse's add_subparsers object)."""
    p = sub.add_parser(
        "config",
        help="show the settings a command runs with, from the config file, PETALD_* "
        "variables, flags and defaults",
        description=f"show [COMMAND [FLAGS...]]: print the effective settings of COMMAND (or "
        f"of every command the config file or environment sets something for) as TOML, each "
        f"with its source. The file: --config FILE, else ${ENV_FILE}, else {DEFAULT_FILE}.",
    )
    p.add_argument("op", choices=["show"])
    p.add_argument("target", nargs="?", metavar="COMMAND", help="e.g. serve, node, chat")
    p.add_argument("target_args", nargs=argparse.REMAINDER, metavar="FLAGS", help=argparse.SUPPRESS)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def effective(
    sub: argparse.ArgumentParser,
    settings: dict[str, Any],
    argv: list[str],
    builtin: dict[str, Any],
) -> list[tuple[str, Any, str]]:
    """(key, value, source) for each flag of `sub`, `argv` parsed as its command line; `builtin`:
    the defaults before any layer."""
    by_key = flags(sub)
    for a in sub._actions:  # only what argv gives shows up; nothing is required here
        a.default, a.required = argparse.SUPPRESS, False
        if not a.option_strings:  # absent, a positional's default would be checked as a value
            a.nargs, a.choices = "?" if a.nargs is None else a.nargs, None
    for group in sub._mutually_exclusive_groups:
        group.required = False
    sub._defaults.clear()  # set_defaults keeps its own copy, which parse_args fills in
    given = vars(sub.parse_args(argv))
    rows = []
    for key, action in by_key.items():
        if action.dest in given:
            value, source = given[action.dest], "flag"
        elif action.dest in settings:
            value, source = settings[action.dest].value, settings[action.dest].source
        else:
            value, source = builtin[action.dest], "default"
        if action.nargs == 0:  # the key's own sense: `no_relay = true` is relay off
            value = value == action.const
        rows.append((key, value, source))
    return rows


def show(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    read: Path | None,
    layers: Layers,
    fresh: argparse.ArgumentParser,
) -> int:
    """Prints the settings; `fresh` is an untouched parser (its defaults are the built-in
    ones), `parser` the one the layers were applied to."""
    names = [args.target] if args.target else [c for c, s in layers.items() if s]
    subs = commands(fresh)
    for name in names:
        if name not in subs or name == "config":
            raise ValueError(f"config show: no command {name!r}")
    print(f"# config file: {read or f'none ({DEFAULT_FILE} does not exist)'}")
    if not names:
        print("# no config file settings and no PETALD_* variables for any command")
        return 0
    for name in names:
        builtin = {a.dest: a.default for a in subs[name]._actions}
        rows = effective(
            commands(parser)[name], layers.get(name, {}), args.target_args or [], builtin
        )
        print(f"\n[{name}]")
        width = min(40, max((len(k) + len(toml_value(v)) for k, v, _ in rows), default=0))
        for key, value, source in rows:
            if value is None:
                print(f"# {key} = (unset)".ljust(width + 5) + f"  # {source}")
            else:
                line = f"{key} = {toml_value(value)}"
                print(line.ljust(width + 3) + f"  # {source}")
    return 0
