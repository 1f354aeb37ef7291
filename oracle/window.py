"""The rolling window of outputs and the actor that re-estimates from it.

:class:`Window` is pure state (no I/O, no clock of its own): the transactions
of the last ``span`` seconds by arrival time, the method's filter applied in
arrival order, and an :class:`oracle.estimate.Histogram` kept up to date
incrementally. :func:`run_window` is the actor around it: it applies window
events, expires old entries, re-estimates at most once per
``Settings.estimate_interval`` and only when the window changed, and sends
estimates, price points, block events and status changes to the fan-out.

How the window follows the node:

* Every transaction is counted once, by txid. A ``rawtx`` for a txid already
  in the window (the block repeat of a mempool transaction, or a replay) adds
  nothing; it is remembered as a *repeat*.
* The same-window parent rule of the method: a transaction spending an output
  of any transaction in the window (accepted or not) is rejected. Every
  transaction offered joins the window, with or without outputs, and leaves
  it when it expires, after which its children would count again.
* ``sequence R`` removes the transaction and its outputs.
* ``sequence C`` from ZMQ alone: Core publishes the ``rawtx`` of every block
  transaction, then ``C``. The window confirms the txids whose ``rawtx``
  arrived since the previous ``C`` as a repeat, or as a first sighting that
  had no ``sequence A`` (a mempool transaction is announced with ``A``; a
  block transaction the window never saw in the mempool is not). A
  transaction whose ``A`` was lost to a gap can thus be confirmed wrongly
  until the full block corrects it. Because ``rawtx`` and ``sequence``
  usually arrive on different sockets, the ``C`` can be read before the
  repeats; repeats read within ``CONFIRM_GRACE`` seconds after it still
  join that block.
* A :class:`~oracle.events.BlockConnected` that carries the decoded block
  (fetched over RPC) confirms exactly the block's txids, un-confirms any the
  ZMQ inference had wrongly given to that block, and adds the block's
  transactions the window had missed. Their arrival time is the block's
  header time (or the event's time if earlier), so baseline blocks loaded at
  start-up age out when they should; a block whose header time is older than
  the window is therefore dropped by the next expiry.
* ``sequence D`` returns the block's transactions to the mempool state.
* :class:`~oracle.events.Resync` empties the window.

Memory: one small record per transaction in the window (about 40,000 for
three hours of mainnet traffic), the txids of the blocks connected within the
window, and the txids announced with ``A`` within the window.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Final

import attrs
import numpy as np
import trio

from .config import Settings
from .decode import Block, Tx, coinbase_height
from .estimate import Estimate, Histogram, Params, estimate, implied_prices
from .events import (
    BlockConnected,
    BlockDisconnected,
    BlockEvent,
    EstimateUpdate,
    FeedTrouble,
    Point,
    PointsBatch,
    Resync,
    StatusChange,
    TxAnnounced,
    TxRemoved,
    TxSeen,
    Update,
    WindowEvent,
)
from .filter import Reject, kept_outputs, reject_reason
from .logging import RateLimitedLog, kv
from .metrics import Metrics

__all__ = [
    "CONFIRM_GRACE",
    "MAX_POINTS_PER_BATCH",
    "THREAD_THRESHOLD",
    "Window",
    "run_window",
]

log = logging.getLogger(__name__)

#: Points per :class:`~oracle.events.PointsBatch` at most.
MAX_POINTS_PER_BATCH: Final = 2000
#: Windows with more outputs than this are estimated in a worker thread so
#: the event loop (which also serves the web clients) stays responsive.
THREAD_THRESHOLD: Final = 20_000
#: A feed with no gap or restart for this many seconds is reported healthy
#: again (a stale feed is healthy again as soon as a message arrives).
FEED_OK_AFTER: Final = 60.0
#: Seconds after a block connection known from ZMQ alone during which a
#: ``rawtx`` repeat still confirms into that block. Core publishes a block's
#: repeats before its ``sequence C``, but the two topics usually come on
#: different sockets, so the C can be read while thousands of repeats are
#: still queued or being decoded. A repeat is certain (Core publishes a
#: transaction's ``rawtx`` only on mempool entry and in a block), so late
#: ones join the block; a late *first* sighting stays in the mempool state
#: until the full block (over RPC) says otherwise.
CONFIRM_GRACE: Final = 10.0
_NO_SEEN: Final[frozenset[bytes]] = frozenset()


@attrs.define(eq=False, slots=True)
class _Entry:
    time: float
    seq: int
    sats: tuple[int, ...]
    block: bytes | None = None


@attrs.define(eq=False)
class _BlockRecord:
    time: float
    height: int | None
    txids: list[bytes]


def _btc(sats: Iterable[int]) -> np.ndarray:
    return np.fromiter(sats, dtype=np.float64) / 1e8


@attrs.define(eq=False)
class Window:
    """Transactions of the last ``span`` seconds and their outputs' histogram.

    Pure state: every method takes the time it should use. Not thread-safe;
    one task owns a window.

    Attributes:
      span: window length in seconds.
      histogram: counts of the kept outputs now in the window; always equal
        to ``Histogram.of(self.amounts())``.
      outputs, confirmed_outputs: kept outputs in the window, and how many of
        them belong to a connected block.
      rejected: transactions whose outputs are not used, by reason.
      version: increases whenever the set of outputs or their state changes.
    """

    span: float
    histogram: Histogram = attrs.field(factory=Histogram)
    outputs: int = 0
    confirmed_outputs: int = 0
    rejected: Counter[Reject] = attrs.field(factory=Counter)
    version: int = 0
    _entries: dict[bytes, _Entry] = attrs.field(factory=dict)
    _heap: list[tuple[float, int, bytes]] = attrs.field(factory=list)
    _seq: int = 0
    _blocks: dict[bytes, _BlockRecord] = attrs.field(factory=dict)
    _since_c: dict[bytes, bool] = attrs.field(factory=dict)
    _announced: dict[bytes, float] = attrs.field(factory=dict)
    #: The last block connected from ZMQ alone and until when its late
    #: repeats still join it (see CONFIRM_GRACE).
    _late: tuple[bytes, float] | None = None
    #: BIP34 height of the coinbase seen since the last connect, if any.
    _coinbase_height: int | None = None
    _new: list[bytes] = attrs.field(factory=list)

    # ------------------------------------------------------------ queries

    @property
    def mempool_outputs(self) -> int:
        return self.outputs - self.confirmed_outputs

    def __len__(self) -> int:
        """Transactions in the window (with or without kept outputs)."""
        return len(self._entries)

    def __contains__(self, txid: object) -> bool:
        return txid in self._entries

    def is_confirmed(self, txid: bytes) -> bool:
        entry = self._entries.get(txid)
        return entry is not None and entry.block is not None

    def kept_sats(self, txid: bytes) -> tuple[int, ...]:
        """Kept output amounts of ``txid`` (empty when rejected or absent)."""
        entry = self._entries.get(txid)
        return entry.sats if entry is not None else ()

    def amounts(self) -> np.ndarray:
        """Every kept output's amount in BTC, in window order."""
        return _btc(s for e in self._entries.values() for s in e.sats)

    def estimate(self, params: Params | None = None) -> Estimate:
        """Run the method over the window (never raises for lack of data)."""
        return estimate(self.amounts(), self.histogram, params or Params())

    # ------------------------------------------------------------ changes

    def offer(
        self,
        tx: Tx,
        now: float,
        *,
        reject: Reject | None = None,
        kept: tuple[tuple[int, int], ...] | None = None,
    ) -> tuple[bool, Reject | None]:
        """A transaction arrived at ``now`` (mempool, block repeat or block).

        ``reject`` and ``kept`` are the decoder's verdict on the rules that
        need no window state; with ``kept=None`` the window judges them.
        Returns ``(new, reason)``: ``new`` is False for a txid already in the
        window (a repeat: nothing changes but the repeat is remembered for
        the next ``C``); ``reason`` is why a new transaction's outputs are not
        used, or None.
        """
        txid = tx.txid
        entry = self._entries.get(txid)
        if entry is not None:
            late = self._late
            if late is not None and now <= late[1] and entry.block is None:
                # A repeat read after its block's C (see CONFIRM_GRACE).
                self._set_block(txid, entry, late[0])
                record = self._blocks.get(late[0])
                if record is not None:
                    record.txids.append(txid)
            else:
                self._since_c[txid] = True
            return False, None
        if tx.inputs and tx.inputs[0].is_coinbase:
            # A block's coinbase, first seen in its announcement: its BIP34
            # push gives the height a block known from ZMQ alone lacks.
            self._note_coinbase_height(coinbase_height(tx), now)
        if kept is None:
            reject = reject_reason(tx, _NO_SEEN)
            kept = () if reject is not None else tuple(kept_outputs(tx))
        if reject is None:
            entries = self._entries
            for txin in tx.inputs:
                if txin.prev_txid in entries or txin.prev_txid == txid:
                    reject = Reject.SAME_WINDOW
                    break
        sats: tuple[int, ...] = ()
        if reject is not None:
            self.rejected[reject] += 1
        else:
            sats = tuple(s for _, s in kept)
        self._seq += 1
        self._entries[txid] = _Entry(now, self._seq, sats)
        heapq.heappush(self._heap, (now, self._seq, txid))
        self._since_c[txid] = False
        if sats:
            self.histogram.add(_btc(sats))
            self.outputs += len(sats)
            self._new.append(txid)
            self.version += 1
        return True, reject

    def announce(self, txid: bytes, now: float) -> None:
        """``sequence A`` for ``txid``: it is a mempool transaction."""
        # Re-insert so the dict stays in announcement order for expiry.
        self._announced.pop(txid, None)
        self._announced[txid] = now

    def remove(self, txid: bytes) -> int:
        """``sequence R``: drop ``txid``; returns the outputs removed."""
        entry = self._entries.pop(txid, None)
        self._since_c.pop(txid, None)
        self._announced.pop(txid, None)
        if entry is None:
            return 0
        self._drop_outputs(entry)
        return len(entry.sats)

    def connect(
        self,
        block_hash: bytes,
        now: float,
        *,
        block: Block | None = None,
        height: int | None = None,
    ) -> int:
        """A block connected; returns how many window txids it confirmed.

        Without ``block``, confirms what arrived since the previous connect
        (see the module docstring). With it, confirms exactly its txids and
        adds its transactions the window lacks (header time as arrival).
        """
        record = self._blocks.get(block_hash)
        if block is None:
            ids = [
                t
                for t, repeat in self._since_c.items()
                if repeat or t not in self._announced
            ]
            self._since_c.clear()
            if record is not None:
                # The same hash connecting again (a replayed or re-announced
                # block): each txid once, or the record grows with every repeat.
                ids = list(dict.fromkeys(record.txids + ids))
            txids = [t for t in ids if t in self._entries]
        else:
            arrival = min(now, float(block.header.time))
            txids = [tx.txid for tx in block.txs]
            if record is not None:
                keep = set(txids)
                for t in record.txids:
                    entry = self._entries.get(t)
                    if (
                        t not in keep
                        and entry is not None
                        and entry.block == block_hash
                    ):
                        self._set_block(t, entry, None)
            for tx in block.txs:
                if tx.txid not in self._entries:
                    self.offer(tx, arrival)
                self._since_c.pop(tx.txid, None)
            txids = [t for t in txids if t in self._entries]
            if height is None:
                height = block.bip34_height
        for t in txids:
            self._set_block(t, self._entries[t], block_hash)
        if record is not None and height is None:
            height = record.height
        # A repeated connect keeps the first connect's time, so the record
        # still ages out of the window.
        first = record.time if record is not None else now
        self._blocks[block_hash] = _BlockRecord(first, height, txids)
        if block is None:
            self._late = (block_hash, now + CONFIRM_GRACE)
            if height is None:
                self._blocks[block_hash].height = self._coinbase_height
        elif self._late is not None and self._late[0] == block_hash:
            self._late = None
        self._coinbase_height = None
        return len(txids)

    def disconnect(self, block_hash: bytes) -> int:
        """``sequence D``: the block's transactions return to the mempool.

        Returns how many window txids it un-confirmed.
        """
        if self._late is not None and self._late[0] == block_hash:
            self._late = None
        record = self._blocks.pop(block_hash, None)
        if record is None:
            return 0
        n = 0
        for t in record.txids:
            entry = self._entries.get(t)
            if entry is not None and entry.block == block_hash:
                self._set_block(t, entry, None)
                n += 1
        return n

    def _note_coinbase_height(self, height: int | None, now: float) -> None:
        late = self._late
        if late is not None and now <= late[1]:
            record = self._blocks.get(late[0])
            if record is not None and record.height is None:
                record.height = height  # read after its block's C
                return
        self._coinbase_height = height

    def late_block(self) -> tuple[bytes, int, float] | None:
        """The block connected from ZMQ alone that late repeats still join:
        its hash, how many window txids it has confirmed so far, and when it
        connected. None when there is none (or it has left the window)."""
        if self._late is None:
            return None
        record = self._blocks.get(self._late[0])
        if record is None:
            return None
        return self._late[0], len(record.txids), record.time

    def block_height(self, block_hash: bytes) -> int | None:
        record = self._blocks.get(block_hash)
        return record.height if record is not None else None

    def expire(self, now: float) -> int:
        """Forget everything that arrived before ``now - span``.

        Returns how many transactions left. Their txids leave the
        same-window set too, so their children count again.
        """
        cutoff = now - self.span
        heap = self._heap
        n = 0
        while heap and heap[0][0] < cutoff:
            _, seq, txid = heapq.heappop(heap)
            entry = self._entries.get(txid)
            if entry is None or entry.seq != seq:
                continue
            del self._entries[txid]
            self._since_c.pop(txid, None)
            self._drop_outputs(entry)
            n += 1
        # Announcements leave in order of age, whether or not any transaction
        # expired (a flood of A without rawtx must not stay until one does).
        announced = self._announced
        while announced:
            oldest = next(iter(announced))
            if announced[oldest] >= cutoff:
                break
            del announced[oldest]
        if len(self._new) > 2 * len(self._entries) + 1000:
            # Nobody has taken the new outputs for a while (no rough price
            # yet): keep only those still in the window.
            self._new = [t for t in self._new if t in self._entries]
        for h in [h for h, r in self._blocks.items() if r.time < cutoff]:
            del self._blocks[h]
        return n

    def clear(self) -> None:
        """Forget everything (after a resync)."""
        version = self.version
        self.__init__(self.span)  # type: ignore[misc]
        self.version = version + 1

    def take_new(self) -> list[tuple[bytes, float, tuple[int, ...], bool]]:
        """``(txid, arrival, sats, confirmed)`` of transactions with kept
        outputs added since the last call and still in the window."""
        out = []
        for t in dict.fromkeys(self._new):
            entry = self._entries.get(t)
            if entry is not None and entry.sats:
                out.append((t, entry.time, entry.sats, entry.block is not None))
        self._new = []
        return out

    def _set_block(self, txid: bytes, entry: _Entry, block_hash: bytes | None) -> None:
        was = entry.block is not None
        entry.block = block_hash
        now = block_hash is not None
        if was != now and entry.sats:
            self.confirmed_outputs += len(entry.sats) if now else -len(entry.sats)
            self.version += 1
            # Its points are sent again with the new state, so the page moves
            # them between the mempool and confirmed clouds.
            self._new.append(txid)

    def _drop_outputs(self, entry: _Entry) -> None:
        if not entry.sats:
            return
        self.histogram.remove(_btc(entry.sats))
        self.outputs -= len(entry.sats)
        if entry.block is not None:
            self.confirmed_outputs -= len(entry.sats)
        self.version += 1


