"""FanOut: snapshot first, shared frames, skip-ahead for clients that lag.

Rules for this module and the web tests that import its helpers: real
mainnet blocks from ``tests/data/blocks``, exact values, no timed
assertions, and a ``trio.fail_after`` around anything that waits.

Helpers here (``block_updates``, ``BLOCK_702861``...) are imported by
``test_app.py``, ``test_abusive_clients.py`` and ``test_page_chromium.py``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from oracle.decode import parse_block
from oracle.estimate import estimate
from oracle.events import (
    BlockEvent,
    EstimateUpdate,
    Point,
    PointsBatch,
    StatusChange,
)
from oracle.fanout import FanOut, estimate_fields
from oracle.filter import TxFilter
from oracle.metrics import Metrics

DATA = Path(__file__).parent / "data" / "blocks"
BLOCK_702861 = DATA / (
    "702861-000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.bin"
)
BLOCK_818677 = DATA / (
    "818677-000000000000000000020750f322f4e72e99c2f0b9738fb4f46607860bd18c13.bin"
)
PRICE_702861 = 42951.63645734903
PRICE_818677 = 37355.24841240194


@cache
def block_updates(
    path: Path = BLOCK_702861,
) -> tuple[EstimateUpdate, PointsBatch, BlockEvent]:
    """The estimate, the per-output points and the block event that the
    pipeline would send after ``path`` alone filled the window."""
    block = parse_block(path.read_bytes())
    flt = TxFilter()
    amounts: list[float] = []
    owners: list[tuple[str, int]] = []
    for tx in block.txs:
        kept = flt.offer(tx)
        for _vout, sats in kept or ():
            amounts.append(sats / 1e8)
            owners.append((tx.txid_hex, sats))
    est = estimate(np.array(amounts, dtype=np.float64))
    t = float(block.header.time)
    points = tuple(
        Point(
            price=float(p),
            sats=owners[int(i)][1],
            time=t,
            txid=owners[int(i)][0],
            confirmed=True,
        )
        for p, i in zip(est.points, est.point_output, strict=True)
    )
    n = len(amounts)
    update = EstimateUpdate(
        estimate=est,
        time=t,
        window_outputs=n,
        confirmed_outputs=n,
        mempool_outputs=0,
    )
    event = BlockEvent(
        hash=block.hash_hex,
        height=block.bip34_height,
        time=t,
        kind="connected",
        confirmed_txids=len(block.txs),
    )
    return update, PointsBatch(points), event


def estimate_at(update: EstimateUpdate, t: float) -> EstimateUpdate:
    """The same estimate stamped with another time, to tell updates apart."""
    return EstimateUpdate(
        estimate=update.estimate,
        time=t,
        window_outputs=update.window_outputs,
        confirmed_outputs=update.confirmed_outputs,
        mempool_outputs=update.mempool_outputs,
    )


def test_real_block_gives_known_price() -> None:
    update, points, event = block_updates()
    assert update.estimate.price == PRICE_702861
    assert update.estimate.rough_price == 42880
    assert len(points.points) == update.estimate.point_count
    assert event.height == 702861


async def test_first_frame_is_snapshot_with_exact_price() -> None:
    update, points, event = block_updates()
    fan = FanOut()
    fan.publish(update)
    fan.publish(points)
    fan.publish(event)
    with fan.subscribe() as sub:
        with trio.fail_after(5):
            snap = json.loads(await sub.receive())
    assert snap["v"] == 1 and snap["type"] == "snapshot"
    assert snap["seq"] == 3
    assert snap["estimate"]["price"] == PRICE_702861
    assert snap["estimate"]["rough_price"] == 42880
    assert len(snap["points"]) == update.estimate.point_count
    first = points.points[0]
    assert snap["points"][0] == [first.price, first.sats, first.time, first.txid, True]
    assert snap["blocks"][0]["height"] == 702861


async def test_updates_follow_snapshot_in_order_and_frames_are_shared() -> None:
    update, points, event = block_updates()
    fan = FanOut()
    with fan.subscribe() as a, fan.subscribe() as b:
        with trio.fail_after(5):
            assert json.loads(await a.receive())["type"] == "snapshot"
            assert json.loads(await b.receive())["type"] == "snapshot"
            fan.publish(update)
            fan.publish(points)
            fan.publish(StatusChange("zmq", "ok", "rawtx flowing", 1.0))
            frames_a = [await a.receive() for _ in range(3)]
            frames_b = [await b.receive() for _ in range(3)]
    # The very same string object: serialised once for every client.
    assert all(x is y for x, y in zip(frames_a, frames_b, strict=True))
    decoded = [json.loads(f) for f in frames_a]
    assert [d["type"] for d in decoded] == ["estimate", "points", "status"]
    assert [d["seq"] for d in decoded] == [1, 2, 3]
    assert decoded[0] == {"v": 1, "type": "estimate", "seq": 1} | estimate_fields(
        update
    )
    assert decoded[0]["price"] == PRICE_702861
    assert len(decoded[1]["points"]) == update.estimate.point_count


async def test_lagging_client_loses_oldest_points_and_is_told() -> None:
    update, points, _ = block_updates()
    metrics = Metrics()
    fan = FanOut(metrics=metrics, queue_size=4)
    with fan.subscribe() as slow:
        with trio.fail_after(5):
            await slow.receive()  # the initial snapshot
            fan.publish(estimate_at(update, 1.0))
            for i in range(10):
                fan.publish(PointsBatch(points.points[i : i + 1]))
            # Four frames fit: the estimate stays, the oldest points go.
            assert slow.pending == 4
            got = [json.loads(await slow.receive()) for _ in range(5)]
    assert got[0] == {"v": 1, "type": "gap", "dropped": 7, "resync": False}
    assert got[1]["type"] == "estimate" and got[1]["seq"] == 1
    assert [g["seq"] for g in got[2:]] == [9, 10, 11]
    assert [g["points"][0][3] for g in got[2:]] == [p.txid for p in points.points[7:10]]
    assert fan.statistics().dropped == 7
    assert fan.statistics().gaps == 1
    assert metrics.dropped_frames._value.get() == 7


async def test_client_stuck_behind_status_frames_gets_a_fresh_snapshot() -> None:
    fan = FanOut(queue_size=3)
    with fan.subscribe() as slow:
        with trio.fail_after(5):
            await slow.receive()
            for i in range(5):
                fan.publish(StatusChange(f"c{i}", "ok", "", float(i)))
            gap = json.loads(await slow.receive())
            snap = json.loads(await slow.receive())
    # c0..c2 queued, c3 overflowed with nothing droppable: all 4 skipped,
    # c4 is part of the snapshot still to come.
    assert gap == {"v": 1, "type": "gap", "dropped": 4, "resync": True}
    assert snap["type"] == "snapshot" and snap["seq"] == 5
    assert sorted(snap["status"]) == ["c0", "c1", "c2", "c3", "c4"]


async def test_unsent_estimate_is_replaced_by_newer_one() -> None:
    update, _, _ = block_updates()
    fan = FanOut(queue_size=8)
    with fan.subscribe() as sub:
        with trio.fail_after(5):
            await sub.receive()
            fan.publish(estimate_at(update, 1.0))
            fan.publish(StatusChange("zmq", "ok", "", 2.0))
            fan.publish(estimate_at(update, 3.0))
            got = [json.loads(await sub.receive()) for _ in range(2)]
    assert [(g["type"], g["seq"]) for g in got] == [("status", 2), ("estimate", 3)]
    assert got[1]["updated"] == 3.0
    assert sub.dropped == 1


async def test_snapshot_keeps_most_recent_points_only() -> None:
    _, points, _ = block_updates()
    fan = FanOut(max_points=7)
    fan.publish(points)
    snap = json.loads(fan.snapshot_frame())
    assert [p[3] for p in snap["points"]] == [p.txid for p in points.points[-7:]]
    # Cached until the next update.
    assert fan.snapshot_frame() is fan.snapshot_frame()
    assert fan.statistics().snapshots_built == 1


async def test_run_reports_ready_and_ends_subscriptions_with_channel() -> None:
    update, _, _ = block_updates()
    metrics = Metrics()
    fan = FanOut(metrics=metrics)
    send, recv = trio.open_memory_channel[object](4)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(fan.run, recv)
            with fan.subscribe() as sub:
                assert metrics.clients._value.get() == 1
                await sub.receive()
                await send.send(update)
                assert json.loads(await sub.receive())["price"] == PRICE_702861
                await send.aclose()
                with pytest.raises(trio.EndOfChannel):
                    await sub.receive()
    assert metrics.clients._value.get() == 0
    assert fan.statistics().clients == 0


def test_non_finite_values_become_null() -> None:
    fan = FanOut()
    fan.publish(PointsBatch((Point(float("nan"), 1000, 1.0, "ab" * 32, False),)))
    snap = json.loads(fan.snapshot_frame())
    assert snap["points"] == [[None, 1000, 1.0, "ab" * 32, False]]


def test_publish_rejects_other_types() -> None:
    fan = FanOut()
    with pytest.raises(TypeError):
        fan.publish("not an update")  # type: ignore[arg-type]
    assert fan.statistics().seq == 0


async def test_run_logs_and_skips_a_non_update(
    caplog: pytest.LogCaptureFixture,
) -> None:
    update, _, _ = block_updates()
    fan = FanOut()
    send, recv = trio.open_memory_channel[object](4)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(fan.run, recv)
            with fan.subscribe() as sub:
                await sub.receive()
                await send.send("not an update")
                await send.send(update)
                assert json.loads(await sub.receive())["seq"] == 1
                await send.aclose()
    assert "fanout_bad_update type=str" in caplog.text


async def test_run_coalesces_points_per_interval_keeping_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    update, points, _ = block_updates()
    pts = points.points
    fan = FanOut(points_interval=1.0)
    send, recv = trio.open_memory_channel[object](16)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(fan.run, recv)
            with fan.subscribe() as sub:
                await sub.receive()
                for i in range(3):
                    await send.send(PointsBatch(pts[i : i + 1]))
                await trio.sleep(0)
                assert sub.pending == 0  # buffered, not yet sent
                first = json.loads(await sub.receive())  # at the 1 s tick
                await send.send(PointsBatch(pts[3:5]))
                await send.send(update)  # flushes the points before itself
                second = json.loads(await sub.receive())
                third = json.loads(await sub.receive())
                await send.send(PointsBatch(pts[5:6]))
                await send.aclose()  # the end of the channel flushes too
                fourth = json.loads(await sub.receive())
    assert first["type"] == "points" and first["seq"] == 1
    assert [p[3] for p in first["points"]] == [p.txid for p in pts[:3]]
    assert (second["type"], second["seq"], len(second["points"])) == ("points", 2, 2)
    assert (third["type"], third["seq"]) == ("estimate", 3)
    assert (fourth["type"], fourth["seq"], len(fourth["points"])) == ("points", 4, 1)
    assert fan.statistics().points == 6


def test_a_block_announced_again_replaces_its_snapshot_entry() -> None:
    # With RPC a block comes from ZMQ first (no height), then from the full
    # block: the snapshot keeps one entry per hash and kind, the later one.
    from oracle.events import BlockEvent

    fan = FanOut(metrics=Metrics())
    h1, h2 = "11" * 32, "22" * 32
    fan.publish(BlockEvent(h1, None, 1.0, "connected", 10))
    fan.publish(BlockEvent(h2, None, 2.0, "connected", 5))
    fan.publish(BlockEvent(h1, 818677, 3.0, "connected", 3463))
    fan.publish(BlockEvent(h1, 818677, 4.0, "disconnected", 3463))
    blocks = json.loads(fan.snapshot_frame())["blocks"]
    assert [
        (b["hash"], b["height"], b["kind"], b["confirmed_txids"]) for b in blocks
    ] == [
        (h2, None, "connected", 5),
        (h1, 818677, "connected", 3463),
        (h1, 818677, "disconnected", 3463),
    ]
