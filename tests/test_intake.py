"""The intake against a hand-driven publisher speaking Core's 3-frame format.

Rules: real ZMQ sockets on ``tcp://127.0.0.1`` with ephemeral ports, every
count exact, a per-test ``trio.fail_after``. The publisher is an ``XPUB`` so
the test can wait until the intake's subscription has reached it (ZMQ drops
whatever is published before). Timed behaviour (staleness) runs on a mock
clock that jumps only after the real sockets have been idle for a moment:
with a threshold of 0, virtual time would race ahead of ZMQ's I/O thread.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import zmq

from oracle.config import Settings
from oracle.decode import Block, parse_block
from oracle.events import (
    EstimateUpdate,
    FeedMessage,
    FeedTrouble,
    HashBlock,
    RawTx,
    SequenceEvent,
    Update,
    WindowEvent,
)
from oracle.intake import CounterTracker, run_intake
from oracle.metrics import Metrics
from oracle.pipeline import run_decoder
from oracle.window import Window, run_window

BLOCKS = Path(__file__).parent / "data" / "blocks"


def _block(height: int) -> Block:
    (path,) = BLOCKS.glob(f"{height}-*.bin")
    return parse_block(path.read_bytes())


@pytest.fixture
def zmq_autojump_clock() -> trio.testing.MockClock:
    """trio's autojump clock, jumping after 50 ms of real idleness."""
    return trio.testing.MockClock(autojump_threshold=0.05)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


