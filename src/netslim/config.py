"""Run configuration files and the one precedence rule: flags given > --config file > stored > defaults.

A `--config run.toml` file holds the same keys as the command's flags (`batch_size` or
`batch-size`, `sr = true`, `percent = [0.5, 0.7]`, `log = ["tensorboard"]`). The CLI turns
the file into the flag tokens it stands for and places them before the flags typed on the
command line, so argparse checks every value exactly as it checks a flag, and a flag
typed after wins (`config_tokens`). Every run writes the configuration it resolved to
(`config.toml` in its folder), so `--config RUN/config.toml` repeats it.

    values = read_config_file("run.toml")               # {"epochs": 3, "sr": True, ...}
    argv = config_tokens(train_parser, values, "run.toml")   # ["--epochs", "3", "--sr", ...]
    cfg = resolve(defaults, stored, given)               # later layers win; None = not set
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import ConfigError, NetslimError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 installs tomli (pyproject's conditional dependency)
    import tomli as tomllib

__all__ = ["CONFIG_NAME", "resolve", "read_config_file", "dump_toml", "write_config_file", "config_tokens",
           "config_keys"]

CONFIG_NAME = "config.toml"   # the resolved configuration a run writes into its folder


def resolve(*layers: Optional[dict]) -> dict:
    """Merge dicts, later layers winning; a None value (or a None layer) means "not set here".

    The one precedence rule of a run: resolve(defaults, stored, file_and_flags).
    """
    out: dict = {}
    for layer in layers:
        out.update({k: v for k, v in (layer or {}).items() if v is not None})
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """The key/value pairs of a TOML file, keys with dashes made underscores.

    Raises ConfigError (one line) when the file is missing, unreadable or not TOML, or
    when it holds tables: a run configuration is flat, as the flags are.
    """
    from .fileio import check_regular_file

    p = Path(path)
    try:
        check_regular_file(p, "config file")  # a FIFO would block the read forever
    except NetslimError as e:
        raise ConfigError(str(e)) from None
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML ({str(e).splitlines()[0]})") from None
    out: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {p}: [{key}] is a table; write flat keys, as the flags "
                              f"(e.g. {key}_... = ...)")
        out[key.replace("-", "_")] = value
    return out


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float ("1e-05" is TOML)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, key) for v in value) + "]"
    if isinstance(value, os.PathLike):
        return _toml_value(os.fspath(value), key)
    raise TypeError(f"config key {key!r}: cannot write a {type(value).__name__} to TOML")


def dump_toml(values: dict, header: str = "") -> str:
    """Flat `key = value` TOML for str, int, float, bool and lists of them (None values are left
    out: TOML has no null, and an absent key means "the default"). `header` becomes # comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for key, value in values.items():
        if value is None:
            continue
        if not key.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"config key {key!r} is not a bare TOML key")
        lines.append(f"{key} = {_toml_value(value, key)}")
    return "\n".join(lines) + "\n"


def write_config_file(path: str | os.PathLike, values: dict, header: str = "") -> Path:
    """Write `values` as TOML to `path`, atomically. Returns the path."""
    from .fileio import atomic_write_text
    atomic_write_text(Path(path), dump_toml(values, header))
    return Path(path)


# --------------------------------------------------------------------------- keys -> flag tokens

# actions that set a value when their flag is present and take no argument
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                 argparse._AppendConstAction)
# keys no file may set: they are about this invocation, not about the run
_NOT_IN_FILES = ("help", "config", "version")


def _option_keys(action: argparse.Action) -> list[str]:
    """The keys a config file may use for `action`: its dest and its long option names."""
    keys = [action.dest]
    keys += [o.lstrip("-").replace("-", "_") for o in action.option_strings if o.startswith("--")]
    return list(dict.fromkeys(keys))


def config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a config file for `parser`'s command may hold, and the flag it stands for."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_IN_FILES:
            continue
        for key in _option_keys(action):
            out.setdefault(key, action)
    return out


def _scalar_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _tokens_for(key: str, action: argparse.Action, value: Any, source: str) -> list[str]:
    flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    if isinstance(action, _FLAG_ACTIONS):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} = {value!r} is not valid: use true or false")
        # The key names either the value (dest `augment`: false means --no-augment) or the flag
        # itself (`no_augment = true`, `sr = true`, `tensorboard = true`): both set the flag.
        names_flag = key != action.dest or isinstance(action, (argparse._StoreTrueAction,
                                                               argparse._AppendConstAction))
        give = value if names_flag else (value == action.const)
        return [flag] if give else []
    if isinstance(value, bool):  # "true" would reach argparse as the string "True"
        raise ConfigError(f"{source}: {key} = {str(value).lower()} is not valid: {flag} takes a value")
    if isinstance(value, (list, tuple)):
        if not value:  # an empty list: nothing to give (e.g. log = [])
            return []
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *(_scalar_text(v) for v in value)]
        return [flag, ",".join(_scalar_text(v) for v in value)]  # e.g. --batch-sizes 1,64
    return [flag, _scalar_text(value)]


def config_tokens(parser: argparse.ArgumentParser, values: dict, source: str) -> list[str]:
    """The command-line tokens that `values` (read from config file `source`) stand for.

    An unknown key is a ConfigError naming the key and the closest valid one.
    """
    keys = config_keys(parser)
    tokens: list[str] = []
    for key, value in values.items():
        action = keys.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(keys))}"
            raise ConfigError(f"{source}: unknown key {key!r} for {parser.prog}: {hint}")
        given = _tokens_for(key, action, value, source)
        _check_values(key, action, given[1:], source)
        tokens += given
    return tokens


def _check_values(key: str, action: argparse.Action, texts: list[str], source: str) -> None:
    """Check a file's value as argparse would check the flag's, but name the file and the key
    in the error (argparse would blame a flag the user never typed)."""
    for text in texts:
        try:
            value = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {key} = {text}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{source}: {key} = {text!r} is not valid: use one of "
                              f"{', '.join(map(str, action.choices))}")


def find_config_arg(argv: Iterable[str]) -> Optional[str]:
    """The FILE of the last `--config FILE` / `--config=FILE` in argv, or None."""
    found: Optional[str] = None
    items = list(argv)
    for i, tok in enumerate(items):
        if tok == "--config" and i + 1 < len(items):
            found = items[i + 1]
        elif tok.startswith("--config="):
            found = tok.split("=", 1)[1]
    return found
