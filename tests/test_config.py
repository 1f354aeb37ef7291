"""Settings loading: precedence file < environment < flags, exact errors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from oracle.config import (
    ConfigError,
    Settings,
    add_arguments,
    load_settings,
)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _error(args: argparse.Namespace, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(args, environ)
    return str(info.value)


def test_defaults_without_any_source() -> None:
    assert load_settings(_parse(), {}) == Settings()
    assert load_settings(None, {}) == Settings()


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    cfg = tmp_path / "fiatprint.toml"
    cfg.write_text(
        'port = 1111\nhost = "0.0.0.0"\nstale_seconds = 60\n'
        'history_path = "state/history.sqlite"\n'
    )
    env = {"FIATPRINT_PORT": "2222", "FIATPRINT_STALE_SECONDS": "90.5"}
    s = load_settings(_parse("--config", str(cfg), "--port", "3333"), env)
    assert s.port == 3333
    assert s.stale_seconds == 90.5
    assert s.host == "0.0.0.0"
    # relative paths in the file are relative to the file
    assert s.history_path == tmp_path / "state" / "history.sqlite"
    s = load_settings(_parse("--config", str(cfg)), env)
    assert s.port == 2222
    s = load_settings(_parse("--config", str(cfg)), {})
    assert s.port == 1111
    assert s.stale_seconds == 60.0
    assert isinstance(s.stale_seconds, float)


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('network = "signet"\n')
    s = load_settings(_parse(), {"FIATPRINT_CONFIG": str(cfg)})
    assert s.network == "signet"
    other = tmp_path / "b.toml"
    other.write_text('network = "regtest"\n')
    s = load_settings(_parse("--config", str(other)), {"FIATPRINT_CONFIG": str(cfg)})
    assert s.network == "regtest"


def test_empty_value_unsets_optional_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('zmq_hashblock = "tcp://127.0.0.1:28334"\n')
    args = _parse("--config", str(cfg))
    assert load_settings(args, {}).zmq_hashblock == "tcp://127.0.0.1:28334"
    assert load_settings(args, {"FIATPRINT_ZMQ_HASHBLOCK": ""}).zmq_hashblock is None


def test_bad_port_names_setting_value_and_source(tmp_path: Path) -> None:
    assert (
        _error(_parse(), {"FIATPRINT_PORT": "70000"})
        == "port: 70000 is not a port (from FIATPRINT_PORT)"
    )
    assert _error(_parse("--port", "-1"), {}) == "port: -1 is not a port (from --port)"
    assert (
        _error(_parse("--port", "eighty"), {})
        == "port: 'eighty' is not an integer (from --port)"
    )
    cfg = tmp_path / "p.toml"
    cfg.write_text('port = "8080"\n')
    assert (
        _error(_parse("--config", str(cfg)), {})
        == f"port: '8080' is not an integer (from {cfg})"
    )


def test_a_bad_value_overridden_by_a_flag_is_not_an_error() -> None:
    s = load_settings(_parse("--port", "9000"), {"FIATPRINT_PORT": "x"})
    assert s.port == 9000


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "FIATPRINT_STALE_SECONDS": "0",
        "FIATPRINT_ZMQ_RAWTX": "localhost:28332",
        "FIATPRINT_LOG_FORMAT": "xml",
    }
    assert _error(_parse("--network", "mainnet", "--rpc-url", "127.0.0.1"), env) == (
        "zmq_rawtx: 'localhost:28332' is not a ZMQ endpoint "
        "(want tcp://HOST:PORT or ipc://PATH) (from FIATPRINT_ZMQ_RAWTX)\n"
        "stale_seconds: 0.0 is not a number of seconds >= 0.5 "
        "(from FIATPRINT_STALE_SECONDS)\n"
        "network: 'mainnet' is not one of main, test, testnet4, signet, regtest "
        "(from --network)\n"
        "rpc_url: '127.0.0.1' is not an http:// or https:// URL (from --rpc-url)\n"
        "log_format: 'xml' is not one of text, json (from FIATPRINT_LOG_FORMAT)"
    )


def test_log_level_is_case_insensitive() -> None:
    assert load_settings(_parse("--log-level", "debug"), {}).log_level == "debug"
    assert _error(_parse("--log-level", "loud"), {}) == (
        "log_level: 'loud' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
        "(from --log-level)"
    )


def test_unknown_toml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "u.toml"
    cfg.write_text("prot = 8080\ncolour = 1\n")
    assert _error(_parse("--config", str(cfg)), {}) == (
        f"prot: unknown setting in {cfg} (did you mean port?)\n"
        f"colour: unknown setting in {cfg}"
    )


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert (
        _error(_parse("--config", str(missing)), {})
        == f"config: {missing}: no such file (from --config)"
    )
    assert (
        _error(_parse(), {"FIATPRINT_CONFIG": str(missing)})
        == f"config: {missing}: no such file (from FIATPRINT_CONFIG)"
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    assert _error(_parse("--config", str(broken)), {}) == (
        f"config: {broken}: not valid TOML: Invalid value (at line 1, column 8)"
    )


def test_rpc_user_needs_password_and_password_is_never_shown() -> None:
    assert _error(_parse("--rpc-user", "alice"), {}) == (
        "rpc_password: must be set when rpc_user is (from --rpc-user)"
    )
    s = load_settings(
        _parse("--rpc-user", "alice"), {"FIATPRINT_RPC_PASSWORD": "s3cret"}
    )
    assert s.rpc_password == "s3cret"
    assert "s3cret" not in repr(s)
    assert _error(_parse("--rpc-password", " "), {}) == (
        "rpc_password: must not be empty (from --rpc-password)"
    )


def test_paths_and_floats_from_text(tmp_path: Path) -> None:
    s = load_settings(
        _parse("--history-path", str(tmp_path / "h.sqlite")),
        {"FIATPRINT_WINDOW_SECONDS": "3600", "FIATPRINT_RPC_COOKIE": "~/c"},
    )
    assert s.history_path == tmp_path / "h.sqlite"
    assert s.window_seconds == 3600.0
    assert s.rpc_cookie == Path("~/c").expanduser()


def test_a_field_added_later_is_picked_up_generically(monkeypatch) -> None:
    """A field added to Settings with a type and a default gets a TOML key,
    an environment variable and a flag, with no change to the loader."""
    import attrs

    from oracle import config

    @attrs.frozen
    class Extended(Settings):
        dry_run: bool = False
        max_clients: int = 100
        ratio: float | None = None

    monkeypatch.setattr(config, "Settings", Extended)
    args = _parse("--no-dry-run", "--max-clients", "7")
    s: Any = load_settings(args, {"FIATPRINT_DRY_RUN": "yes", "FIATPRINT_RATIO": "0.5"})
    assert (s.dry_run, s.max_clients, s.ratio) == (False, 7, 0.5)
    s = load_settings(_parse(), {"FIATPRINT_DRY_RUN": "on"})
    assert (s.dry_run, s.max_clients, s.ratio) == (True, 100, None)
    assert _error(_parse(), {"FIATPRINT_DRY_RUN": "maybe"}) == (
        "dry_run: 'maybe' is not true or false (from FIATPRINT_DRY_RUN)"
    )


def test_direct_construction_runs_validators() -> None:
    with pytest.raises(ValueError, match="70000 is not a port"):
        Settings(port=70000)


def test_the_example_deploy_file_loads() -> None:
    cfg = Path(__file__).resolve().parent.parent / "deploy" / "fiatprint.toml"
    s = load_settings(_parse("--config", str(cfg)), {})
    assert s.history_path == Path("/var/lib/fiatprint/history.sqlite")
    assert s.rpc_cookie == Path("/var/lib/bitcoind/.cookie")
    assert (s.zmq_rawtx, s.zmq_sequence, s.zmq_hashblock) == (
        "tcp://127.0.0.1:28332",
        "tcp://127.0.0.1:28333",
        "tcp://127.0.0.1:28334",
    )
    assert (s.host, s.port, s.network) == ("127.0.0.1", 8080, "main")
    # The page ships with the package: the example leaves web_dir unset.
    assert s.web_dir == Settings().web_dir


def test_fiatprint_config_prints_settings_with_sources(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from oracle.cli import main

    cfg = tmp_path / "f.toml"
    cfg.write_text('port = 9000\nrpc_user = "alice"\nrpc_password = "s3cret"\n')
    monkeypatch.setenv("FIATPRINT_STALE_SECONDS", "30")
    assert main(["config", "--config", str(cfg), "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    lines = out.splitlines()
    assert f"port = 9000  # {cfg}" in lines
    assert "stale_seconds = 30.0  # FIATPRINT_STALE_SECONDS" in lines
    assert 'log_format = "json"  # --log-format' in lines
    assert 'host = "127.0.0.1"  # default' in lines
    assert "# rpc_password = (hidden)  # " + str(cfg) in lines
    assert "# zmq_hashblock = (unset)  # default" in lines


def test_fiatprint_config_exits_2_naming_every_problem(monkeypatch, capsys) -> None:
    from oracle.cli import main

    monkeypatch.setenv("FIATPRINT_PORT", "70000")
    assert main(["config", "--host", ""]) == 2
    assert capsys.readouterr().err == (
        "fiatprint: host: must not be empty (from --host)\n"
        "fiatprint: port: 70000 is not a port (from FIATPRINT_PORT)\n"
    )


def test_values_another_parser_already_converted_are_accepted() -> None:
    args = argparse.Namespace(port=9000, stale_seconds=5, history_path=None)
    s = load_settings(args, {"FIATPRINT_HISTORY_PATH": "/x.sqlite"})
    assert (s.port, s.stale_seconds, s.history_path) == (9000, 5.0, None)
    assert _error(argparse.Namespace(port=9.5), {}) == (
        "port: 9.5 has the wrong type (from --port)"
    )
    assert _error(argparse.Namespace(port=True), {}) == (
        "port: True has the wrong type (from --port)"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--host", "0.0.0.0:80"],
            "host: '0.0.0.0:80' is not an IP address or host name (no port here) "
            "(from --host)",
        ),
        (
            ["--host", "not a host"],
            "host: 'not a host' is not an IP address or host name (no port here) "
            "(from --host)",
        ),
        (
            ["--estimate-interval", "1e-300"],
            "estimate_interval: 1e-300 is not a number of seconds >= 0.01 "
            "(from --estimate-interval)",
        ),
        (
            ["--window-seconds", "1e-320"],
            "window_seconds: 1e-320 is not a number of seconds >= 1 "
            "(from --window-seconds)",
        ),
        (
            ["--web-dir", "~nosuchuser-fiatprint/x"],
            "web_dir: '~nosuchuser-fiatprint/x': cannot expand '~' (no such user) "
            "(from --web-dir)",
        ),
    ],
)
def test_values_that_would_fail_later_are_refused_at_load(
    argv: list[str], message: str
) -> None:
    assert _error(_parse(*argv), {}) == message


def test_history_path_naming_a_directory_is_refused(tmp_path: Path) -> None:
    assert _error(_parse("--history-path", str(tmp_path)), {}) == (
        f"history_path: '{tmp_path}' is a directory, not a file (from --history-path)"
    )
    # A file in a directory that does not exist yet is fine at load time:
    # systemd's StateDirectory= creates it when the service starts.
    later = tmp_path / "state" / "history.sqlite"
    assert load_settings(_parse("--history-path", str(later)), {}).history_path == (
        later
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"port = \xff\xfe\n", "not valid TOML: not UTF-8"),
        (
            b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
            "not valid TOML: values nested too deeply",
        ),
    ],
    ids=["not_utf8", "nested"],
)
def test_unreadable_toml_is_one_line(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(content)
    message = _error(_parse("--config", str(cfg)), {})
    assert message == f"config: {cfg}: {problem}"