class HandPub:
    """An XPUB socket the test drives frame by frame."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.counters: dict[str, int] = {}

    async def wait_subscribed(self, *topics: str) -> None:
        """Wait for a (new) subscription message for each of ``topics``."""
        wanted = {t.encode() for t in topics}
        while wanted:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    continue
                with trio.move_on_after(0.02):
                    await trio.lowlevel.wait_readable(int(self.sock.getsockopt(zmq.FD)))
                continue
            if msg[:1] == b"\x01":
                wanted.discard(msg[1:])

    def frames(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def send(self, topic: str, body: bytes, counter: int | None = None) -> None:
        if counter is None:
            counter = self.counters.get(topic, 0)
        self.counters[topic] = counter + 1
        self.frames(topic.encode(), body, struct.pack("<I", counter))

    def close(self) -> None:
        self.sock.close(linger=0)


@asynccontextmanager
async def _intake(
    pub: HandPub,
    metrics: Metrics,
    *,
    stale_seconds: float = 300.0,
    buffer: int = 1000,
) -> AsyncIterator[trio.MemoryReceiveChannel[FeedMessage]]:
    send, recv = trio.open_memory_channel[FeedMessage](buffer)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_intake(
                {"rawtx": pub.endpoint, "sequence": pub.endpoint},
                send,
                stale_seconds=stale_seconds,
                metrics=metrics,
                task_status=task_status,
            )
        )
        await pub.wait_subscribed("rawtx", "sequence")
        yield recv
        nursery.cancel_scope.cancel()


def test_counter_tracker_gap_restart_and_wrap() -> None:
    c = CounterTracker()
    assert c.check("rawtx", 5) is None  # first message: no expectation
    assert c.check("rawtx", 6) is None
    assert c.check("rawtx", 10) == ("gap", 3)
    assert c.check("sequence", 0) is None  # topics are independent
    assert c.check("rawtx", 0) == ("restart", 0)
    assert c.check("rawtx", 1) is None
    assert c.check("rawtx", 0) == ("restart", 0)  # backwards
    c.expected["rawtx"] = 2**32 - 1
    assert c.check("rawtx", 2**32 - 1) is None
    assert c.check("rawtx", 0) is None  # wrapped
    c.expected["rawtx"] = 2**32 - 2
    assert c.check("rawtx", 3) == ("gap", 5)  # wrapped with a gap
    assert c.check("rawtx", 2) == ("restart", 0)


async def test_counter_gap_is_counted_with_the_exact_lost_count() -> None:
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    try:
        with trio.fail_after(20):
            async with _intake(pub, metrics) as recv:
                for counter in (0, 1, 2, 10, 11, 30):
                    pub.send("rawtx", tx.raw, counter)
                got = [await recv.receive() for _ in range(8)]
    finally:
        pub.close()
        ctx.destroy(linger=0)
    kinds = [
        type(m).__name__ if not isinstance(m, FeedTrouble) else m.kind for m in got
    ]
    assert kinds == ["RawTx", "RawTx", "RawTx", "gap", "RawTx", "RawTx", "gap", "RawTx"]
    gaps = [m for m in got if isinstance(m, FeedTrouble)]
    assert [(g.topic, g.lost, g.detail) for g in gaps] == [
        ("rawtx", 7, "expected=3 got=10 lost=7"),
        ("rawtx", 18, "expected=12 got=30 lost=18"),
    ]
    assert _sample(metrics, "fiatprint_zmq_lost_messages_total", topic="rawtx") == 25
    assert _sample(metrics, "fiatprint_zmq_messages_total", topic="rawtx") == 6
    assert _sample(metrics, "fiatprint_node_restarts_total") == 0


async def test_counter_reset_is_reported_as_a_node_restart() -> None:
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    try:
        with trio.fail_after(20):
            async with _intake(pub, metrics) as recv:
                for counter in (40, 41, 42, 0, 1, 0):
                    pub.send("rawtx", tx.raw, counter)
                # A sequence message's counter is its own: no trouble.
                pub.send("sequence", tx.txid[::-1] + b"A" + bytes(8), 7)
                got = [await recv.receive() for _ in range(9)]
    finally:
        pub.close()
        ctx.destroy(linger=0)
    troubles = [(m.kind, m.topic) for m in got if isinstance(m, FeedTrouble)]
    assert troubles == [("restart", "rawtx"), ("restart", "rawtx")]
    assert isinstance(got[-1], SequenceEvent)
    assert got[-1].hash == tx.txid  # internal order, reversed from the wire
    assert (got[-1].label, got[-1].mempool_seq) == ("A", 0)
    assert _sample(metrics, "fiatprint_node_restarts_total") == 2
    assert _sample(metrics, "fiatprint_zmq_lost_messages_total", topic="rawtx") is None


async def test_truncated_and_garbage_frames_are_counted_by_reason_and_dropped() -> None:
    tx = _block(702861).txs[1]
    txid_wire = tx.txid[::-1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    c = struct.pack("<I", 0)
    try:
        with trio.fail_after(20):
            async with _intake(pub, metrics) as recv:
                pub.frames(b"rawtx", tx.raw)  # two frames
                pub.frames(b"rawtx", tx.raw, c, b"extra")  # four frames
                pub.frames(b"rawtx")  # one frame
                pub.frames(b"rawtxfoo", tx.raw, c)  # unknown topic
                pub.frames(b"rawtx", tx.raw, b"\0\0\0")  # short counter
                pub.frames(b"rawtx", tx.raw, b"\0\0\0\0\0")  # long counter
                pub.send("sequence", txid_wire[:20])  # short body
                pub.send("sequence", txid_wire + b"A")  # A without its number
                pub.send("sequence", txid_wire + b"C" + bytes(8))  # C with one
                pub.send("sequence", txid_wire + b"X")  # bad label
                pub.send("sequence", txid_wire + b"R" + struct.pack("<Q", 9))
                pub.send("rawtx", tx.raw[:-7])  # decodes badly, later
                pub.send("rawtx", tx.raw)
                got = [await recv.receive() for _ in range(3)]
                # The survivors, in order; and nothing else queued.
                assert recv.statistics().current_buffer_used == 0
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert isinstance(got[0], SequenceEvent)
    assert (got[0].label, got[0].mempool_seq, got[0].hash) == ("R", 9, tx.txid)
    assert isinstance(got[1], RawTx) and got[1].body == tx.raw[:-7]
    assert isinstance(got[2], RawTx) and got[2].body == tx.raw
    reasons = {
        r: _sample(metrics, "fiatprint_decode_errors_total", reason=r)
        for r in (
            "frame_count",
            "topic",
            "counter",
            "sequence_body",
            "sequence_label",
        )
    }
    assert reasons == {
        "frame_count": 3,
        "topic": 1,
        "counter": 2,
        "sequence_body": 3,
        "sequence_label": 1,
    }
    # The malformed sequence bodies still carried counters 0..4 in order,
    # then R was 5: no gap was reported.
    assert (
        _sample(metrics, "fiatprint_zmq_lost_messages_total", topic="sequence") is None
    )


async def test_silent_feed_is_reconnected_and_read_again(
    zmq_autojump_clock: trio.testing.MockClock,
) -> None:
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    try:
        with trio.fail_after(3600):
            async with _intake(pub, metrics, stale_seconds=300.0) as recv:
                pub.send("rawtx", tx.raw)
                first = await recv.receive()
                start = trio.current_time()
                # Nothing for a while: the intake replaces its socket.
                stale = [await recv.receive(), await recv.receive()]
                waited = trio.current_time() - start
                await pub.wait_subscribed("rawtx", "sequence")
                pub.send("rawtx", tx.raw)
                again = await recv.receive()
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert isinstance(first, RawTx) and isinstance(again, RawTx)
    assert sorted((m.kind, m.topic) for m in stale if isinstance(m, FeedTrouble)) == [
        ("stale", "rawtx"),
        ("stale", "sequence"),
    ]
    assert 300.0 <= waited < 301.0
    assert _sample(metrics, "fiatprint_zmq_reconnects_total") == 1
    # The counter carried on across the reconnect (1 after 0): no gap.
    assert _sample(metrics, "fiatprint_zmq_lost_messages_total", topic="rawtx") is None


async def test_publisher_that_stops_and_returns_on_the_same_port_is_read_again() -> (
    None
):
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    endpoint = pub.endpoint
    try:
        with trio.fail_after(20):
            async with _intake(pub, metrics) as recv:
                for _ in range(3):
                    pub.send("rawtx", tx.raw)
                before = [await recv.receive() for _ in range(3)]
                pub.close()
                # The node restarts: a new socket on the same port, counters
                # from 0. Binding may fail for a moment while the old socket's
                # close completes.
                while True:
                    try:
                        pub = HandPub(ctx, endpoint)
                        break
                    except zmq.ZMQError:
                        await trio.sleep(0.05)
                await pub.wait_subscribed("rawtx", "sequence")
                pub.send("rawtx", tx.raw)
                after = [await recv.receive(), await recv.receive()]
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert all(isinstance(m, RawTx) for m in before)
    assert isinstance(after[0], FeedTrouble) and after[0].kind == "restart"
    assert isinstance(after[1], RawTx) and after[1].body == tx.raw
    assert _sample(metrics, "fiatprint_node_restarts_total") == 1


async def test_duplicates_count_once_and_r_removes_outputs_through_the_pipeline() -> (
    None
):
    block = _block(702861)
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    settings = Settings(window_seconds=1e12, estimate_interval=0.01)
    feed_send, feed_recv = trio.open_memory_channel[FeedMessage](4096)
    ev_send, ev_recv = trio.open_memory_channel[WindowEvent](1024)
    up_send, up_recv = trio.open_memory_channel[Update](256)

    async def outputs_reach(n: int) -> EstimateUpdate:
        async for u in up_recv:
            if isinstance(u, EstimateUpdate) and u.window_outputs == n:
                return u
        raise AssertionError("updates ended")

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: run_intake(
                        {"rawtx": pub.endpoint, "sequence": pub.endpoint},
                        feed_send,
                        metrics=metrics,
                        task_status=task_status,
                    )
                )
                await nursery.start(
                    lambda task_status: run_decoder(
                        feed_recv, ev_send, metrics=metrics, task_status=task_status
                    )
                )
                window = await nursery.start(
                    lambda task_status: run_window(
                        ev_recv,
                        up_send,
                        settings=settings,
                        metrics=metrics,
                        task_status=task_status,
                    )
                )
                assert isinstance(window, Window)
                await pub.wait_subscribed("rawtx", "sequence")
                # The first 100 transactions, each published twice (mempool,
                # then block), plus one garbage body.
                for tx in block.txs[:100]:
                    pub.send("rawtx", tx.raw)
                pub.send("rawtx", b"\x02\x00\x00\x00garbage")
                for tx in block.txs[:100]:
                    pub.send("rawtx", tx.raw)
                first = await outputs_reach(100)
                # sequence R for transaction 1 removes its two outputs (of 100).
                assert window.kept_sats(block.txs[1].txid) != ()
                pub.send("sequence", block.txs[1].txid[::-1] + b"R" + bytes(8))
                second = await outputs_reach(98)
                nursery.cancel_scope.cancel()
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert first.window_outputs == 100 and second.window_outputs == 98
    assert block.txs[1].txid not in window
    assert _sample(metrics, "fiatprint_zmq_messages_total", topic="rawtx") == 201
    assert _sample(metrics, "fiatprint_decode_errors_total", reason="tx_limits") == 1


async def test_topics_on_different_endpoints_and_hashblock() -> None:
    block = _block(702861)
    tx = block.txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub_tx = HandPub(ctx, "tcp://127.0.0.1:0")
    pub_seq = HandPub(ctx, "tcp://127.0.0.1:0")
    send, recv = trio.open_memory_channel[FeedMessage](100)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                feed = await nursery.start(
                    lambda task_status: run_intake(
                        {
                            "rawtx": pub_tx.endpoint,
                            "sequence": pub_seq.endpoint,
                            "hashblock": pub_seq.endpoint,
                        },
                        send,
                        metrics=metrics,
                        task_status=task_status,
                    )
                )
                assert feed == {
                    "rawtx": pub_tx.endpoint,
                    "sequence": pub_seq.endpoint,
                    "hashblock": pub_seq.endpoint,
                }
                await pub_tx.wait_subscribed("rawtx")
                await pub_seq.wait_subscribed("sequence", "hashblock")
                wire_hash = block.header.hash[::-1]
                pub_seq.send("hashblock", wire_hash[:31])  # short hash
                pub_seq.send("sequence", wire_hash + b"C")
                pub_seq.send("hashblock", wire_hash)
                got_seq = [await recv.receive() for _ in range(2)]
                pub_tx.send("rawtx", tx.raw)
                got_tx = await recv.receive()
                nursery.cancel_scope.cancel()
    finally:
        pub_tx.close()
        pub_seq.close()
        ctx.destroy(linger=0)
    assert isinstance(got_seq[0], SequenceEvent)
    assert (got_seq[0].label, got_seq[0].hash) == ("C", block.header.hash)
    assert isinstance(got_seq[1], HashBlock) and got_seq[1].hash == block.header.hash
    assert isinstance(got_tx, RawTx) and got_tx.body == tx.raw
    assert _sample(metrics, "fiatprint_decode_errors_total", reason="hash_body") == 1
    assert _sample(metrics, "fiatprint_zmq_messages_total", topic="hashblock") == 2


async def test_a_quiet_socket_is_not_stale_while_the_feed_flows(
    zmq_autojump_clock: trio.testing.MockClock,
) -> None:
    """Staleness is the whole feed's: hashblock (or sequence) on a socket of
    its own may be quiet for minutes while rawtx flows on another."""
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub_tx = HandPub(ctx, "tcp://127.0.0.1:0")
    pub_seq = HandPub(ctx, "tcp://127.0.0.1:0")
    send, recv = trio.open_memory_channel[FeedMessage](100)
    got: list[FeedMessage] = []
    try:
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: run_intake(
                        {"rawtx": pub_tx.endpoint, "sequence": pub_seq.endpoint},
                        send,
                        stale_seconds=300.0,
                        metrics=metrics,
                        task_status=task_status,
                    )
                )
                await pub_tx.wait_subscribed("rawtx")
                await pub_seq.wait_subscribed("sequence")
                start = trio.current_time()
                # rawtx every 100 s for 1000 s; sequence says nothing.
                for _ in range(10):
                    pub_tx.send("rawtx", tx.raw)
                    got.append(await recv.receive())
                    await trio.sleep(100)
                assert _sample(metrics, "fiatprint_zmq_reconnects_total") == 0
                # Now nothing at all: both sockets are replaced, once.
                stale = [await recv.receive(), await recv.receive()]
                waited = trio.current_time() - start
                nursery.cancel_scope.cancel()
    finally:
        pub_tx.close()
        pub_seq.close()
        ctx.destroy(linger=0)
    assert all(isinstance(m, RawTx) for m in got)
    assert sorted((m.kind, m.topic) for m in stale if isinstance(m, FeedTrouble)) == [
        ("stale", "rawtx"),
        ("stale", "sequence"),
    ]
    # The last rawtx came at about 900 s; the feed was stale 300 s later.
    assert 1200.0 <= waited < 1202.0
    assert _sample(metrics, "fiatprint_zmq_reconnects_total") == 1


async def test_a_feed_of_nothing_but_garbage_is_stale(
    zmq_autojump_clock: trio.testing.MockClock,
) -> None:
    # Regression: malformed frames used to count as life, so a publisher
    # sending only garbage kept the feed "ok" and the watchdog pinging.
    tx = _block(702861).txs[1]
    metrics = Metrics()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = HandPub(ctx, "tcp://127.0.0.1:0")
    try:
        with trio.fail_after(3600):
            async with _intake(pub, metrics, stale_seconds=300.0) as recv:
                pub.send("rawtx", tx.raw)
                assert isinstance(await recv.receive(), RawTx)
                start = trio.current_time()
                stale: list[object] = []

                async def garbage() -> None:
                    while True:
                        pub.frames(b"rawtx", b"\x00", b"\x01\x00")  # short counter
                        await trio.sleep(10.0)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(garbage)
                    stale = [await recv.receive(), await recv.receive()]
                    nursery.cancel_scope.cancel()
                waited = trio.current_time() - start
    finally:
        pub.close()
        ctx.destroy(linger=0)
    assert sorted((m.kind, m.topic) for m in stale if isinstance(m, FeedTrouble)) == [
        ("stale", "rawtx"),
        ("stale", "sequence"),
    ]
    assert 300.0 <= waited < 301.0
    assert _sample(metrics, "fiatprint_zmq_reconnects_total") == 1
