"""Clients that misbehave cost bounded memory and never hold up the others.

Real hypercorn on 127.0.0.1 port 0. A well-behaved trio-websocket client
paces the test: each round publishes one estimate (the real 702861 estimate
stamped with the round number) and one batch of the block's 2,965 points,
then waits until the good client has both. The good client must see every
estimate, in order; the bad client's queue is measured, not timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

import pytest
import trio
from test_app import receive, running
from test_fanout import block_updates, estimate_at
from trio_websocket import open_websocket_url

import oracle.app
from oracle.fanout import QUEUE_SIZE, FanOut
from oracle.metrics import Metrics


async def open_raw_websocket(url: str) -> trio.SocketStream:
    """A WebSocket handshake by hand, on a socket with a tiny receive buffer,
    returning the stream right after the ``101`` response headers. The caller
    decides whether it ever reads again."""
    host, port = url.split("//", 1)[1].split(":")
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(1)
        assert chunk, "server closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def good_round(
    fan: FanOut, ws: Any, round_no: int, points: Any
) -> tuple[int, float]:
    """Publish one estimate and one points batch; return what the good client
    saw of the estimate (seq, updated)."""
    update, _, _ = block_updates()
    fan.publish(points)
    fan.publish(estimate_at(update, float(round_no)))
    # Parsed without the schema check (test_app validates points frames):
    # validating 2,965 points per round would dominate the test's run time.
    got_points = json.loads(await ws.get_message())
    assert got_points["type"] == "points"
    assert len(got_points["points"]) == len(points.points)
    est = await receive(ws)
    assert est["type"] == "estimate", est["type"]
    return est["seq"], est["updated"]


async def test_client_that_never_reads_is_bounded_and_harmless() -> None:
    _, points, _ = block_updates()
    fan = FanOut(metrics=Metrics())
    rounds = 100
    seen: list[tuple[int, float]] = []
    pending_max = 0
    with trio.fail_after(60):
        async with running(fan) as server:
            stuck = await open_raw_websocket(server.url)
            async with stuck, open_websocket_url(server.ws_url) as good:
                assert (await receive(good))["type"] == "snapshot"
                for i in range(rounds):
                    seen.append(await good_round(fan, good, i, points))
                    pending_max = max(pending_max, fan.statistics().pending_max)
                stats = fan.statistics()
                assert stats.clients == 2
    # Every estimate reached the good client, in order, none skipped.
    assert [t for _, t in seen] == [float(i) for i in range(rounds)]
    assert [s for s, _ in seen] == [2 * i + 2 for i in range(rounds)]
    # The stuck client was skipped ahead instead of queueing: ~30 MB of
    # frames were published to it; its queue filled to QUEUE_SIZE and stayed
    # there, its oldest points frames dropped (all points: the estimate slot
    # keeps one estimate).
    assert pending_max == QUEUE_SIZE
    assert stats.dropped > 0
    assert server.metrics.dropped_frames._value.get() == stats.dropped


async def test_client_that_never_reads_is_disconnected_after_send_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel gives up on a receive window that stays shut (TCP_USER_TIMEOUT).
    monkeypatch.setattr(oracle.app, "SEND_TIMEOUT", 1.0)
    _, points, _ = block_updates()
    fan = FanOut(metrics=Metrics())
    with trio.fail_after(60):
        async with running(fan) as server:
            stuck = await open_raw_websocket(server.url)
            async with stuck, open_websocket_url(server.ws_url) as good:
                await receive(good)
                i = 0
                while fan.statistics().clients == 2:
                    await good_round(fan, good, i, points)
                    i += 1
                    await trio.sleep(0.05)
                # The good client stays connected and served.
                assert fan.statistics().clients == 1
                await good_round(fan, good, i, points)
                assert server.metrics.clients._value.get() == 1


async def read_until_close_frame(stream: trio.SocketStream) -> None:
    """Read server frames until a close frame (opcode 8) or end of stream."""
    buf = b""

    async def need(n: int) -> bool:
        nonlocal buf
        while len(buf) < n:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return False
            buf += chunk
        return True

    while await need(2):
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        head = 2
        if n == 126:
            if not await need(4):
                return
            n, head = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if not await need(10):
                return
            n, head = int.from_bytes(buf[2:10], "big"), 10
        if opcode == 8:
            return
        if not await need(head + n):
            return
        buf = buf[head + n :]


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked WebSocket frame, as a client must send it."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + body


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        (b"definitely not json", "not_json"),
        (b"[" * 4000, "not_json"),
        (b'{"v":1,"type":"ping"}', "rate"),
        (b"A" * 60_000, "too_large"),
    ],
    ids=[
        "not_json",
        "nested_deeper_than_the_decoder",
        "valid_pings_over_rate",
        "too_large",
    ],
)
async def test_junk_flood_closes_only_the_flooder(
    junk: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A flooder that also stops reading is dropped by the kernel after
    # SEND_TIMEOUT; shortened so that path cannot slow the test down.
    monkeypatch.setattr(oracle.app, "SEND_TIMEOUT", 1.0)
    _, points, _ = block_updates()
    fan = FanOut(metrics=Metrics())
    rounds = 40
    seen: list[float] = []
    sent = 0
    one = client_frame(junk)
    with trio.fail_after(60):
        async with running(fan) as server:
            async with open_websocket_url(server.ws_url) as good:
                await receive(good)

                async def flood() -> None:
                    nonlocal sent
                    bad = await open_raw_websocket(server.url)

                    async def until_close_frame(scope: trio.CancelScope) -> None:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await read_until_close_frame(bad)
                        scope.cancel()

                    async with bad, trio.open_nursery() as inner:
                        inner.start_soon(until_close_frame, inner.cancel_scope)
                        try:
                            while True:
                                await bad.send_all(one)
                                sent += 1
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood)
                    for i in range(rounds):
                        seen.append((await good_round(fan, good, i, points))[1])
                        await trio.sleep(0)
                while fan.statistics().clients != 1:
                    await trio.sleep(0.01)
    assert seen == [float(i) for i in range(rounds)]
    # The flooder's connection was closed, and counted once however many
    # messages it had sent before the close reached it.
    assert server.metrics.bad_client_messages._value.get() == 1
    assert sent >= 1
    assert f"ws_bad_client reason={reason}" in caplog.text
    assert fan.statistics().pending_max <= QUEUE_SIZE


async def test_garbage_bytes_instead_of_frames_close_that_socket() -> None:
    update, _, _ = block_updates()
    fan = FanOut(metrics=Metrics())
    with trio.fail_after(30):
        async with running(fan) as server:
            async with open_websocket_url(server.ws_url) as good:
                await receive(good)
                raw = await open_raw_websocket(server.url)
                async with raw:
                    await raw.send_all(b"\xff" * 100_000)
                    # The server hangs up on it: reads end in EOF or a reset.
                    try:
                        while await raw.receive_some(65536):
                            pass
                    except trio.BrokenResourceError:
                        pass
                fan.publish(estimate_at(update, 7.0))
                assert (await receive(good))["updated"] == 7.0
    assert json.loads(fan.snapshot_frame())["estimate"]["updated"] == 7.0
