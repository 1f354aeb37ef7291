"""Service settings and how they are loaded.

This module holds the one :class:`Settings` value that every part of the
service reads, and :func:`load_settings`, which builds it from three sources
in increasing order of precedence:

1. a TOML file named by ``--config FILE`` or ``FIATPRINT_CONFIG``,
2. environment variables ``FIATPRINT_<FIELD>`` (``FIATPRINT_PORT``),
3. command-line flags ``--field-name`` (``--port``), added to a parser by
   :func:`add_arguments`.

The loader is derived from the attrs fields of :class:`Settings`, so a field
added with a type annotation and a default gets a TOML key, an environment
variable and a flag without further code. Supported field types are ``str``,
``int``, ``float``, ``bool``, :class:`~pathlib.Path`, and any of these or'ed
with ``None``. Each field must also get its line in
``docs/configuration.md`` (a test checks both directions).

A bad value stops start-up with a :class:`ConfigError` whose message names the
setting, the value, what is wrong and where the value came from, for example
``port: 70000 is not a port (from FIATPRINT_PORT)``.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = [
    "ENV_PREFIX",
    "NETWORKS",
    "ConfigError",
    "Settings",
    "add_arguments",
    "env_name",
    "flag_name",
    "format_default",
    "format_settings",
    "load_settings",
    "load_settings_with_sources",
    "run",
    "setting_fields",
]

_HERE = Path(__file__).resolve().parent
# A source checkout (or editable install) has the page in the top-level web/;
# a wheel installs the same files as oracle/web.
_WEB_DIR = _HERE.parent / "web"
if not (_WEB_DIR / "index.html").is_file():
    _WEB_DIR = _HERE / "web"

#: Environment variables for settings are this prefix plus the upper-case name.
ENV_PREFIX: Final = "FIATPRINT_"
#: Names the TOML file; not a setting itself.
CONFIG_ENV: Final = "FIATPRINT_CONFIG"

#: Chain names as Bitcoin Core's ``getblockchaininfo`` reports them.
NETWORKS: Final = ("main", "test", "testnet4", "signet", "regtest")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS: Final = ("text", "json")


class ConfigError(ValueError):
    """The settings cannot be loaded.

    ``str(error)`` is meant for the operator as it is: one line per problem,
    each naming the setting, the value, what is wrong and the source.
    ``problems`` holds the same lines as a tuple.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- validators
#
# Each validator has the attrs signature (instance, attribute, value) and
# raises ValueError whose text completes "<setting>: <text>". The loader calls
# them itself, field by field, so it can say where a bad value came from.


def _finite_positive(_inst: object, _attr: object, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{value!r} is not a positive number of seconds")


def _at_least(minimum: float) -> Callable[..., None]:
    """A finite number of seconds no smaller than ``minimum``."""

    def check(_inst: object, _attr: object, value: float) -> None:
        if not math.isfinite(value) or value < minimum:
            raise ValueError(f"{value!r} is not a number of seconds >= {minimum:g}")

    return check


_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host(_inst: object, _attr: object, value: str) -> None:
    """An IP address or a host name, without a port."""
    if not value.strip():
        raise ValueError("must not be empty")
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) <= 253 and all(_HOST_LABEL.fullmatch(x) for x in labels):
        return
    raise ValueError(f"{value!r} is not an IP address or host name (no port here)")


def _sqlite_path(_inst: object, _attr: object, value: Path | None) -> None:
    """A file path, not a directory. Its directory need not exist yet (systemd's
    StateDirectory= creates it when the service starts); opening the file
    reports a missing one."""
    if value is not None and value.is_dir():
        raise ValueError(f"{str(value)!r} is a directory, not a file")


