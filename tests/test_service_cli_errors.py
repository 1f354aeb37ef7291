"""`fiatprint serve` and `fiatprint demo` refuse bad input with one line.

Each case runs the real command in a subprocess: bad flags exit 2, a service
that cannot start (address in use, history file that is not a database)
exits 1, and neither prints a traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def fiatprint(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oracle.cli", *argv, "--log-level", "ERROR"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--rate", "0"],
            "--rate must be a positive number of transactions a second, not 0.0",
        ),
        (
            ["--rate", "nan"],
            "--rate must be a positive number of transactions a second, not nan",
        ),
        (["--window-seconds", "-1"], "--window-seconds must be at least 1, not -1.0"),
        (["--port", "70000"], "--port 70000 is not a port"),
    ],
)
def test_demo_bad_flags_exit_2_with_one_line(argv: list[str], message: str) -> None:
    proc = fiatprint("demo", *argv)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"fiatprint demo: {message}\n",
    )


def test_an_address_in_use_is_one_line_naming_it() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for command in ("serve", "demo"):
            proc = fiatprint(command, "--port", str(port))
            assert proc.returncode == 1
            assert proc.stderr.splitlines()[-1] == (
                f"fiatprint {command}: cannot listen on 127.0.0.1:{port}: the "
                "address is in use (another service, or another Fiatprint, holds "
                "it; choose another with --port)"
            )
            assert "Traceback" not in proc.stderr


def test_a_history_file_that_is_not_a_database_is_one_line(tmp_path) -> None:
    bad = tmp_path / "history.sqlite"
    bad.write_text("not a database, just text\n" * 100)
    proc = fiatprint("serve", "--port", "0", "--history-path", str(bad))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"fiatprint serve: history_path: {bad}: cannot open: file is not a database"
    )


def test_every_config_problem_is_its_own_prefixed_line() -> None:
    proc = fiatprint("serve", "--port", "70000", "--host", "1.2.3.4:80")
    assert proc.returncode == 2
    assert proc.stderr == (
        "fiatprint serve: host: '1.2.3.4:80' is not an IP address or host name "
        "(no port here) (from --host)\n"
        "fiatprint serve: port: 70000 is not a port (from --port)\n"
    )


def test_ctrl_c_stops_the_demo_with_status_130_and_no_traceback() -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "oracle.cli", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell may start background jobs with SIGINT ignored; a user's
        # terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Fiatprint demo: open http://127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
