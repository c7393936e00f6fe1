"""The config file and environment behind every `petald` flag. Before the command line is parsed,
`apply_config(parser, argv, environ)` sets each subcommand's defaults from two layers: the TOML
file (`--config FILE`, else $PETALD_CONFIG, else /etc/petald/petald.toml if it exists), then the
environment (`PETALD_<FLAG>`, e.g. PETALD_INITIAL_PEERS); flags on the command line override
both. A flag is named by its long name without the dashes (`initial_peers` or `initial-peers`;
`--no-relay` is `no_relay = true`), a positional by its name (`model`):

    blocks = "20:40"                 # top-level keys (or a [common] table) apply to every
    [serve]                          # command that has the flag; a [COMMAND] table to one
    model = "/srv/models/llama"
    initial_peers = ["/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."]

Values have the flag's type (strings, integers, numbers, true/false, lists for flags that take
several values); relative paths in the file are relative to the file's directory. An unknown
table or key, or a value of the wrong type, is a one-line ValueError naming the file, the key
and what was expected (the CLI exits with status 2). In the environment, lists are split on
spaces and booleans are 1/0, true/false, yes/no; PETALD_ variables that name no flag of any
command (PETALD_CACHE_DIR and the like) are left alone; PETALD_NO_CONFIG=1 turns both layers
off (the local swarm's children, test daemons). `petald config show` (petald.cli.
config_show) prints the result and where each value came from."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path("/etc/petald/petald.toml")
ENV_FILE = "PETALD_CONFIG"
ENV_PREFIX = "PETALD_"
# Set to 1 for processes whose parent gives them every flag they need (the servers of `petald
# chat`'s local swarm, test daemons): a server's config file (its [serve] metrics port, allow
# list, swarm key) must not leak into them.
NO_CONFIG = "PETALD_NO_CONFIG"
SHARED = "common"  # the table whose keys, like the top-level ones, apply to every command
# Flags (by dest) naming a file or directory: relative in the file means relative to the file.
# The model and --allow-peers only when something exists there (else a Hub id, peer ids).
PATH_DESTS = frozenset({"identity", "swarm_key", "adapters", "config"})
MAYBE_PATH_DESTS = frozenset({"model", "allow_peers"})
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """A default a layer gave one flag of one command: its value as argparse stores it."""

    value: Any
    source: str  # "file /etc/petald/petald.toml [serve]", "env PETALD_BLOCKS"


Layers = dict[str, dict[str, Setting]]  # command -> dest -> the setting that won


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML file of defaults for any flag (default: ${ENV_FILE}, else {DEFAULT_FILE} "
        f"if it exists); PETALD_<FLAG> variables override it, flags override both",
    )


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's flags by config key: long option name with '_' for '-', or positional name."""
    out = {}
    for a in sub._actions:
        if a.dest in ("help", "version", "config") or a.nargs == argparse.REMAINDER:
            continue
        longs = [s for s in a.option_strings if s.startswith("--")]
        if a.option_strings and not longs:
            continue  # short-only flags have no name to use in a file
        out[longs[0][2:].replace("-", "_") if longs else a.dest] = a
    return out


