"""Fan-out: one stream of updates, many WebSocket clients.

:class:`FanOut` reads :data:`~oracle.events.Update` messages from the window
actor, keeps a snapshot of the current state (latest estimate, recent points,
recent blocks, component status) and hands every update to each client's
:class:`Subscription`.

Every update is serialised to JSON exactly once; all subscriptions hold a
reference to the same ``str``. A subscription never blocks the fan-out and
never grows without bound:

* at most one unsent ``estimate`` frame is kept per client: a newer estimate
  replaces an older one that has not been sent yet;
* at most ``queue_size`` frames in total are kept per client. When a client
  falls further behind, its oldest waiting ``points`` frame is thrown away
  and it is told so by a ``gap`` frame: it skips ahead instead of queueing.
  Only if nothing but block and status frames are waiting is everything
  dropped, and the client sent a ``gap`` and then a fresh ``snapshot``.

Snapshots are built lazily, at most once per update, and shared by every client
that asks for one before the next update arrives. Point and block JSON is kept
pre-serialised, so a snapshot of 20,000 points is a string join, not a
``json.dumps`` of 20,000 objects.

The frame formats are written down in ``docs/websocket.md`` and
``docs/websocket.schema.json``.

Memory held for a client that has stopped reading is ``queue_size`` references
to shared frames plus the one frame its connection is busy writing; the web
layer (:mod:`oracle.app`) has hypercorn close such a connection once it has
failed to answer pings for ``READ_TIMEOUT`` seconds.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import attrs
import trio

from .events import (
    BlockEvent,
    EstimateUpdate,
    Point,
    PointsBatch,
    StatusChange,
    Update,
)
from .logging import RateLimitedLog
from .metrics import Metrics

__all__ = [
    "PROTOCOL_VERSION",
    "FanOut",
    "FanOutStatistics",
    "Subscription",
    "estimate_fields",
]

log = logging.getLogger(__name__)
_bad_update = RateLimitedLog(log, key_fields=("type",))

#: Value of the ``v`` field of every frame.
PROTOCOL_VERSION: Final = 1
#: Default number of recent points kept for snapshots.
MAX_POINTS: Final = 20_000
#: Default number of recent block events kept for snapshots.
MAX_BLOCKS: Final = 32
#: Default seconds over which :meth:`FanOut.run` coalesces points frames.
POINTS_INTERVAL: Final = 0.25
#: Default bound on the frames waiting to be sent to one client.
QUEUE_SIZE: Final = 64


def _finite(x: float | None) -> float | None:
    """``x`` as a plain float, or None when absent or not finite (JSON has no
    NaN or infinity)."""
    if x is None:
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def estimate_fields(update: EstimateUpdate) -> dict[str, Any]:
    """The JSON fields describing one estimate, shared by the ``estimate``
    frame and ``/api/v1/price``.

    Floats are passed through unchanged, so ``json.dumps`` writes their
    shortest round-trip representation and a client parsing the text gets the
    estimator's float bit for bit.
    """
    est = update.estimate
    band = None
    if est.band is not None:
        lo, hi = _finite(est.band[0]), _finite(est.band[1])
        band = [lo, hi] if lo is not None and hi is not None else None
    return {
        "price": _finite(est.price),
        "rough_price": None if est.rough_price is None else int(est.rough_price),
        "reason": est.reason,
        "outputs": int(est.outputs),
        "points": int(est.point_count),
        "spread": _finite(est.spread),
        "band": band,
        "updated": float(update.time),
        "window_outputs": int(update.window_outputs),
        "confirmed_outputs": int(update.confirmed_outputs),
        "mempool_outputs": int(update.mempool_outputs),
    }


def _point_json(p: Point) -> str:
    return json.dumps(
        [_finite(p.price), int(p.sats), float(p.time), p.txid, bool(p.confirmed)],
        separators=(",", ":"),
    )


def _block_fields(b: BlockEvent) -> dict[str, Any]:
    return {
        "hash": b.hash,
        "height": b.height,
        "time": float(b.time),
        "kind": b.kind,
        "confirmed_txids": int(b.confirmed_txids),
    }


def _status_fields(s: StatusChange) -> dict[str, Any]:
    return {"status": s.status, "detail": s.detail, "time": float(s.time)}


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


@attrs.frozen
class FanOutStatistics:
    """A moment's view of the fan-out, for ``/health``, tests and benchmarks.

    Attributes:
      clients: subscriptions open now.
      published: updates received since start.
      seq: sequence number of the newest frame.
      pending_max: most frames waiting for any one client.
      pending_total: frames waiting, summed over clients (references to shared
        frames, not copies).
      dropped: frames thrown away for clients that fell behind, since start.
      gaps: ``gap`` frames sent, over all clients.
      snapshots_built: snapshots serialised since start.
      points: points kept for snapshots.
      blocks: block events kept for snapshots.
    """

    clients: int
    published: int
    seq: int
    pending_max: int
    pending_total: int
    dropped: int
    gaps: int
    snapshots_built: int
    points: int
    blocks: int


@attrs.define(eq=False)
class Subscription:
    """One client's view of the fan-out; made by :meth:`FanOut.subscribe`.

    The first frame :meth:`receive` returns is always a ``snapshot``. After
    that come update frames in publication order, except that

    * an unsent ``estimate`` is replaced by a newer one (not counted as a gap:
      nothing the client needs is lost);
    * when ``queue_size`` frames are waiting and another arrives, the oldest
      waiting ``points`` frame is dropped, and the client is sent a ``gap``
      frame (``resync: false``) before its next frame;
    * if none of the waiting frames is a ``points`` frame (a client stuck
      behind ``queue_size`` block and status frames), everything waiting is
      dropped and the client gets a ``gap`` (``resync: true``) then a fresh
      ``snapshot``.

    Dropping the oldest points keeps what a lagging client holds to the most
    recent frames, the same string objects every other lagging client holds,
    so many stuck clients together keep about ``queue_size`` frames alive,
    not ``queue_size`` each.
    """

    _fanout: FanOut
    queue_size: int
    _pending: collections.deque[tuple[str, str]] = attrs.field(
        factory=collections.deque
    )
    _pending_estimate: tuple[str, str] | None = None
    _needs_snapshot: bool = True
    _gap_dropped: int = 0
    _pong: bool = False
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _closed: bool = False
    #: Frames this client skipped, in total (superseded estimates included).
    dropped: int = 0

    @property
    def pending(self) -> int:
        """Frames waiting to be sent (a pending snapshot counts as one)."""
        return len(self._pending) + int(self._needs_snapshot) + int(self._pong)

    def _offer(self, kind: str, frame: str) -> int:
        """Queue ``frame`` of ``kind``; return how many frames were dropped."""
        if self._closed or self._needs_snapshot:
            # Whatever is published now is part of the snapshot still to come.
            return 0
        item = (kind, frame)
        dropped = 0
        if kind == "estimate" and self._pending_estimate is not None:
            self._pending.remove(self._pending_estimate)
            self._pending_estimate = None
            dropped = 1
        if len(self._pending) >= self.queue_size:
            oldest = next((p for p in self._pending if p[0] == "points"), None)
            if oldest is not None:
                self._pending.remove(oldest)
                dropped += 1
                self._gap_dropped += 1
            else:
                skipped = len(self._pending) + 1
                dropped += skipped
                self._gap_dropped += skipped
                self._pending.clear()
                self._pending_estimate = None
                self._needs_snapshot = True
                self.dropped += dropped
                self._wakeup.set()
                return dropped
        self._pending.append(item)
        if kind == "estimate":
            self._pending_estimate = item
        self.dropped += dropped
        self._wakeup.set()
        return dropped

    def request_pong(self) -> None:
        """Queue one ``pong`` frame; repeated requests before it is sent
        coalesce into one."""
        self._pong = True
        self._wakeup.set()

    def _next(self) -> str | None:
        if self._pong:
            self._pong = False
            return _dumps({"v": PROTOCOL_VERSION, "type": "pong"})
        if self._gap_dropped:
            frame = _dumps(
                {
                    "v": PROTOCOL_VERSION,
                    "type": "gap",
                    "dropped": self._gap_dropped,
                    "resync": self._needs_snapshot,
                }
            )
            self._gap_dropped = 0
            self._fanout._gaps += 1
            return frame
        if self._needs_snapshot:
            self._needs_snapshot = False
            self._pending.clear()
            self._pending_estimate = None
            return self._fanout.snapshot_frame()
        if self._pending:
            item = self._pending.popleft()
            if item is self._pending_estimate:
                self._pending_estimate = None
            return item[1]
        return None

    async def receive(self) -> str:
        """Wait for the next frame (a JSON text) for this client.

        Raises:
          trio.EndOfChannel: the subscription was closed (the fan-out stopped).
          trio.ClosedResourceError: this subscription was closed by its owner.

        Cancellation leaves the subscription intact: no frame is lost, the
        next call returns the frame this one would have.
        """
        while True:
            if self._closed:
                raise trio.ClosedResourceError("subscription closed")
            frame = self._next()
            if frame is not None:
                return frame
            if self._fanout._stopped:
                raise trio.EndOfChannel
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            await self._wakeup.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; idempotent. Pending frames are released."""
        if not self._closed:
            self._closed = True
            self._pending.clear()
            self._pending_estimate = None
            self._wakeup.set()
            self._fanout._unsubscribe(self)