def _port(_inst: object, _attr: object, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port")


def _non_empty(_inst: object, _attr: object, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")


def _zmq_endpoint(_inst: object, _attr: object, value: str | None) -> None:
    if value is None:
        return
    if value.startswith("tcp://"):
        rest = value[len("tcp://") :]
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            return
    elif value.startswith("ipc://") and len(value) > len("ipc://"):
        return
    raise ValueError(
        f"{value!r} is not a ZMQ endpoint (want tcp://HOST:PORT or ipc://PATH)"
    )


def _http_url(_inst: object, _attr: object, value: str | None) -> None:
    if value is None:
        return
    if value.startswith(("http://", "https://")) and "://" in value:
        if value.split("://", 1)[1].strip("/"):
            return
    raise ValueError(f"{value!r} is not an http:// or https:// URL")


def _one_of(choices: tuple[str, ...], *, fold: bool = False) -> Callable[..., None]:
    def check(_inst: object, _attr: object, value: str) -> None:
        probe = value.upper() if fold else value
        if probe not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")

    return check


def _field(default: Any, help: str, *validators: Callable[..., None], **kw: Any) -> Any:
    return attrs.field(
        default=default,
        validator=list(validators) or None,
        metadata={"help": help},
        **kw,
    )


@attrs.frozen
class Settings:
    """Everything the service can be told. Defaults suit a local mainnet node.

    Constructing a ``Settings`` directly runs the per-field validators (and
    raises ``ValueError`` on a bad value); :func:`load_settings` reports the
    same problems as :class:`ConfigError` with their sources.
    """

    # --- ZMQ feed
    zmq_rawtx: str = _field(
        "tcp://127.0.0.1:28332", "ZMQ endpoint of the node's rawtx", _zmq_endpoint
    )
    zmq_sequence: str = _field(
        "tcp://127.0.0.1:28333", "ZMQ endpoint of the node's sequence", _zmq_endpoint
    )
    zmq_hashblock: str | None = _field(
        None, "ZMQ endpoint of the node's hashblock (optional)", _zmq_endpoint
    )
    stale_seconds: float = _field(
        300.0, "seconds of silence before the feed counts as stale", _at_least(0.5)
    )
    # --- window and estimate
    window_seconds: float = _field(
        3 * 3600.0, "length of the rolling window in seconds", _at_least(1.0)
    )
    estimate_interval: float = _field(
        1.0, "seconds between re-estimates", _at_least(0.01)
    )
    # --- HTTP
    host: str = _field("127.0.0.1", "address the HTTP server binds", _host)
    port: int = _field(8080, "TCP port of the HTTP server (0: any free)", _port)
    web_dir: Path = _field(_WEB_DIR, "directory of the web page")
    # --- RPC (None means: not configured, run from ZMQ alone)
    network: str = _field("main", "the node's chain", _one_of(NETWORKS))
    rpc_url: str | None = _field(None, "the node's JSON-RPC URL", _http_url)
    rpc_user: str | None = _field(None, "RPC user name", _non_empty)
    rpc_password: str | None = _field(None, "RPC password", _non_empty, repr=False)
    rpc_cookie: Path | None = _field(None, "RPC cookie file (user:password)")
    datadir: Path | None = _field(None, "the node's data directory (for .cookie)")
    # --- history
    history_path: Path | None = _field(
        None, "SQLite file for the price history (unset: no history)", _sqlite_path
    )
    history_interval: float = _field(
        60.0, "minimum seconds between timed history rows", _finite_positive
    )
    # --- logging
    log_level: str = _field("INFO", "log level", _one_of(LOG_LEVELS, fold=True))
    log_format: str = _field("text", "log line format", _one_of(LOG_FORMATS))


#: Fields whose values never appear in messages.
_SECRET: Final = frozenset({"rpc_password"})


# ---------------------------------------------------------------- field types


@attrs.frozen
class _Kind:
    base: type
    optional: bool


def _kind(field: attrs.Attribute[Any]) -> _Kind:
    tp = field.type
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"setting {field.name}: unsupported type {tp!r}")
        tp = args[0]
    if tp not in (str, int, float, bool, Path):
        raise TypeError(f"setting {field.name}: unsupported type {tp!r}")
    return _Kind(base=tp, optional=optional)


def setting_fields() -> tuple[attrs.Attribute[Any], ...]:
    """The attrs fields of :class:`Settings`, with types resolved."""
    attrs.resolve_types(Settings)
    return attrs.fields(Settings)


def env_name(name: str) -> str:
    """``port`` -> ``FIATPRINT_PORT``."""
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """``history_path`` -> ``--history-path``."""
    return "--" + name.replace("_", "-")


def format_default(field: attrs.Attribute[Any]) -> str:
    """The default as ``docs/configuration.md`` and ``--help`` show it.

    ``unset`` for None, ``true``/``false`` for booleans, a path inside the
    source tree as ``<install>/...``, anything else as written in TOML
    without quotes.
    """
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        try:
            return "<install>/" + value.relative_to(_HERE.parent).as_posix()
        except ValueError:
            return str(value)
    return str(value)


# ---------------------------------------------------------------- conversion

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _show(name: str, value: object) -> str:
    if name in _SECRET:
        return "(hidden)"
    return repr(value)


def _expand(text: str) -> Path:
    """``Path(text)`` with ``~`` expanded; ValueError for an unknown user."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ValueError(f"{text!r}: cannot expand '~' (no such user)") from None


def _from_text(name: str, kind: _Kind, text: str) -> Any:
    """Convert an environment or flag value; raises ValueError."""
    if kind.optional and text == "":
        return None
    if kind.base is str:
        return text
    if kind.base is Path:
        if not text:
            raise ValueError("must not be empty")
        return _expand(text)
    if kind.base is int:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"{_show(name, text)} is not an integer") from None
    if kind.base is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"{_show(name, text)} is not a number") from None
    folded = text.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise ValueError(f"{_show(name, text)} is not true or false")


def _from_flag(name: str, kind: _Kind, raw: object) -> Any:
    """Convert a flag value: text, a bool from ``--name/--no-name``, or a
    value another parser already converted to the field's type."""
    if isinstance(raw, str):
        return _from_text(name, kind, raw)
    if raw is None and kind.optional:
        return None
    if isinstance(raw, bool) != (kind.base is bool):
        raise ValueError(f"{_show(name, raw)} has the wrong type")
    if kind.base is float and isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, kind.base):
        return raw
    raise ValueError(f"{_show(name, raw)} has the wrong type")


