"""The rolling window: what it holds, what it confirms, what it estimates.

Real mainnet blocks from ``tests/data/blocks``; every count and price is
exact. The actor test runs on trio's autojump clock.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from oracle.config import Settings
from oracle.decode import Block, parse_block
from oracle.estimate import Histogram, estimate
from oracle.events import (
    BlockConnected,
    BlockDisconnected,
    BlockEvent,
    EstimateUpdate,
    PointsBatch,
    RawTx,
    Resync,
    StatusChange,
    TxRemoved,
    Update,
    WindowEvent,
)
from oracle.filter import Reject, TxFilter
from oracle.metrics import Metrics
from oracle.pipeline import to_window_event
from oracle.window import CONFIRM_GRACE, Window, run_window

BLOCKS = Path(__file__).parent / "data" / "blocks"
PRICE_702861 = 42951.63645734903
ROUGH_702861 = 42880


def _block(height: int) -> Block:
    (path,) = BLOCKS.glob(f"{height}-*.bin")
    return parse_block(path.read_bytes())


@pytest.fixture(scope="module")
def b702861() -> Block:
    return _block(702861)


@pytest.fixture(scope="module")
def b818677() -> Block:
    return _block(818677)


def _reference_amounts(block: Block) -> list[float]:
    f = TxFilter()
    amounts: list[float] = []
    for tx in block.txs:
        kept = f.offer(tx)
        if kept:
            amounts.extend(s / 1e8 for _, s in kept)
    return amounts


def _assert_histogram_consistent(w: Window) -> None:
    rebuilt = Histogram.of(w.amounts())
    assert np.array_equal(w.histogram.counts, rebuilt.counts)
    assert w.histogram.total == w.outputs == len(w.amounts())


def test_whole_block_gives_the_known_answer(b702861: Block) -> None:
    w = Window(3 * 3600.0)
    for tx in b702861.txs:
        w.offer(tx, 1000.0)
    assert w.outputs == len(_reference_amounts(b702861)) == 3315
    est = w.estimate()
    assert est.rough_price == ROUGH_702861
    assert est.price == PRICE_702861
    assert est.price == estimate(np.array(_reference_amounts(b702861))).price
    _assert_histogram_consistent(w)


def test_add_remove_expire_keep_histogram_equal_to_rebuilt(
    b702861: Block, b818677: Block
) -> None:
    w = Window(100.0)
    # 702861 arrives over t = 0..24.99, 818677 over t = 100..134.62.
    for i, tx in enumerate(b702861.txs):
        w.offer(tx, i / 100)
    for i, tx in enumerate(b818677.txs):
        w.offer(tx, 100 + i / 100)
    assert w.outputs == 3315 + 2157
    _assert_histogram_consistent(w)
    # sequence R for every tenth transaction of 818677.
    removed = sum(w.remove(tx.txid) for tx in b818677.txs[::10])
    assert removed == 3315 + 2157 - w.outputs
    assert w.remove(b818677.txs[0].txid) == 0  # already gone
    _assert_histogram_consistent(w)
    # At t = 112.5, the transactions of 702861 that arrived before 12.5 go.
    gone = w.expire(112.5)
    assert gone == 1250
    _assert_histogram_consistent(w)
    # All of 702861 has gone by t = 125: only 818677's survivors remain.
    w.expire(125.0)
    assert all(tx.txid not in w for tx in b702861.txs)
    survivors = [tx for i, tx in enumerate(b818677.txs) if i % 10]
    assert len(w) == len(survivors)
    _assert_histogram_consistent(w)
    w.expire(1000.0)
    assert len(w) == 0 and w.outputs == 0 and w.histogram.total == 0


def test_duplicate_rawtx_counts_once(b702861: Block) -> None:
    w = Window(3600.0)
    for tx in b702861.txs:
        w.offer(tx, 1.0)
    version = w.version
    for tx in b702861.txs:
        assert w.offer(tx, 2.0) == (False, None)
    assert w.outputs == 3315
    assert w.version == version
    _assert_histogram_consistent(w)


def test_same_window_parent_rule(b702861: Block) -> None:
    txs = b702861.txs
    # Transaction 55 spends 54; both pass every other rule.
    assert txs[55].inputs[0].prev_txid == txs[54].txid or any(
        i.prev_txid == txs[54].txid for i in txs[55].inputs
    )
    w = Window(10.0)
    assert w.offer(txs[54], 0.0) == (True, None)
    assert w.offer(txs[55], 1.0) == (True, Reject.SAME_WINDOW)
    assert w.kept_sats(txs[55].txid) == ()
    # 122 has three outputs (rejected), yet spending it still disqualifies 123.
    assert w.offer(txs[122], 1.0) == (True, Reject.OUTPUTS)
    assert w.offer(txs[123], 1.0) == (True, Reject.SAME_WINDOW)
    assert w.rejected == {Reject.SAME_WINDOW: 2, Reject.OUTPUTS: 1}
    # Once the parent has left the window, a child arriving later counts.
    w2 = Window(10.0)
    w2.offer(txs[54], 0.0)
    assert w2.expire(10.5) == 1
    assert w2.offer(txs[55], 10.5) == (True, None)
    assert len(w2.kept_sats(txs[55].txid)) == 2


def test_confirmation_from_zmq_repeats_and_first_sightings(b702861: Block) -> None:
    txs = b702861.txs
    w = Window(3600.0)
    # Mempool: transactions 1..99 arrive with sequence A; 100..199 too,
    # but they will not be in "the block".
    for tx in txs[1:200]:
        w.offer(tx, 1.0)
        w.announce(tx.txid, 1.0)
    connect = Window.connect
    # An earlier C clears what came before.
    assert connect(w, b"\x01" * 32, 1.5) == 0
    # The block announcement, after the earlier C's grace for late repeats:
    # every block tx's rawtx again (repeats for 1..99), plus coinbase and
    # 200..299 never seen in the mempool.
    later = 1.5 + CONFIRM_GRACE + 0.5
    block_txs = [txs[0], *txs[1:100], *txs[200:300]]
    for tx in block_txs:
        w.offer(tx, later)
    # A mempool transaction arriving during the burst, announced with A.
    w.offer(txs[300], later)
    w.announce(txs[300].txid, later)
    n = w.connect(b"\x02" * 32, later + 0.5, height=702861)
    assert n == len(block_txs) == 200
    assert all(w.is_confirmed(tx.txid) for tx in block_txs)
    assert not any(w.is_confirmed(tx.txid) for tx in txs[100:200])
    assert not w.is_confirmed(txs[300].txid)
    confirmed = sum(len(w.kept_sats(tx.txid)) for tx in block_txs)
    assert w.confirmed_outputs == confirmed
    assert w.mempool_outputs == w.outputs - confirmed
    assert w.block_height(b"\x02" * 32) == 702861
    # D returns them to the mempool.
    assert w.disconnect(b"\x02" * 32) == 200
    assert w.confirmed_outputs == 0
    assert not any(w.is_confirmed(tx.txid) for tx in block_txs)
    assert w.disconnect(b"\x02" * 32) == 0


def test_confirmation_by_full_block_corrects_and_completes(b702861: Block) -> None:
    txs = b702861.txs
    block_hash = b702861.header.hash
    w = Window(1e12)
    # The window saw half the block in the mempool and one unrelated tx
    # whose A was lost, so ZMQ inference wrongly confirms it.
    other = _block(818677).txs[5]
    for tx in txs[1:1250]:
        w.offer(tx, 1e9)
        w.announce(tx.txid, 1e9)
    w.offer(other, 1e9)
    for tx in txs[1:1250]:
        w.offer(tx, 1e9)
    assert w.connect(block_hash, 1e9 + 1) == 1250
    assert w.is_confirmed(other.txid)
    # The full block from RPC: exactly its txids, the missing half added.
    n = w.connect(block_hash, 1e9 + 2, block=b702861)
    assert n == len(txs) == 2500
    assert not w.is_confirmed(other.txid)
    assert all(w.is_confirmed(tx.txid) for tx in txs)
    assert w.block_height(block_hash) == 702861
    other_outputs = len(w.kept_sats(other.txid))
    assert w.outputs == 3315 + other_outputs
    assert w.confirmed_outputs == 3315
    # The same answer as the method over the block alone, plus one tx.
    _assert_histogram_consistent(w)


def test_full_block_older_than_window_ages_out(b702861: Block) -> None:
    w = Window(3 * 3600.0)
    now = b702861.header.time + 4 * 3600.0
    assert w.connect(b702861.header.hash, now, block=b702861) == 2500
    assert w.expire(now) == 2500
    assert w.outputs == 0


def test_remove_and_resync(b702861: Block) -> None:
    w = Window(3600.0)
    for tx in b702861.txs[:100]:
        w.offer(tx, 1.0)
    before = w.outputs
    sats = w.kept_sats(b702861.txs[1].txid)
    assert w.remove(b702861.txs[1].txid) == len(sats) > 0
    assert w.outputs == before - len(sats)
    w.clear()
    assert len(w) == 0 and w.outputs == 0 and w.histogram.total == 0
    # After a resync the same transactions count again.
    assert w.offer(b702861.txs[1], 2.0) == (True, None)


def _events(block: Block, now: float) -> list[WindowEvent]:
    out: list[WindowEvent] = []
    for tx in block.txs:
        ev = to_window_event(RawTx(tx.raw, now))
        assert ev is not None
        out.append(ev)
    return out


async def test_actor_estimates_at_most_once_per_interval_and_only_on_change(
    autojump_clock: trio.testing.MockClock, b702861: Block
) -> None:
    settings = Settings(window_seconds=1e12, estimate_interval=1.0)
    metrics = Metrics()
    ev_send, ev_recv = trio.open_memory_channel[WindowEvent](4096)
    up_send, up_recv = trio.open_memory_channel[Update](256)
    updates: list[Update] = []
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            w = await nursery.start(
                lambda task_status: run_window(
                    ev_recv,
                    up_send,
                    settings=settings,
                    metrics=metrics,
                    clock=trio.current_time,
                    task_status=task_status,
                )
            )
            assert isinstance(w, Window)
            for ev in _events(b702861, 0.0):
                await ev_send.send(ev)
            await ev_send.send(BlockConnected(b702861.header.hash, None, None, 0.0))
            # Nothing changes for 10 seconds: one estimate only.
            await trio.sleep(10.5)
            # An R for a transaction with outputs: one more estimate.
            await ev_send.send(TxRemoved(b702861.txs[1].txid, 10.6))
            await trio.sleep(5)
            await ev_send.send(BlockDisconnected(b702861.header.hash, 15.6))
            await trio.sleep(2)
            await ev_send.send(Resync("test", 17.6))
            await trio.sleep(5)
            await ev_send.aclose()
            async for u in up_recv:
                updates.append(u)
    estimates = [u for u in updates if isinstance(u, EstimateUpdate)]
    assert [e.estimate.price for e in estimates[:1]] == [PRICE_702861]
    assert estimates[0].window_outputs == 3315
    assert estimates[0].confirmed_outputs == 3315
    assert estimates[0].mempool_outputs == 0
    assert estimates[0].time == 1.0
    assert len(estimates) == 4  # block, R, D (state change), resync
    assert [e.time for e in estimates] == [1.0, 11.0, 16.0, 18.0]
    assert estimates[1].window_outputs == 3315 - 2
    assert estimates[2].confirmed_outputs == 0
    assert estimates[3].window_outputs == 0
    assert estimates[3].estimate.price is None
    blocks = [u for u in updates if isinstance(u, BlockEvent)]
    assert [(b.kind, b.height, b.confirmed_txids) for b in blocks] == [
        # The height comes from the coinbase's BIP34 push in the announcement.
        ("connected", 702861, 2500),
        ("disconnected", 702861, 2499),
    ]
    points = [p for u in updates if isinstance(u, PointsBatch) for p in u.points]
    first = estimates[0].estimate.point_count
    assert all(p.confirmed for p in points[:first])
    # The D sends the points of the transactions still in the window again,
    # now in the mempool state (the page moves them back between clouds):
    # all but those of the transaction the R removed.
    removed = {b702861.txs[1].txid[::-1].hex()}
    again = [(p.txid, p.price) for p in points[:first] if p.txid not in removed]
    assert [(p.txid, p.price) for p in points[first:]] == again
    assert not any(p.confirmed for p in points[first:])
    points = points[:first]
    assert math.isclose(
        sorted(p.price for p in points)[len(points) // 2], PRICE_702861, rel_tol=0.05
    )
    statuses = [(s.component, s.status) for s in updates if isinstance(s, StatusChange)]
    assert statuses == [
        ("estimate", "ok"),
        ("window", "resync"),
        ("estimate", "no_data"),
    ]
    reference = TxFilter()
    for tx in b702861.txs:
        reference.offer(tx)
    rejections = {
        r.value: metrics.registry.get_sample_value(
            "fiatprint_filter_rejections_total", {"reason": r.value}
        )
        for r in reference.rejected
    }
    assert rejections == {r.value: float(n) for r, n in reference.rejected.items()}
    assert rejections["same_window"] == 252.0
    assert metrics.registry.get_sample_value("fiatprint_price_usd") == PRICE_702861
    assert (
        metrics.registry.get_sample_value(
            "fiatprint_window_outputs", {"state": "mempool"}
        )
        == 0.0
    )


def test_the_same_block_hash_connecting_again_confirms_each_txid_once():
    # Regression: repeats of one block hash (a looping replay) grew its
    # record by the whole block every time and reset its age.
    from oracle.window import Window

    txs = list(_block(818677).txs[1:40])
    w = Window(span=600.0)
    block_hash = b"\x11" * 32
    for rnd in range(50):
        for tx in txs:
            w.offer(tx, 100.0 + rnd)
        assert w.connect(block_hash, 100.0 + rnd) == len(txs)
    assert len(w._blocks[block_hash].txids) == len(txs)
    assert w._blocks[block_hash].time == 100.0
    w.expire(100.0 + 600.0 + 51)
    assert block_hash not in w._blocks


def test_announcements_without_transactions_expire_on_their_own():
    from oracle.window import Window

    w = Window(span=60.0)
    for i in range(1000):
        w.announce(i.to_bytes(32, "little"), float(i) / 10)
    assert w.expire(50.0) == 0  # no transaction in the window at all
    assert len(w._announced) == 1000  # and no announcement older than 60 s
    assert w.expire(120.0) == 0  # cutoff 60: the 600 A's before t=60 leave
    assert len(w._announced) == 400


def test_repeats_read_after_their_blocks_c_still_confirm_into_it(b702861: Block):
    # rawtx and sequence come on different sockets: the C may be read before
    # the block's rawtx repeats. Repeats within CONFIRM_GRACE join the block;
    # later ones wait for the next C.
    txs = b702861.txs[1:101]
    w = Window(span=3600.0)
    for tx in txs:
        w.announce(tx.txid, 10.0)
        w.offer(tx, 10.0)
    block_hash = b702861.header.hash
    assert w.connect(block_hash, 20.0) == 0  # no repeat read yet
    for tx in txs[:60]:
        w.offer(tx, 20.0 + CONFIRM_GRACE)  # late, within the grace
    for tx in txs[60:]:
        w.offer(tx, 20.0 + CONFIRM_GRACE + 0.5)  # too late for this C
    confirmed = sum(len(w.kept_sats(tx.txid)) for tx in txs[:60])
    assert confirmed > 0
    assert w.confirmed_outputs == confirmed
    assert w._blocks[block_hash].txids == [tx.txid for tx in txs[:60]]
    # The next C takes the ones that were too late for this one.
    assert w.connect(b"\x22" * 32, 30.0) == 40


async def test_late_repeats_resend_the_block_event_with_the_final_count(
    autojump_clock: trio.testing.MockClock, b702861: Block
) -> None:
    from oracle.events import TxAnnounced, TxSeen

    txs = b702861.txs[1:101]
    settings = Settings(window_seconds=3600.0, estimate_interval=1.0)
    ev_send, ev_recv = trio.open_memory_channel[WindowEvent](4096)
    up_send, up_recv = trio.open_memory_channel[Update](4096)
    updates: list[Update] = []
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_window(
                    ev_recv,
                    up_send,
                    settings=settings,
                    clock=trio.current_time,
                    task_status=task_status,
                )
            )
            for tx in txs:
                await ev_send.send(TxAnnounced(tx.txid, None, 0.0))
                await ev_send.send(TxSeen(tx, 0.0))
            await trio.sleep(2.0)
            # The C is read before the repeats (they come on another socket).
            await ev_send.send(BlockConnected(b702861.header.hash, None, None, 2.0))
            for tx in txs:
                await ev_send.send(TxSeen(tx, 3.0))
            await trio.sleep(3.0)
            await ev_send.aclose()
            async for u in up_recv:
                updates.append(u)
    blocks = [
        (b.hash, b.confirmed_txids, b.time)
        for b in updates
        if isinstance(b, BlockEvent)
    ]
    assert blocks == [
        (b702861.hash_hex, 0, 2.0),
        (b702861.hash_hex, 100, 2.0),
    ]


def test_a_block_known_from_zmq_takes_its_height_from_the_coinbase(b702861: Block):
    w = Window(span=3600.0)
    for tx in b702861.txs[:50]:
        w.offer(tx, 1.0)
    w.connect(b702861.header.hash, 2.0)
    assert w.block_height(b702861.header.hash) == 702861
    # The coinbase read after the C (another socket) still names the block.
    w2 = Window(span=3600.0)
    w2.connect(b702861.header.hash, 2.0)
    assert w2.block_height(b702861.header.hash) is None
    w2.offer(b702861.txs[0], 3.0)
    assert w2.block_height(b702861.header.hash) == 702861
    # A coinbase seen long after the C belongs to the next block.
    w3 = Window(span=3600.0)
    w3.connect(b702861.header.hash, 2.0)
    w3.offer(b702861.txs[0], 2.0 + CONFIRM_GRACE + 1.0)
    assert w3.block_height(b702861.header.hash) is None
    w3.connect(b"\x33" * 32, 600.0)
    assert w3.block_height(b"\x33" * 32) == 702861
