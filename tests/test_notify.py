"""systemd notifications: exact datagrams on a socket the test listens on.

Rules: real unix datagram sockets (a path in tmp_path, or an abstract name),
trio's autojump clock for the watchdog cadence, a timeout on every test.
"""

from __future__ import annotations

import os
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from oracle.notify import (
    UNHEALTHY_STATUS,
    Notifier,
    run_watchdog,
    watchdog_interval,
)


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def notify_path(tmp_path: Path):
    path = tmp_path / "notify"
    sock = _listener(str(path))
    yield str(path), sock
    sock.close()


def test_messages_on_a_path_socket(notify_path) -> None:
    path, sock = notify_path
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready(status="serving http://127.0.0.1:8080/")
    assert n.status("two\nlines")
    assert n.watchdog()
    assert n.stopping()
    assert _drain(sock) == [
        b"READY=1\nSTATUS=serving http://127.0.0.1:8080/",
        b"STATUS=two lines",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]
    assert n.last_status == "two lines"
    n.close()


def test_abstract_socket_name() -> None:
    name = f"fiatprint-test-{os.getpid()}-{id(object())}"
    sock = _listener(b"\0" + name.encode())
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _drain(sock) == [b"READY=1"]
        n.close()
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()


def test_unsupported_address_disables() -> None:
    n = Notifier("vsock:2:1234")
    assert not n.enabled
    assert not n.ready()


def test_gone_socket_returns_false_and_does_not_raise(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.enabled
    assert not n.ready()
    n.close()


def test_watchdog_interval_from_environment() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


async def test_watchdog_pings_at_half_interval_only_while_healthy(
    notify_path, autojump_clock
) -> None:
    path, sock = notify_path
    notifier = Notifier(path)
    notifier.status("serving")
    _drain(sock)
    healthy = True
    log: list[tuple[float, bytes]] = []

    async def record() -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        while True:
            data = await tsock.recv(4096)
            log.append((trio.current_time(), data))

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            start = trio.current_time()
            await nursery.start(
                partial(
                    run_watchdog,
                    lambda: healthy,
                    notifier=notifier,
                    environ={"WATCHDOG_USEC": "20000000"},
                )
            )
            await trio.sleep(25)  # pings at 0, 10, 20
            healthy = False
            await trio.sleep(30)  # checks at 30, 40, 50: no pings
            healthy = True
            await trio.sleep(20)  # pings at 60, 70
            nursery.cancel_scope.cancel()
    got = [(round(t - start, 6), data) for t, data in log]
    assert got == [
        (0.0, b"WATCHDOG=1"),
        (10.0, b"WATCHDOG=1"),
        (20.0, b"WATCHDOG=1"),
        (30.0, b"STATUS=" + UNHEALTHY_STATUS.encode()),
        (60.0, b"STATUS=serving"),
        (60.0, b"WATCHDOG=1"),
        (70.0, b"WATCHDOG=1"),
    ]
    notifier.close()


async def test_watchdog_health_check_that_raises_counts_as_unhealthy(
    notify_path, autojump_clock
) -> None:
    path, sock = notify_path
    notifier = Notifier(path)

    def broken() -> bool:
        raise RuntimeError("no idea")

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_watchdog, broken, notifier=notifier, interval=5.0)
            )
            await trio.sleep(12)
            nursery.cancel_scope.cancel()
    assert _drain(sock) == [b"STATUS=" + UNHEALTHY_STATUS.encode()]
    notifier.close()


async def test_no_watchdog_configured_returns_at_once(notify_path) -> None:
    path, sock = notify_path
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(run_watchdog, lambda: True, notifier=Notifier(path), environ={})
            )
    assert _drain(sock) == []