def _from_toml(name: str, kind: _Kind, value: Any, base_dir: Path) -> Any:
    """Convert a TOML value, which must already have the right type."""
    if kind.optional and value == "":
        return None
    base = kind.base
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{_show(name, value)} is not true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{_show(name, value)} is not an integer")
    if base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{_show(name, value)} is not a number")
    if not isinstance(value, str):
        raise ValueError(f"{_show(name, value)} is not a string")
    if base is Path:
        if not value:
            raise ValueError("must not be empty")
        path = _expand(value)
        return path if path.is_absolute() else base_dir / path
    return value


# ---------------------------------------------------------------- argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per setting to ``parser``.

    Flags store under the field name (``args.port``) and only when given, so
    :func:`load_settings` can tell a flag from a default. Values are kept as
    text and checked by :func:`load_settings`, which reports bad ones with
    the flag name; boolean settings get ``--name`` / ``--no-name``.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML settings file (also {CONFIG_ENV})",
    )
    group = parser.add_argument_group(
        "settings",
        "Each also reads FIATPRINT_<NAME> from the environment and <name> from "
        "the TOML file; flags win over the environment, which wins over the "
        "file. An empty value unsets an optional setting.",
    )
    for field in setting_fields():
        kind = _kind(field)
        help_text = field.metadata.get("help", "see docs/configuration.md")
        help_text = f"{help_text} (default: {format_default(field)})"
        if kind.base is bool:
            group.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                flag_name(field.name),
                dest=field.name,
                metavar=field.name.upper(),
                default=argparse.SUPPRESS,
                help=help_text.replace("%", "%%"),
            )


