"""Price history in SQLite: the estimates worth keeping, across restarts.

What is kept (:class:`Recorder`): the first priced estimate after each
connected block (``kind="block"``, with the block's height and hash) and one
priced estimate per ``interval`` seconds, 60 by default (``kind="timed"``).
An estimate that is both becomes one ``block`` row. Estimates without a price
are never stored. That is at most 1,440 timed rows and about 144 block rows a
day, some 200 bytes each: no pruning is done; a year is about 100 MB.

Durability: the database runs in WAL mode with ``synchronous=FULL`` and every
row is its own transaction, so a row is on disk when :meth:`History.append`
returns, and a crash (SIGKILL, power loss) loses at most the row being
written. ``NORMAL`` would survive a process crash too, but may lose the last
commits on power loss; at one row a minute the fsync per row costs nothing,
so ``FULL`` it is.

Threads: SQLite calls block, so the async methods run them in a worker
thread with ``trio.to_thread.run_sync``, one thread at a time for writes and
one for reads (separate connections: WAL lets reads proceed during a write).
The ``*_sync`` methods are for code outside trio (tests, scripts).

Wiring: :func:`run_history` is an actor that reads :data:`~oracle.events.Update`
values from a channel made by :func:`open_history_channel`; producers hand
updates over with :func:`offer`, which never blocks (see there for the full
policy). ``/api/v1/history`` calls :meth:`History.query`.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from .events import BlockEvent, EstimateUpdate, Update
from .logging import RateLimitedLog

__all__ = [
    "HISTORY_CHANNEL_SIZE",
    "MAX_QUERY_LIMIT",
    "SCHEMA_VERSION",
    "History",
    "HistoryError",
    "HistoryRow",
    "HistoryStatistics",
    "Recorder",
    "offer",
    "open_history_channel",
    "run_history",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
#: Most rows one :meth:`History.query` returns.
MAX_QUERY_LIMIT: Final = 10_000
#: Buffer of the channel into :func:`run_history`. Updates that matter arrive
#: about once a second; 64 covers a minute of a stalled disk.
HISTORY_CHANNEL_SIZE: Final = 64

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS estimates (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    price REAL NOT NULL,
    rough_price INTEGER,
    spread REAL,
    outputs INTEGER NOT NULL,
    window_outputs INTEGER NOT NULL,
    confirmed_outputs INTEGER NOT NULL,
    mempool_outputs INTEGER NOT NULL,
    height INTEGER,
    block_hash TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('timed', 'block'))
);
CREATE INDEX IF NOT EXISTS estimates_time ON estimates (time);
"""

_COLUMNS: Final = (
    "time, price, rough_price, spread, outputs, window_outputs, "
    "confirmed_outputs, mempool_outputs, height, block_hash, kind"
)


class HistoryError(Exception):
    """The history database cannot be opened or written.

    The message names the file and what went wrong.
    """


@attrs.frozen
class HistoryRow:
    """One stored estimate. ``time`` is Unix seconds; ``kind`` is ``timed``
    or ``block``; ``height`` and ``block_hash`` (display hex) are set for
    ``block`` rows when known."""

    time: float
    price: float
    rough_price: int | None
    spread: float | None
    outputs: int
    window_outputs: int
    confirmed_outputs: int
    mempool_outputs: int
    height: int | None
    block_hash: str | None
    kind: str

    def to_json(self) -> dict[str, Any]:
        """A dict of plain JSON values, keys as the attribute names."""
        return attrs.asdict(self)

    @classmethod
    def from_update(
        cls, update: EstimateUpdate, *, block: BlockEvent | None = None
    ) -> HistoryRow | None:
        """The row for ``update`` (``block`` row when ``block`` is given);
        None when the estimate has no finite price."""
        est = update.estimate
        if est.price is None or not math.isfinite(est.price):
            return None
        spread = est.spread
        return cls(
            time=float(update.time),
            price=float(est.price),
            rough_price=None if est.rough_price is None else int(est.rough_price),
            spread=None
            if spread is None or not math.isfinite(spread)
            else float(spread),
            outputs=int(est.outputs),
            window_outputs=int(update.window_outputs),
            confirmed_outputs=int(update.confirmed_outputs),
            mempool_outputs=int(update.mempool_outputs),
            height=block.height if block else None,
            block_hash=block.hash if block else None,
            kind="block" if block else "timed",
        )


@attrs.frozen
class HistoryStatistics:
    rows_written: int
    write_errors: int
    dropped_updates: int