# ---------------------------------------------------------------- the real service

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = sorted((ROOT / "tests" / "data" / "blocks").glob("8186*.bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_status(port: int, path: str) -> bytes:
    """The status line of ``GET path`` on 127.0.0.1:port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            .encode()
        )  # fmt: skip
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


async def test_fiatprint_serve_under_systemd_notify(tmp_path: Path) -> None:
    """``fiatprint serve`` as a subprocess with NOTIFY_SOCKET and WATCHDOG_USEC:
    READY=1 arrives when the HTTP port already answers, then WATCHDOG=1 pings
    while the replayed feed flows, then none once the feed has stopped and
    gone stale (the status line says why); SIGTERM brings STOPPING=1 and
    exit status 0."""
    pytest.importorskip("oracle.service")
    from oracle.replay import run_replay

    path = tmp_path / "notify"
    listener = trio.socket.from_stdlib_socket(_listener(str(path)))
    port = _free_port()
    messages: list[bytes] = []
    stopped_pinging = pinged_while_stale = False
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            feed_scope = trio.CancelScope()

            async def feed(task_status: trio.TaskStatus[dict[str, str]]) -> None:
                with feed_scope:
                    await run_replay(
                        BLOCKS,
                        endpoints={
                            "rawtx": "tcp://127.0.0.1:0",
                            "sequence": "tcp://127.0.0.1:0",
                        },
                        rate=500.0,
                        loop=True,
                        task_status=task_status,
                    )

            eps = await nursery.start(feed)
            env = dict(
                os.environ,
                PYTHONPATH=str(ROOT),
                NOTIFY_SOCKET=str(path),
                WATCHDOG_USEC="1000000",
                FIATPRINT_PORT=str(port),
                FIATPRINT_ZMQ_RAWTX=eps["rawtx"],
                FIATPRINT_ZMQ_SEQUENCE=eps["sequence"],
                FIATPRINT_STALE_SECONDS="2",
            )
            for name in ("FIATPRINT_CONFIG", "FIATPRINT_RPC_URL", "WATCHDOG_PID"):
                env.pop(name, None)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "oracle.cli", "serve"], env=env
            )
            try:
                # READY=1 first, and by then the HTTP port answers
                first = await listener.recv(4096)
                assert first.split(b"\n")[0] == b"READY=1", first
                assert await _http_status(port, "/health") in (
                    b"HTTP/1.1 200 ",
                    b"HTTP/1.1 200 OK",
                    b"HTTP/1.1 503 ",
                    b"HTTP/1.1 503 SERVICE UNAVAILABLE",
                )
                # pings while the feed flows
                pings = 0
                while pings < 3:
                    msg = await listener.recv(4096)
                    messages.append(msg)
                    pings += msg == b"WATCHDOG=1"
                # stop the feed: after stale_seconds the pings stop
                feed_scope.cancel()
                with trio.move_on_after(20) as waited:
                    while True:
                        msg = await listener.recv(4096)
                        messages.append(msg)
                        if msg.startswith(b"STATUS=feed unhealthy"):
                            break
                stopped_pinging = not waited.cancelled_caught
                if stopped_pinging:
                    # four ping intervals of silence from the watchdog
                    with trio.move_on_after(2.0):
                        while True:
                            msg = await listener.recv(4096)
                            messages.append(msg)
                            pinged_while_stale |= msg == b"WATCHDOG=1"
                # SIGTERM: STOPPING=1, then a clean exit
                proc.terminate()
                with trio.move_on_after(20):
                    while True:
                        msg = await listener.recv(4096)
                        messages.append(msg)
                        if msg == b"STOPPING=1":
                            break
                with trio.move_on_after(20):
                    await proc.wait()
            finally:
                proc.kill()
                await proc.wait()
    listener.close()
    assert messages[-1] == b"STOPPING=1", messages[-5:]
    assert proc.returncode == 0
    assert stopped_pinging, (
        "watchdog still pinging 20 s after the feed stopped "
        f"(stale_seconds=2): {messages[-5:]}"
    )
    assert not pinged_while_stale, messages
    assert messages.count(b"STATUS=" + UNHEALTHY_STATUS.encode()) == 1
