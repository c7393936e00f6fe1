"""petald.cli.config: the config file, then PETALD_* variables, then flags, each overriding the one
before; any flag by its long name in the file or the environment; a one-line error (exit 2) for
an unknown table or key and for a value of the wrong type; `petald config show` with sources."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petald.cli import _parser, main
from petald.cli.config import PATH_DESTS, apply_config, commands, flags
from petald.cli.config_show import toml_value

PEER = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWGzh2vXGW1pNLWp2D3fRVb6XbGkqKHMHs4Y6gCKWPYqHq"


def parse(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = _parser()
    apply_config(parser, argv, env)
    return parser.parse_args(argv)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    """Catches: the environment not overriding the file, a flag not overriding either, top-level
    keys not reaching every command, a positional or a required flag still demanded when the
    file gives it, `no_relay` not meaning relay off, relative paths not taken from the file's
    directory."""
    config = tmp_path / "petald.toml"
    config.write_text(
        f"""log_level = "info"
[common]
initial_peers = ["{PEER}"]
[serve]
model = "/srv/llama"
blocks = "20:40"
device = "cuda"
drain-timeout = 5
throughput = 100
no_relay = true
swarm_key = "swarm.key"
[node]
dht_k = 8
"""
    )
    env = {"PETALD_DEVICE": "cuda:1", "PETALD_DRAIN_TIMEOUT": "9", "PETALD_NEW_SWARM": "yes"}
    args = parse(["serve", "--config", str(config), "--drain-timeout", "30"], env)
    assert (args.model, args.blocks, args.num_blocks) == ("/srv/llama", "20:40", None)
    assert args.device == "cuda:1"  # env over file
    assert args.drain_timeout == 30.0  # flag over env over file
    assert args.new_swarm is True and args.relay is False
    assert args.initial_peers == [PEER] and args.log_level == "info"
    assert args.swarm_key == tmp_path / "swarm.key"
    assert args.throughput == "100"  # a text flag (auto|eval|N) given a TOML number
    node = parse(["node"], {"PETALD_CONFIG": str(config)})
    assert node.dht_k == 8 and node.initial_peers == [PEER] and node.log_level == "info"
    # The flags that the file gives are no longer required, but still override it.
    args = parse(["serve", "/other", "--num-blocks", "3", "--config", str(config)], {})
    assert (args.model, args.num_blocks, args.blocks) == ("/other", 3, None)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[serve]\nblokcs = '1:2'", {}, "[serve] unknown key 'blokcs'"),
        ("[serv]\nblocks = '1:2'", {}, "unknown table [serv]"),
        ("color = 'red'", {}, "unknown key 'color'"),
        ("[serve]\nnum_blocks = '4'", {}, "[serve] num_blocks: expected an integer, got '4'"),
        ("[serve]\ndrain_timeout = true", {}, "drain_timeout: expected a number, got True"),
        ("[serve]\ninitial_peers = 'x'", {}, "initial_peers: expected a list of strings"),
        ("[serve]\nnew_swarm = 1", {}, "new_swarm: expected true or false, got 1"),
        ("[serve]\ndtype = 'float8'", {}, 'dtype: expected one of "auto", "float32"'),
        ("[serve", {}, "config file"),
        ("", {"PETALD_NUM_BLOCKS": "four"}, "PETALD_NUM_BLOCKS: expected an integer, got 'four'"),
        ("", {"PETALD_NEW_SWARM": "maybe"}, "PETALD_NEW_SWARM: expected true or false"),
    ],
)
def test_bad_settings_are_one_line_errors(
    text: str, env: dict[str, str], message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Catches: an unknown key or table ignored, a string taken for a number (or a bool for a
    number: TOML's true is Python's 1), a traceback instead of exit 2, a message that does not
    name the file and key."""
    config = tmp_path / "petald.toml"
    config.write_text(text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--config", str(config), "m", "--blocks", "0:1"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if not env:
        assert str(config) in err


def test_no_config_turns_both_layers_off(tmp_path: Path) -> None:
    """The local swarm's servers (petald.cli.children) run with PETALD_NO_CONFIG=1. Catches: a
    server's [serve] settings (its public name, its quantization) leaking into them."""
    config = tmp_path / "petald.toml"
    config.write_text('[serve]\npublic_name = "home"\n')
    env = {"PETALD_CONFIG": str(config), "PETALD_QUANT": "int8"}
    args = parse(["serve", "m", "--blocks", "0:1"], env)
    assert (args.public_name, args.quant) == ("home", "int8")
    args = parse(["serve", "m", "--blocks", "0:1"], {**env, "PETALD_NO_CONFIG": "1"})
    assert (args.public_name, args.quant) == ("", "none")


def test_a_named_config_file_must_exist(tmp_path: Path, capsys) -> None:
    assert main(["node", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err


def test_config_show_names_each_source(tmp_path: Path, capsys, monkeypatch) -> None:
    """Catches: a source misattributed (a flag shown as the file's, an env value as the
    default), output that is not TOML."""
    config = tmp_path / "petald.toml"
    config.write_text('[serve]\nmodel = "/srv/llama"\nblocks = "0:2"\ndevice = "cuda"\n')
    monkeypatch.setenv("PETALD_CONFIG", str(config))
    monkeypatch.setenv("PETALD_DEVICE", "cuda:1")
    assert main(["config", "show", "serve", "--drain-timeout", "7"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split(" = ")[0]: line.rsplit("# ", 1)[1]
        for line in out.splitlines()
        if " = " in line and not line.startswith("#")
    }
    assert rows["blocks"] == f"file {config} [serve]"
    assert rows["device"] == "env PETALD_DEVICE" and rows["drain_timeout"] == "flag"
    assert rows["dtype"] == "default" and rows["no_relay"] == "default"
    import tomllib

    table = tomllib.loads(out)["serve"]  # the output is a config file itself
    assert table["device"] == "cuda:1" and table["drain_timeout"] == 7.0
    assert table["no_relay"] is False and table["new_swarm"] is False
    # Without a command: the commands the file or environment set something for.
    assert main(["config", "show"]) == 0
    assert "[serve]" in capsys.readouterr().out


# ---- every flag: the same value by file, by environment or on the command line -------------

# What each command needs on its command line, by the flags that would give it instead.
REQUIRED: dict[str, dict[tuple[str, ...], list[str]]] = {
    "serve": {("model",): ["m"], ("blocks", "num_blocks"): ["--blocks", "0:1"]},
    "node": {},
    "status": {},
}
WORD = st.from_regex(r"[A-Za-z][A-Za-z0-9:._]{0,12}", fullmatch=True)


def flag_cases() -> list[tuple[str, str, argparse.Action]]:
    parser = _parser()
    subs = commands(parser)
    return [(c, key, a) for c in REQUIRED for key, a in flags(subs[c]).items()]


def values_for(action: argparse.Action) -> st.SearchStrategy:
    if action.nargs == 0:
        return st.booleans()
    if action.choices is not None:
        one = st.sampled_from(sorted(action.choices))
    elif action.type is int:
        one = st.integers(0, 10**9)
    elif action.type is float:
        one = st.floats(0, 1e9) | st.integers(0, 10**6)
    elif action.dest in PATH_DESTS:
        one = WORD.map(lambda w: f"/{w}")  # absolute: a relative one is the file's directory's
    else:
        one = WORD
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        return st.lists(one, min_size=1, max_size=3)
    return one


def on_command_line(action: argparse.Action, value: object) -> list[str]:
    opt = action.option_strings[-1] if action.option_strings else None
    if action.nargs == 0:
        return [opt] if value else []  # type: ignore[list-item]
    values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if opt is None:
        return values
    if isinstance(action, argparse._AppendAction):
        return [t for v in values for t in (opt, v)]
    return [opt, *values]


CASES = flag_cases()


@pytest.mark.parametrize(("command", "key", "action"), CASES, ids=[f"{c}-{k}" for c, k, _ in CASES])
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flag_from_file_env_or_command_line_is_the_same(
    command: str, key: str, action: argparse.Action, data, tmp_path_factory
) -> None:
    """For each flag of serve, node and status and any value of its type, the file's key, the
    PETALD_ variable and the flag give the same parsed value. Catches: a type not converted
    like argparse does (ints for a float flag, the elements of a list), a dash/underscore name
    mismatch, a store_false flag inverted."""
    value = data.draw(values_for(action))
    base = [t for k, tokens in REQUIRED[command].items() if action.dest not in k for t in tokens]
    config = tmp_path_factory.mktemp("cfg") / "petald.toml"
    config.write_text(f"[{command}]\n{key} = {toml_value(value)}\n")
    from_file = parse([command, *base], {"PETALD_CONFIG": str(config)})
    from_flag = parse([command, *base, *on_command_line(action, value)], {})
    env_text = " ".join(value) if isinstance(value, list) else json.dumps(value).strip('"')
    from_env = parse([command, *base], {f"PETALD_{key.upper()}": env_text})
    got = getattr(from_flag, action.dest)
    assert getattr(from_file, action.dest) == got == getattr(from_env, action.dest)