# ---------------------------------------------------------------- loading


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config: {path}: no such file (from {source})"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config: {path}: is a directory (from {source})"]) from None
    except PermissionError:
        raise ConfigError(
            [f"config: {path}: permission denied (from {source})"]
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"config: {path}: not valid TOML: {e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config: {path}: not valid TOML: not UTF-8"]) from None
    except RecursionError:
        raise ConfigError(
            [f"config: {path}: not valid TOML: values nested too deeply"]
        ) from None
    except OSError as e:
        raise ConfigError(
            [f"config: {path}: cannot read: {e.strerror or e} (from {source})"]
        ) from None


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Build :class:`Settings`; see :func:`load_settings_with_sources`."""
    return load_settings_with_sources(args, environ)[0]


def load_settings_with_sources(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Settings, dict[str, str]]:
    """Build :class:`Settings` from the TOML file, environment and flags.

    ``args`` is a namespace from a parser that :func:`add_arguments` filled
    (None: no flags). The TOML file is ``args.config`` if given, else
    ``environ["FIATPRINT_CONFIG"]`` if set, else none. Relative paths in the
    file are taken relative to the file's directory; relative paths from the
    environment or flags relative to the working directory. An empty
    environment or flag value unsets an optional setting.

    Environment variables starting with ``FIATPRINT_`` that name no setting
    are ignored (other tools may share the prefix); unknown keys in the TOML
    file are errors.

    Returns the settings and, for each setting not left at its default,
    where its value came from (the file's path, ``FIATPRINT_X`` or ``--x``).

    Raises:
        ConfigError: naming every bad value (setting, value, what is wrong,
            source), an unknown TOML key, or an unreadable or invalid file.
    """
    fields = {f.name: f for f in setting_fields()}
    kinds = {name: _kind(f) for name, f in fields.items()}
    # name -> (source, converter): the last source given wins.
    winners: dict[str, tuple[str, Callable[[], Any]]] = {}
    problems: list[str] = []

    config_file: str | None = getattr(args, "config", None)
    config_source = "--config"
    if config_file is None and environ.get(CONFIG_ENV):
        config_file, config_source = environ[CONFIG_ENV], CONFIG_ENV
    if config_file is not None:
        try:
            path = _expand(config_file)
        except ValueError as e:
            raise ConfigError([f"config: {e} (from {config_source})"]) from None
        for key, value in _read_toml(path, config_source).items():
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                problems.append(
                    f"{key}: unknown setting in {path}"
                    + (f" (did you mean {hint[0]}?)" if hint else "")
                )
                continue
            winners[key] = (
                str(path),
                functools.partial(_from_toml, key, kinds[key], value, path.parent),
            )

    for name, kind in kinds.items():
        var = env_name(name)
        if var in environ:
            winners[name] = (
                var,
                functools.partial(_from_text, name, kind, environ[var]),
            )
        if args is not None and hasattr(args, name):
            winners[name] = (
                flag_name(name),
                functools.partial(_from_flag, name, kind, getattr(args, name)),
            )

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (source, convert) in winners.items():
        try:
            values[name] = convert()
        except ValueError as e:
            problems.append(f"{name}: {e} (from {source})")
        else:
            sources[name] = source

    for name, value in values.items():
        field = fields[name]
        if value is None and kinds[name].optional:
            continue
        if field.validator is None:
            continue
        try:
            field.validator(None, field, value)
        except ValueError as e:
            problems.append(f"{name}: {e} (from {sources[name]})")

    if not problems:
        problems.extend(_check_combinations(values, sources))
    if problems:
        raise ConfigError(problems)
    return Settings(**values), sources


def _check_combinations(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    user, password = values.get("rpc_user"), values.get("rpc_password")
    if (user is None) != (password is None):
        given, missing = (
            ("rpc_user", "rpc_password") if user is not None else
            ("rpc_password", "rpc_user")
        )  # fmt: skip
        return [f"{missing}: must be set when {given} is (from {sources[given]})"]
    return []


# ---------------------------------------------------------------- fiatprint config


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def format_settings(settings: Settings, sources: Mapping[str, str]) -> str:
    """``settings`` as a TOML file, each line commented with its source.

    Unset settings are commented out; the RPC password is shown as
    ``(hidden)``. The result loads back to the same settings (password and
    unset values aside).
    """
    lines = []
    for field in setting_fields():
        value = getattr(settings, field.name)
        source = sources.get(field.name, "default")
        if value is None:
            lines.append(f"# {field.name} = (unset)  # {source}")
        elif field.name in _SECRET:
            lines.append(f"# {field.name} = (hidden)  # {source}")
        else:
            lines.append(f"{field.name} = {_toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """``fiatprint config``: check the settings and print them as TOML.

    Exit status 0 when they load, 2 (with one ``fiatprint: ...`` line per
    problem on stderr) when they do not.
    """
    try:
        settings, sources = load_settings_with_sources(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"fiatprint: {problem}", file=sys.stderr)
        return 2
    sys.stdout.write(format_settings(settings, sources))
    return 0