@attrs.define
class Recorder:
    """Decides which updates become rows. Pure: no I/O, no clock.

    ``last_timed`` is the time of the last ``timed`` (or combined) row; set
    it from :meth:`History.latest` after a restart so a crash loop does not
    write more than one row per interval.
    """

    interval: float = 60.0
    last_timed: float | None = None
    _pending_block: BlockEvent | None = None

    def consider(self, update: Update) -> HistoryRow | None:
        """Feed one update; returns the row to store, if any.

        A connected block is remembered until the next priced estimate,
        which becomes its ``block`` row; a disconnect of that block before
        then forgets it. A timed row is due when no timed row has been
        written, ``interval`` has passed since the last, or the wall clock
        went backwards.
        """
        if isinstance(update, BlockEvent):
            if update.kind == "connected":
                self._pending_block = update
            elif (
                self._pending_block is not None
                and self._pending_block.hash == update.hash
            ):
                self._pending_block = None
            return None
        if not isinstance(update, EstimateUpdate):
            return None
        last = self.last_timed
        due = last is None or not (last <= update.time < last + self.interval)
        block = self._pending_block
        if block is None and not due:
            return None
        row = HistoryRow.from_update(update, block=block)
        if row is None:
            return None
        self._pending_block = None
        if due:
            self.last_timed = update.time
        return row


