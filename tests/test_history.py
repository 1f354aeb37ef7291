"""Price history: what is kept, that it survives a restart, and the actor.

Real SQLite files in tmp_path; estimates computed from real mainnet blocks
(702861 alone: 42951.63645734903; 818677 alone: 37355.24841240194).
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import trio

from oracle.decode import parse_block
from oracle.estimate import Estimate, estimate
from oracle.events import (
    BlockEvent,
    EstimateUpdate,
    PointsBatch,
    StatusChange,
    Update,
)
from oracle.filter import TxFilter
from oracle.history import (
    History,
    HistoryError,
    HistoryRow,
    Recorder,
    offer,
    open_history_channel,
    run_history,
)

DATA = Path(__file__).parent / "data" / "blocks"
H702861 = "000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae"
H818677 = "000000000000000000020750f322f4e72e99c2f0b9738fb4f46607860bd18c13"


@functools.cache
def block_estimate(height: int, hash_hex: str) -> Estimate:
    block = parse_block((DATA / f"{height}-{hash_hex}.bin").read_bytes())
    flt = TxFilter()
    amounts = [sats / 1e8 for tx in block.txs for _vout, sats in (flt.offer(tx) or [])]
    return estimate(np.array(amounts, dtype=np.float64))


def est_702861() -> Estimate:
    return block_estimate(702861, H702861)


def est_818677() -> Estimate:
    return block_estimate(818677, H818677)


def update(est: Estimate, t: float) -> EstimateUpdate:
    return EstimateUpdate(
        estimate=est,
        time=t,
        window_outputs=est.outputs,
        confirmed_outputs=est.outputs,
        mempool_outputs=0,
    )


def no_price() -> Estimate:
    return estimate(np.array([], dtype=np.float64))


def connected(hash_hex: str, height: int, t: float) -> BlockEvent:
    return BlockEvent(
        hash=hash_hex, height=height, time=t, kind="connected", confirmed_txids=1
    )


def test_real_blocks_give_the_known_prices() -> None:
    assert est_702861().price == 42951.63645734903
    assert est_702861().rough_price == 42880
    assert est_818677().price == 37355.24841240194
    assert est_818677().rough_price == 37378


def test_recorder_keeps_one_per_minute_and_one_per_block() -> None:
    e = est_702861()
    rec = Recorder(interval=60.0)
    kept = []
    for t in [1000.0, 1001.0, 1059.9, 1060.0, 1061.0, 1200.0]:
        kept.append(rec.consider(update(e, t)))
    assert [r.time if r else None for r in kept] == [
        1000.0, None, None, 1060.0, None, 1200.0,
    ]  # fmt: skip
    assert {r.kind for r in kept if r} == {"timed"}

    assert rec.consider(connected(H818677, 818677, 1201.0)) is None
    assert rec.consider(update(no_price(), 1202.0)) is None  # no price: wait
    row = rec.consider(update(est_818677(), 1203.0))
    assert row == HistoryRow(
        time=1203.0,
        price=37355.24841240194,
        rough_price=37378,
        spread=est_818677().spread,
        outputs=est_818677().outputs,
        window_outputs=est_818677().outputs,
        confirmed_outputs=est_818677().outputs,
        mempool_outputs=0,
        height=818677,
        block_hash=H818677,
        kind="block",
    )
    assert rec.consider(update(e, 1204.0)) is None  # block used, minute not due
    # due minute and pending block make one block row
    rec.consider(connected(H702861, 702861, 1259.0))
    both = rec.consider(update(e, 1260.0))
    assert both is not None and (both.kind, both.height) == ("block", 702861)
    assert rec.consider(update(e, 1300.0)) is None
    assert rec.consider(update(e, 1320.0)) is not None


def test_recorder_forgets_a_block_disconnected_before_its_estimate() -> None:
    rec = Recorder(interval=60.0, last_timed=100.0)
    rec.consider(connected(H702861, 702861, 101.0))
    rec.consider(
        BlockEvent(
            hash=H702861, height=702861, time=102.0, kind="disconnected",
            confirmed_txids=0,
        )
    )  # fmt: skip
    assert rec.consider(update(est_702861(), 103.0)) is None
    # other updates are ignored
    assert rec.consider(PointsBatch(points=())) is None
    assert rec.consider(StatusChange("feed", "stale", "", 104.0)) is None


def test_recorder_writes_again_when_the_clock_goes_back() -> None:
    rec = Recorder(interval=60.0, last_timed=5000.0)
    row = rec.consider(update(est_702861(), 4000.0))
    assert row is not None and row.time == 4000.0


def _rows(n: int) -> list[HistoryRow]:
    e = est_702861()
    rows = []
    for i in range(n):
        r = HistoryRow.from_update(update(e, 1_700_000_000.0 + 60 * i))
        assert r is not None
        rows.append(r)
    return rows


def test_history_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    rows = _rows(5)
    with History(path) as h:
        ids = [h.append_sync(r) for r in rows]
        assert ids == [1, 2, 3, 4, 5]
    with History(path) as h:
        assert h.query_sync() == rows
        assert h.count_sync() == 5
        assert h.latest_sync() == rows[-1]
        assert h.query_sync()[0].price == 42951.63645734903
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    conn.close()


def test_query_range_and_limit(tmp_path: Path) -> None:
    rows = _rows(10)
    t0 = rows[0].time
    with History(tmp_path / "h.sqlite") as h:
        for r in rows:
            h.append_sync(r)
        assert h.query_sync(t0 + 120, t0 + 300) == rows[2:6]
        assert h.query_sync(from_ts=t0 + 481) == rows[9:]
        assert h.query_sync(to_ts=t0 + 59) == rows[:1]
        assert h.query_sync(limit=3) == rows[7:]  # newest three, oldest first
        assert h.query_sync(t0 + 300, t0 + 120) == []
        with pytest.raises(ValueError, match="limit must be 1 to 10000, not 0"):
            h.query_sync(limit=0)
        with pytest.raises(ValueError, match="from and to must be numbers"):
            h.query_sync(float("nan"))


def test_empty_history(tmp_path: Path) -> None:
    with History(tmp_path / "h.sqlite") as h:
        assert h.query_sync() == []
        assert h.latest_sync() is None


def test_open_errors_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(HistoryError) as info:
        History(junk)
    assert str(info.value) == (
        f"history_path: {junk}: cannot open: file is not a database"
    )
    nodir = tmp_path / "missing" / "h.sqlite"
    with pytest.raises(HistoryError) as info:
        History(nodir)
    assert str(info.value) == (
        f"history_path: {nodir}: cannot open: unable to open database file "
        f"(directory {nodir.parent} does not exist)"
    )
    newer = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(HistoryError) as info:
        History(newer)
    assert str(info.value) == (
        f"history_path: {newer}: written by a newer fiatprint "
        "(schema 7, this one knows 1)"
    )


async def test_run_history_stores_what_the_recorder_keeps(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    e1, e2 = est_702861(), est_818677()
    with trio.fail_after(30):
        history = await History.open(path)
        send, recv = open_history_channel()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(run_history, history, recv))
            async with send:
                updates: list[Update] = [
                    update(e1, 100.0),
                    PointsBatch(points=()),
                    update(e1, 130.0),
                    connected(H818677, 818677, 131.0),
                    update(e2, 132.0),
                    update(e2, 161.0),
                ]
                for u in updates:
                    assert offer(send, u, history)
        got = await history.query()
        history.close()
    assert [(r.time, r.kind, r.height, r.price) for r in got] == [
        (100.0, "timed", None, 42951.63645734903),
        (132.0, "block", 818677, 37355.24841240194),
        (161.0, "timed", None, 37355.24841240194),
    ]
    assert history.statistics().rows_written == 3


async def test_run_history_continues_the_minute_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.sqlite"
    with History(path) as h:
        h.append_sync(_rows(1)[0])
    t0 = _rows(1)[0].time
    with trio.fail_after(30):
        history = await History.open(path)
        send, recv = open_history_channel()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(run_history, history, recv))
            async with send:
                offer(send, update(est_702861(), t0 + 30))  # too soon
                offer(send, update(est_702861(), t0 + 60))
        assert [r.time for r in await history.query()] == [t0, t0 + 60]
        history.close()


def test_offer_drops_newest_when_full(tmp_path: Path) -> None:
    send, recv = trio.open_memory_channel(1)
    with History(tmp_path / "h.sqlite") as h:
        assert offer(send, update(est_702861(), 1.0), h)
        assert not offer(send, update(est_702861(), 2.0), h)
        assert offer(send, PointsBatch(points=()), h)  # not for history: ignored
        assert h.statistics().dropped_updates == 1
    assert recv.receive_nowait().time == 1.0


async def test_a_failed_write_is_skipped_and_the_actor_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.sqlite"
    history = await History.open(path)
    # Another connection holds the write lock: inserts fail after busy_timeout.
    # Shorten the wait so the test is quick.
    history._writer.execute("PRAGMA busy_timeout = 10")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    send, recv = open_history_channel()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(run_history, history, recv))
            offer(send, update(est_702861(), 100.0))
            while history.write_errors == 0:
                await trio.sleep(0.01)
            blocker.execute("ROLLBACK")
            offer(send, update(est_702861(), 200.0))
            await send.aclose()
    blocker.close()
    assert [r.time for r in await history.query()] == [200.0]
    assert history.statistics().write_errors == 1
    history.close()