def points_for(
    new: list[tuple[bytes, float, tuple[int, ...], bool]], rough: int
) -> list[Point]:
    """Per-output price points of ``new`` outputs against ``rough``."""
    if not new:
        return []
    owners = [(t, when, s, c) for t, when, sats, c in new for s in sats]
    prices, idx = implied_prices(_btc(o[2] for o in owners), rough)
    points = []
    for price, i in zip(prices.tolist(), idx.tolist(), strict=True):
        txid, when, sats, confirmed = owners[i]
        points.append(Point(price, sats, when, txid[::-1].hex(), confirmed))
    return points


@attrs.define(eq=False)
class _Actor:
    window: Window
    out: trio.MemorySendChannel[Update]
    metrics: Metrics | None
    clock: Callable[[], float]
    warn: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, key_fields=("kind",))
    )
    estimated_version: int = -1
    rough: int | None = None
    status: str | None = None
    trouble: FeedTrouble | None = None
    trouble_at: float | None = None
    feed_status: str = "ok"
    feed_alive: bool = False
    reported: Counter[Reject] = attrs.field(factory=Counter)
    #: Confirmed-txid count last sent in a BlockEvent, for the latest block.
    block_counts: dict[bytes, tuple[int, int | None]] = attrs.field(factory=dict)

    def _count_rejections(self) -> None:
        """Add the window's new rejections (feed and full blocks alike) to
        ``Metrics.filter_rejections``."""
        if self.metrics is None:
            return
        for reason, n in self.window.rejected.items():
            delta = n - self.reported[reason]
            if delta > 0:
                self.metrics.filter_rejections.labels(reason.value).inc(delta)
                self.reported[reason] = n

    def send(self, update: Update) -> bool:
        """Hand ``update`` to the fan-out without waiting; False if dropped."""
        try:
            self.out.send_nowait(update)
        except trio.WouldBlock:
            self.warn.warning("window_update_dropped", kind=type(update).__name__)
            return False
        return True

    def apply(self, event: WindowEvent) -> None:
        w = self.window
        if isinstance(event, TxSeen):
            kept = event.kept if event.checked else None
            w.offer(event.tx, event.received, reject=event.reject, kept=kept)
        elif isinstance(event, TxAnnounced):
            w.announce(event.txid, event.received)
        elif isinstance(event, TxRemoved):
            w.remove(event.txid)
        elif isinstance(event, BlockConnected):
            self._connect(event)
        elif isinstance(event, BlockDisconnected):
            height = w.block_height(event.hash)
            n = w.disconnect(event.hash)
            log.info(kv("block_disconnected", hash=event.hash[::-1].hex(), txids=n))
            self.send(
                BlockEvent(
                    event.hash[::-1].hex(), height, self.clock(), "disconnected", n
                )
            )
        elif isinstance(event, Resync):
            self._count_rejections()
            w.clear()
            self.reported = Counter()
            self.rough = None
            log.warning(kv("window_resync", reason=event.reason))
            self.send(StatusChange("window", "resync", event.reason, self.clock()))
        elif isinstance(event, FeedTrouble):
            self.trouble = event
            self.trouble_at = trio.current_time()
        if self.feed_status == "stale" and not isinstance(event, FeedTrouble | Resync):
            self.feed_alive = True

    def _connect(self, event: BlockConnected) -> None:
        w = self.window
        n = w.connect(
            event.hash, event.received, block=event.block, height=event.height
        )
        self.block_counts = {event.hash: (n, w.block_height(event.hash))}
        height = w.block_height(event.hash)
        if height is not None and self.metrics is not None:
            self.metrics.last_block_height.set(height)
        log.info(
            kv(
                "block_connected",
                hash=event.hash[::-1].hex(),
                height=height,
                confirmed=n,
                full=event.block is not None,
            )
        )
        self.send(
            BlockEvent(event.hash[::-1].hex(), height, self.clock(), "connected", n)
        )

    async def tick(self, *, use_thread: bool | None = None) -> None:
        """Expire, re-estimate if the window changed, send what is new."""
        w = self.window
        m = self.metrics
        now = self.clock()
        w.expire(now)
        self._count_rejections()
        self._feed_status()
        late = w.late_block()
        state = None if late is None else (late[1], w.block_height(late[0]))
        if late is not None and state != self.block_counts.get(late[0], state):
            # Late repeats joined the block since its BlockEvent: send it
            # again with the count (the page replaces it by hash).
            block_hash, n, connected_at = late
            height = w.block_height(block_hash)
            self.block_counts[block_hash] = (n, height)
            self.send(
                BlockEvent(block_hash[::-1].hex(), height, connected_at, "connected", n)
            )
        if w.version != self.estimated_version:
            amounts = w.amounts()
            hist = Histogram(w.histogram.counts.copy())
            thread = (
                len(amounts) > THREAD_THRESHOLD if use_thread is None else use_thread
            )
            if thread:
                est = await trio.to_thread.run_sync(estimate, amounts, hist)
            else:
                est = estimate(amounts, hist)
            update = EstimateUpdate(
                est, now, w.outputs, w.confirmed_outputs, w.mempool_outputs
            )
            if self.send(update):
                self.estimated_version = w.version
            if est.rough_price is not None:
                self.rough = est.rough_price
            status = "ok" if est.price is not None else "no_data"
            if status != self.status:
                self.status = status
                self.send(StatusChange("estimate", status, est.reason or "", now))
            if m is not None:
                m.window_outputs.labels("confirmed").set(w.confirmed_outputs)
                m.window_outputs.labels("mempool").set(w.mempool_outputs)
                if est.price is not None:
                    m.price.set(est.price)
                    m.price_updated.set(now)
        if self.rough is not None:
            points = points_for(w.take_new(), self.rough)
            for i in range(0, len(points), MAX_POINTS_PER_BATCH):
                self.send(PointsBatch(tuple(points[i : i + MAX_POINTS_PER_BATCH])))

    def _feed_status(self) -> None:
        """Send the feed's status when it changed: the latest trouble's kind,
        ``ok`` again once a stale feed delivers or a gap/restart is old."""
        t = self.trouble
        alive, self.feed_alive = self.feed_alive, False
        if t is not None:
            self.trouble = None
            self.feed_status = t.kind
            self.send(
                StatusChange("feed", t.kind, f"{t.topic}: {t.detail}", self.clock())
            )
        elif alive and self.feed_status == "stale":
            self.feed_status = "ok"
            self.send(StatusChange("feed", "ok", "messages arrive again", self.clock()))
        elif (
            self.feed_status != "ok"
            and self.trouble_at is not None
            and trio.current_time() - self.trouble_at >= FEED_OK_AFTER
        ):
            self.feed_status = "ok"
            self.send(StatusChange("feed", "ok", "", self.clock()))