def config_file(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """The file to read: --config (anywhere before a bare `--`), $PETALD_CONFIG, or the default
    if it exists. One that was named must exist."""
    named = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            named = argv[i + 1]
        elif arg.startswith("--config="):
            named = arg.split("=", 1)[1]
    named = named or environ.get(ENV_FILE) or None
    if named is None:
        return DEFAULT_FILE if DEFAULT_FILE.is_file() else None
    path = Path(named)
    if not path.is_file():
        raise ValueError(f"config file {path}: no such file")
    return path


def read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from None


def file_layer(parser: argparse.ArgumentParser, path: Path, table: dict[str, Any]) -> Layers:
    subs = {name: flags(sub) for name, sub in commands(parser).items()}
    layers: Layers = {name: {} for name in subs}
    shared = {k: v for k, v in table.items() if not isinstance(v, dict)}
    shared_table = table.get(SHARED, {})
    if not isinstance(shared_table, dict):
        raise ValueError(f"config file {path}: '{SHARED}' must be a table ([{SHARED}])")
    for key, value in {**shared, **shared_table}.items():
        name = key.replace("-", "_")
        where = f"file {path}" + (f" [{SHARED}]" if key in shared_table else "")
        users = [c for c, f in subs.items() if name in f]
        if not users:
            raise ValueError(f"config file {path}: unknown key '{key}' (no command has --{key})")
        for c in users:
            layers[c][subs[c][name].dest] = Setting(
                convert(subs[c][name], value, f"{path}: {key}", path.parent), where
            )
    for command, entries in table.items():
        if not isinstance(entries, dict) or command == SHARED:
            continue
        if command not in subs:
            raise ValueError(f"config file {path}: unknown table [{command}] (not a command)")
        for key, value in entries.items():
            action = subs[command].get(key.replace("-", "_"))
            if action is None:
                raise ValueError(f"config file {path}: [{command}] unknown key '{key}'")
            here = f"{path}: [{command}] {key}"
            layers[command][action.dest] = Setting(
                convert(action, value, here, path.parent), f"file {path} [{command}]"
            )
    return layers


def env_layer(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> Layers:
    layers: Layers = {}
    for command, sub in commands(parser).items():
        layers[command] = {}
        for key, action in flags(sub).items():
            var = ENV_PREFIX + key.upper()
            if var in environ and var != ENV_PREFIX + "CONFIG":
                value = from_env(action, environ[var], var)
                layers[command][action.dest] = Setting(value, f"env {var}")
    return layers


def from_env(action: argparse.Action, text: str, var: str) -> Any:
    """An environment variable's text as the TOML value it stands for."""
    if action.nargs == 0:
        if text.lower() not in TRUE + FALSE:
            raise ValueError(f"{var}: expected true or false (1/0, yes/no), got {text!r}")
        return convert(action, text.lower() in TRUE, var, None)
    if _is_list(action):
        return convert(action, text.split(), var, None)
    if action.type in (int, float):
        try:
            return convert(action, action.type(text), var, None)
        except ValueError:
            raise ValueError(f"{var}: expected {_expected(action)}, got {text!r}") from None
    return convert(action, text, var, None)


def _is_list(action: argparse.Action) -> bool:
    return action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)


def _expected(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    if _is_list(action):
        return "a list of strings"
    if action.choices:
        return "one of " + ", ".join(f'"{c}"' for c in action.choices)
    return {int: "an integer", float: "a number"}.get(action.type, "a string")  # type: ignore[call-overload]


def convert(action: argparse.Action, value: Any, where: str, base: Path | None) -> Any:
    """`value` (a TOML value) as argparse would store the flag; ValueError naming `where` and
    the type expected. `base`: the directory relative paths are relative to."""
    wrong = ValueError(f"{where}: expected {_expected(action)}, got {value!r}")
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise wrong
        return action.const if value else (not action.const)  # store_true / store_false
    if _is_list(action):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong
        return [_one(action, v, wrong, base) for v in value]
    if action.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise wrong
    if action.type is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise wrong
    if action.type in (int, float):
        return action.type(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and not action.choices:
        value = str(value)  # `throughput = 100`: a flag whose text may be a number
    if not isinstance(value, str):
        raise wrong
    return _one(action, value, wrong, base)


def _one(action: argparse.Action, text: str, wrong: ValueError, base: Path | None) -> Any:
    if action.choices is not None and text not in action.choices:
        raise wrong
    if base is not None and action.dest in PATH_DESTS | MAYBE_PATH_DESTS:
        path = Path(text).expanduser()
        if not path.is_absolute() and (action.dest in PATH_DESTS or (base / path).exists()):
            text = str(base / path)
    if action.type is None:
        return text
    try:
        return action.type(text)  # type: ignore[operator]
    except (TypeError, ValueError):
        raise wrong from None


def load_layers(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[Path | None, Layers]:
    """The file's and the environment's settings per command (the environment's win)."""
    path = config_file(argv, environ)
    layers = file_layer(parser, path, read_file(path)) if path else {}
    for command, settings in env_layer(parser, environ).items():
        layers.setdefault(command, {}).update(settings)
    return path, layers


def set_defaults(sub: argparse.ArgumentParser, settings: dict[str, Setting]) -> None:
    """Makes `settings` the command's defaults; a flag or positional they give is no longer
    required on the command line."""
    if not settings:
        return
    for group in sub._mutually_exclusive_groups:
        if any(a.dest in settings for a in group._group_actions):
            group.required = False
            builtin = {a.dest: a.default for a in group._group_actions}
            for a in group._group_actions:
                _clears_others(a, {d: v for d, v in builtin.items() if d != a.dest})
    sub.set_defaults(**{dest: s.value for dest, s in settings.items()})
    for a in sub._actions:
        if a.dest in settings:
            a.required = False
            if not a.option_strings and a.nargs is None:
                a.nargs = "?"


def _clears_others(action: argparse.Action, others: dict[str, Any]) -> None:
    """Makes `action`, given on the command line, reset the other flags of its mutually
    exclusive group to their built-in defaults: `--num-blocks 4` replaces the file's `blocks`,
    rather than both being set."""

    class Exclusive(type(action)):  # type: ignore[misc]
        def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
            for dest, default in others.items():
                setattr(namespace, dest, default)
            super().__call__(parser, namespace, values, option)

    action.__class__ = Exclusive


def apply_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path | None, Layers]:
    """Adds --config to every command and makes the file's and environment's settings their
    defaults; returns (file read, settings) for `petald config show`."""
    argv = list(argv) if argv is not None else []
    environ = os.environ if environ is None else environ
    for sub in commands(parser).values():
        add_config_flag(sub)
    if environ.get(NO_CONFIG) == "1":
        return None, {}
    path, layers = load_layers(parser, argv, environ)
    for command, sub in commands(parser).items():
        set_defaults(sub, layers.get(command, {}))
    return path, layers