@attrs.define(eq=False)
class FanOut:
    """Keeps the current state and delivers updates to every subscriber.

    Args:
      metrics: updated with ``clients`` and ``dropped_frames``.
      max_points: recent points kept for snapshots (oldest dropped first).
      max_blocks: recent block events kept for snapshots.
      queue_size: frames kept per client before it is skipped ahead.
      points_interval: seconds over which :meth:`run` coalesces points into
        one frame; 0 sends one frame per ``PointsBatch``.
    """

    metrics: Metrics | None = None
    max_points: int = MAX_POINTS
    max_blocks: int = MAX_BLOCKS
    queue_size: int = QUEUE_SIZE
    points_interval: float = POINTS_INTERVAL
    _subs: set[Subscription] = attrs.field(factory=set)
    _points_buffer: list[str] = attrs.field(factory=list)
    _coalescing: bool = False
    _estimate: dict[str, Any] | None = None
    _points: collections.deque[str] = attrs.field(init=False)
    _blocks: collections.deque[dict[str, Any]] = attrs.field(init=False)
    _status: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    _seq: int = 0
    _published: int = 0
    _dropped: int = 0
    _gaps: int = 0
    _snapshots_built: int = 0
    _snapshot: tuple[int, str] | None = None
    _stopped: bool = False

    def __attrs_post_init__(self) -> None:
        if self.queue_size < 2:
            raise ValueError("queue_size must be at least 2")
        self._points = collections.deque(maxlen=max(0, self.max_points))
        self._blocks = collections.deque(maxlen=max(0, self.max_blocks))

    # ------------------------------------------------------------ state

    @property
    def latest_estimate(self) -> dict[str, Any] | None:
        """The fields of the newest estimate (see :func:`estimate_fields`), or
        None before the first one. The dict must not be modified."""
        return self._estimate

    @property
    def status(self) -> dict[str, dict[str, Any]]:
        """Newest status per component: ``{"status", "detail", "time"}``."""
        return self._status

    def snapshot_frame(self) -> str:
        """The ``snapshot`` frame for the current state, built at most once
        per published update."""
        if self._snapshot is not None and self._snapshot[0] == self._seq:
            return self._snapshot[1]
        head = _dumps(
            {
                "v": PROTOCOL_VERSION,
                "type": "snapshot",
                "seq": self._seq,
                "estimate": self._estimate,
                "blocks": list(self._blocks),
                "status": self._status,
            }
        )
        frame = head[:-1] + ',"points":[' + ",".join(self._points) + "]}"
        self._snapshot = (self._seq, frame)
        self._snapshots_built += 1
        return frame

    # ------------------------------------------------------------ publishing

    def publish(self, update: Update) -> None:
        """Apply ``update`` to the snapshot and offer its frame to every client.

        Never blocks and never raises for a slow client; returns once every
        subscription holds a reference to the frame (or has skipped it).

        While :meth:`run` is coalescing points (``points_interval`` > 0), a
        ``PointsBatch`` is only buffered: its points reach the snapshot and the
        clients in the next combined ``points`` frame, sent at the next tick
        or just before the next frame of another type, so frames keep the
        order in which their updates were published.

        Raises:
          TypeError: ``update`` is not one of the :data:`Update` types.
        """
        if isinstance(update, PointsBatch):
            parts = [_point_json(p) for p in update.points]
            self._published += 1
            if self._coalescing:
                self._points_buffer.extend(parts)
            else:
                self._send_points(parts)
            return
        if not isinstance(update, EstimateUpdate | BlockEvent | StatusChange):
            raise TypeError(f"not an update: {type(update).__name__}")
        self.flush_points()
        self._seq += 1
        seq = self._seq
        if isinstance(update, EstimateUpdate):
            fields = estimate_fields(update)
            self._estimate = fields
            frame = _dumps(
                {"v": PROTOCOL_VERSION, "type": "estimate", "seq": seq, **fields}
            )
            kind = "estimate"
        elif isinstance(update, BlockEvent):
            fields = _block_fields(update)
            # A block is announced twice with RPC (from ZMQ, then from the full
            # block with its height): the later event replaces the earlier.
            for i, b in enumerate(self._blocks):
                if b["hash"] == fields["hash"] and b["kind"] == fields["kind"]:
                    del self._blocks[i]
                    break
            self._blocks.append(fields)
            frame = _dumps(
                {"v": PROTOCOL_VERSION, "type": "block", "seq": seq, **fields}
            )
            kind = "block"
        else:
            fields = _status_fields(update)
            self._status[update.component] = fields
            frame = _dumps(
                {
                    "v": PROTOCOL_VERSION,
                    "type": "status",
                    "seq": seq,
                    "component": update.component,
                    **fields,
                }
            )
            kind = "status"
        self._published += 1
        self._offer_all(kind, frame)

    def flush_points(self) -> None:
        """Send the points buffered while coalescing as one ``points`` frame
        (nothing when none are buffered)."""
        if self._points_buffer:
            parts, self._points_buffer = self._points_buffer, []
            self._send_points(parts)

    def _send_points(self, parts: list[str]) -> None:
        self._points.extend(parts)
        self._seq += 1
        frame = (
            f'{{"v":{PROTOCOL_VERSION},"type":"points","seq":{self._seq},'
            f'"points":[{",".join(parts)}]}}'
        )
        self._offer_all("points", frame)

    def _offer_all(self, kind: str, frame: str) -> None:
        dropped = 0
        for sub in self._subs:
            dropped += sub._offer(kind, frame)
        if dropped:
            self._dropped += dropped
            if self.metrics is not None:
                self.metrics.dropped_frames.inc(dropped)

    async def run(
        self,
        updates: trio.MemoryReceiveChannel[Update],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish every update from ``updates`` until that channel ends.

        Reports readiness at once. :meth:`publish` never waits on a client, so
        this task keeps ``updates`` drained however slow the clients are; the
        sender's full-buffer policy only matters if the process itself is
        overloaded. With ``points_interval`` > 0, points are coalesced into
        one frame per interval (see :meth:`publish`), which divides the
        per-client send rate (the web server's main cost per client) at 20
        transactions a second by about five.

        When ``updates`` ends, buffered points are sent and every subscription
        ends (its :meth:`Subscription.receive` raises ``EndOfChannel``). On
        cancellation buffered points stay buffered and the subscriptions are
        left open: the caller's cancel scope ends them.
        """
        async with trio.open_nursery() as nursery:
            if self.points_interval > 0:
                self._coalescing = True
                nursery.start_soon(self._tick)
            task_status.started()
            try:
                async with updates:
                    async for update in updates:
                        try:
                            self.publish(update)
                        except TypeError:
                            _bad_update.warning(
                                "fanout_bad_update", type=type(update).__name__
                            )
            finally:
                self._coalescing = False
            self.flush_points()
            nursery.cancel_scope.cancel()
        self._stopped = True
        for sub in list(self._subs):
            sub._wakeup.set()

    async def _tick(self) -> None:
        while True:
            await trio.sleep(self.points_interval)
            self.flush_points()

    # ------------------------------------------------------------ clients

    @contextmanager
    def subscribe(self, queue_size: int | None = None) -> Iterator[Subscription]:
        """A new subscription, closed when the ``with`` block ends.

        Args:
          queue_size: this client's bound, instead of the fan-out's.
        """
        size = self.queue_size if queue_size is None else queue_size
        if size < 2:
            raise ValueError("queue_size must be at least 2")
        sub = Subscription(self, size)
        self._subs.add(sub)
        if self.metrics is not None:
            self.metrics.clients.inc()
        try:
            yield sub
        finally:
            sub.close()

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.discard(sub)
            if self.metrics is not None:
                self.metrics.clients.dec()

    def statistics(self) -> FanOutStatistics:
        """Counts for ``/health`` and tests; O(number of clients)."""
        pending = [s.pending for s in self._subs]
        return FanOutStatistics(
            clients=len(self._subs),
            published=self._published,
            seq=self._seq,
            pending_max=max(pending, default=0),
            pending_total=sum(pending),
            dropped=self._dropped,
            gaps=self._gaps,
            snapshots_built=self._snapshots_built,
            points=len(self._points),
            blocks=len(self._blocks),
        )