async def run_window(
    inp: trio.MemoryReceiveChannel[WindowEvent],
    out: trio.MemorySendChannel[Update],
    *,
    settings: Settings,
    metrics: Metrics | None = None,
    window: Window | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Window] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the window from ``inp`` and send updates to the fan-out on ``out``.

    Args:
      inp: events from the decoder and the node-sync actor.
      out: the fan-out's input. The window never waits for it: an update
        that does not fit is dropped and logged once per burst. A dropped
        estimate is sent again at the next tick; dropped points, block events
        and status changes are lost (the fan-out's snapshot still has the
        newest estimate). A fan-out that keeps up never sees this.
      settings: ``window_seconds`` and ``estimate_interval`` are used.
      metrics: window outputs, price, last block height and filter
        rejections are updated.
      window: the state to use (a fresh one of ``settings.window_seconds``
        by default); ``task_status.started`` receives it.
      clock: wall-clock time for expiry and for the time of each update.

    Every ``estimate_interval`` seconds (trio's clock) the window expires old
    entries and, if anything changed, re-estimates and sends an
    :class:`~oracle.events.EstimateUpdate` and the price points of outputs
    that arrived since the last tick (against the newest rough price; points
    wait until there is one). Returns when ``inp`` is closed and drained,
    after a last tick; closes ``out`` then. On cancellation nothing more is
    sent; an estimate running in a worker thread is waited for.
    """
    w = window if window is not None else Window(settings.window_seconds)
    actor = _Actor(w, out, metrics, clock)
    interval = settings.estimate_interval
    task_status.started(w)
    try:
        async with inp, out:
            next_tick = trio.current_time() + interval
            while True:
                with trio.move_on_at(next_tick):
                    try:
                        event = await inp.receive()
                    except trio.EndOfChannel:
                        await actor.tick()
                        return
                    actor.apply(event)
                if trio.current_time() >= next_tick:
                    await actor.tick()
                    next_tick = trio.current_time() + interval
    finally:
        actor.warn.flush(force=True)