def _connect(path: Path, *, write: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=10.0, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        if write:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HistoryError(
                    f"history_path: {path}: cannot use WAL mode (got {mode}); "
                    "put the file on a local file system"
                )
            conn.execute("PRAGMA synchronous = FULL")
        else:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@attrs.define(eq=False)
class History:
    """An open history database. Create with ``History(path)`` (blocking)
    or ``await History.open(path)``; close with :meth:`close` or ``with``.

    The file and its schema are created when missing; the parent directory
    must exist. Opening raises :class:`HistoryError` when the file cannot be
    opened, is not a history database, was written by a newer version, or
    the file system cannot do WAL.
    """

    path: Path = attrs.field(converter=Path)
    _writer: sqlite3.Connection = attrs.field(init=False)
    _reader: sqlite3.Connection = attrs.field(init=False)
    _write_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _read_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _write_limiter: trio.CapacityLimiter = attrs.field(init=False)
    _read_limiter: trio.CapacityLimiter = attrs.field(init=False)
    rows_written: int = attrs.field(init=False, default=0)
    write_errors: int = attrs.field(init=False, default=0)
    dropped_updates: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        try:
            self._writer = _connect(self.path, write=True)
        except sqlite3.Error as e:
            hint = ""
            if not self.path.parent.is_dir():
                hint = f" (directory {self.path.parent} does not exist)"
            raise HistoryError(
                f"history_path: {self.path}: cannot open: {e}{hint}"
            ) from e
        try:
            self._init_schema()
            self._reader = _connect(self.path, write=False)
        except BaseException:
            self._writer.close()
            raise

    def _init_schema(self) -> None:
        conn = self._writer
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HistoryError(
                    f"history_path: {self.path}: written by a newer fiatprint "
                    f"(schema {version}, this one knows {SCHEMA_VERSION})"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            raise HistoryError(
                f"history_path: {self.path}: not a usable history database: {e}"
            ) from e

    @classmethod
    async def open(cls, path: Path | str) -> History:
        """Open in a worker thread; see the class for what it raises."""
        return await trio.to_thread.run_sync(cls, Path(path))

    def close(self) -> None:
        """Close both connections. Idempotent."""
        with self._write_lock:
            self._writer.close()
        with self._read_lock:
            self._reader.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- writing

    def append_sync(self, row: HistoryRow) -> int:
        """Store ``row`` in its own transaction; returns its id.

        On return the row is durable. Raises :class:`HistoryError` when the
        write fails (disk full, file removed, read-only); the database is
        then unchanged.
        """
        values = (
            row.time,
            row.price,
            row.rough_price,
            row.spread,
            row.outputs,
            row.window_outputs,
            row.confirmed_outputs,
            row.mempool_outputs,
            row.height,
            row.block_hash,
            row.kind,
        )
        with self._write_lock:
            try:
                cur = self._writer.execute(
                    f"INSERT INTO estimates ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            except sqlite3.Error as e:
                self.write_errors += 1
                raise HistoryError(
                    f"history_path: {self.path}: write failed: {e}"
                ) from e
            self.rows_written += 1
            return int(cur.lastrowid or 0)

    async def append(self, row: HistoryRow) -> int:
        """:meth:`append_sync` in a worker thread.

        On cancellation the write still completes (the thread is not
        abandoned), then ``Cancelled`` is raised; the row is then stored.
        """
        return await trio.to_thread.run_sync(
            self.append_sync, row, limiter=self._write_limiter
        )

    # ---------------------------------------------------------- reading

    def query_sync(
        self,
        from_ts: float | None = None,
        to_ts: float | None = None,
        limit: int = 1000,
    ) -> list[HistoryRow]:
        """Rows with ``from_ts <= time <= to_ts`` (None: unbounded), oldest
        first. When more than ``limit`` match, the newest ``limit`` of them.

        Raises:
            ValueError: ``limit`` is not between 1 and :data:`MAX_QUERY_LIMIT`
                or a bound is not finite.
            HistoryError: the database cannot be read.
        """
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise ValueError(f"limit must be 1 to {MAX_QUERY_LIMIT}, not {limit}")
        lo = -math.inf if from_ts is None else float(from_ts)
        hi = math.inf if to_ts is None else float(to_ts)
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("from and to must be numbers")
        with self._read_lock:
            try:
                rows = self._reader.execute(
                    f"SELECT {_COLUMNS} FROM estimates "
                    "WHERE time >= ? AND time <= ? "
                    "ORDER BY time DESC, id DESC LIMIT ?",
                    (lo, hi, limit),
                ).fetchall()
            except sqlite3.Error as e:
                raise HistoryError(
                    f"history_path: {self.path}: read failed: {e}"
                ) from e
        rows.reverse()
        return [HistoryRow(*r) for r in rows]

    async def query(
        self,
        from_ts: float | None = None,
        to_ts: float | None = None,
        limit: int = 1000,
    ) -> list[HistoryRow]:
        """:meth:`query_sync` in a worker thread (same arguments, same
        errors). On cancellation the read finishes and is discarded."""
        return await trio.to_thread.run_sync(
            self.query_sync, from_ts, to_ts, limit, limiter=self._read_limiter
        )

    def latest_sync(self) -> HistoryRow | None:
        """The newest row, or None when the history is empty."""
        rows = self.query_sync(limit=1)
        return rows[0] if rows else None

    async def latest(self) -> HistoryRow | None:
        """:meth:`latest_sync` in a worker thread."""
        return await trio.to_thread.run_sync(
            self.latest_sync, limiter=self._read_limiter
        )

    def count_sync(self) -> int:
        """How many rows are stored."""
        with self._read_lock:
            return int(
                self._reader.execute("SELECT count(*) FROM estimates").fetchone()[0]
            )

    def statistics(self) -> HistoryStatistics:
        return HistoryStatistics(
            rows_written=self.rows_written,
            write_errors=self.write_errors,
            dropped_updates=self.dropped_updates,
        )


# ---------------------------------------------------------------- the actor


def open_history_channel() -> tuple[
    trio.MemorySendChannel[Update], trio.MemoryReceiveChannel[Update]
]:
    """The channel into :func:`run_history`, :data:`HISTORY_CHANNEL_SIZE` deep."""
    return trio.open_memory_channel[Update](HISTORY_CHANNEL_SIZE)


def offer(
    channel: trio.MemorySendChannel[Update],
    update: Update,
    history: History | None = None,
) -> bool:
    """Hand ``update`` to :func:`run_history` without ever blocking.

    Only :class:`~oracle.events.EstimateUpdate` and
    :class:`~oracle.events.BlockEvent` are sent; anything else is ignored
    (returns True). Full-buffer policy: drop the newest. When the channel is
    full (the disk has stalled for about a minute) the update is dropped,
    counted in ``history.dropped_updates`` and False is returned; the window
    and the fan-out are never held up by the history. A closed channel
    (history actor gone) also drops and returns False.
    """
    if not isinstance(update, EstimateUpdate | BlockEvent):
        return True
    try:
        channel.send_nowait(update)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        if history is not None:
            history.dropped_updates += 1
        _drop_warning.warning("history_update_dropped", kind=type(update).__name__)
        return False
    return True


_drop_warning = RateLimitedLog(log)


async def run_history(
    history: History,
    updates: trio.MemoryReceiveChannel[Update],
    *,
    interval: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Store the updates worth keeping (see :class:`Recorder`) until
    ``updates`` is closed by every sender, then return.

    Reports ready once the last stored row is read back (so the per-interval
    limit holds across restarts). A failed write is logged
    (``history_write_failed``, once per burst) and the row is skipped; the
    actor carries on. On cancellation a write in progress completes first.
    Does not close ``history``.
    """
    warn = RateLimitedLog(log, clock=trio.current_time)
    latest = await history.latest()
    recorder = Recorder(
        interval=interval,
        last_timed=latest.time if latest is not None else None,
    )
    task_status.started()
    async with updates:
        async for update in updates:
            row = recorder.consider(update)
            if row is None:
                continue
            try:
                await history.append(row)
            except HistoryError as e:
                warn.warning("history_write_failed", path=history.path, error=e)
    warn.flush(force=True)
