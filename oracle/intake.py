"""The intake actor: Bitcoin Core's ZMQ notifications in, checked messages out.

:func:`run_intake` owns one ZMQ ``SUB`` socket per distinct endpoint (topics
configured on the same endpoint share a socket, as they share one on the
node). Each socket is read by exactly one task, the way
``../shared/docs/bitcoin-core.md`` prescribes for trio: receive with
``NOBLOCK`` until ``zmq.Again``, then read ``EVENTS``, and only when
``POLLIN`` is clear wait for the socket's descriptor to become readable.

Every message is checked before anything downstream sees it:

* three frames, a known topic subscribed on that socket, a 4-byte counter;
* a ``sequence`` body of 33 bytes (``C``/``D``) or 41 bytes (``A``/``R``)
  with one of those four labels; a ``hashblock`` body of 32 bytes.

A message failing a check is dropped and counted by reason
(``Metrics.decode_errors``: ``frame_count``, ``topic``, ``counter``,
``sequence_body``, ``sequence_label``, ``hash_body``), and logged once per
burst. Each topic's counter is followed: a skip is counted as lost messages
(``Metrics.lost_messages``) and reported downstream as
``FeedTrouble(kind="gap")``; a counter that goes back (to 0, or backwards
other than by wrapping at 2**32) is a node restart (``Metrics.restarts``,
``FeedTrouble(kind="restart")``). When no message has arrived on any socket
for ``stale_seconds``, every socket is closed and replaced by a fresh one
that connects and subscribes again (``Metrics.reconnects`` once,
``FeedTrouble(kind="stale")`` per topic). The feed as a whole is timed, not
each socket, because a socket carrying only ``hashblock`` is quiet for
minutes between blocks. A publisher that goes
away and comes back on the same address is picked up by ZMQ's own
reconnection; its counters restart at 0, which is reported as a restart.

Deduplication of ``rawtx`` (a transaction normally arrives twice, from the
mempool and again in its block) is not done here: telling the two apart needs
the txid, which needs decoding, and the repeat is itself information (it
confirms the transaction). The window counts each txid once; see
:mod:`oracle.window`.

Hashes in ``sequence`` and ``hashblock`` bodies are published by Core in
display order; the intake reverses them so that every event carries internal
byte order, like :class:`oracle.decode.Tx` ``.txid``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from typing import Final

import attrs
import trio
import zmq

from .config import Settings
from .events import FeedMessage, FeedTrouble, HashBlock, RawTx, SequenceEvent
from .logging import RateLimitedLog, kv
from .metrics import Metrics

__all__ = [
    "COUNTER_WRAP",
    "INTAKE_TOPICS",
    "MAXMSGSIZE",
    "RCVHWM",
    "BadFrame",
    "CounterTracker",
    "feed_endpoints",
    "parse_message",
    "run_intake",
]

log = logging.getLogger(__name__)

#: Topics the intake understands.
INTAKE_TOPICS: Final = ("rawtx", "sequence", "hashblock")
#: Core's per-topic counters wrap at this value.
COUNTER_WRAP: Final = 2**32
#: A counter this close below 2**32 followed by one this close above 0 is a
#: wrap with a gap, not a restart.
_WRAP_SLACK: Final = 2**20
_COUNTER = struct.Struct("<I").unpack
_MEMPOOL_SEQ = struct.Struct("<Q").unpack_from
_SEQ_LEN: Final = {b"C": 33, b"D": 33, b"A": 41, b"R": 41}
#: Receive high-water mark of each SUB socket, in messages. ZMQ's I/O thread
#: fills this queue even while the trio thread is busy, so it absorbs a block
#: announcement's burst of ``rawtx`` (thousands at once) that Core's send
#: queue (1,000 by default) alone would drop: 20,000 holds the ``rawtx`` and
#: ``sequence`` messages of several full blocks. The bound is in messages, not
#: bytes (ZMQ has no byte bound): typical transactions make it about 10 MB,
#: but a publisher sending only 4 MB transactions could queue far more. The
#: node is trusted not to; :data:`MAXMSGSIZE` caps each message.
RCVHWM: Final = 20_000
#: Largest message part accepted, in bytes: a transaction can never be larger
#: than a block (4,000,000 bytes). ZMQ drops the connection of a publisher
#: that sends more, reconnects, and the counters then show the loss.
MAXMSGSIZE: Final = 4_000_000
#: Messages handled between two forced checkpoints when no message is sent on
#: (a flood of malformed frames must not starve other tasks).
_CHECKPOINT_EVERY: Final = 64


class BadFrame(ValueError):
    """A notification that does not follow Core's format; ``reason`` is its
    metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_message(
    frames: list[bytes], topics: frozenset[str], received: float
) -> tuple[str, int, FeedMessage | None, BadFrame | None]:
    """Check one multipart message and turn it into a feed message.

    Returns ``(topic, counter, message, problem)``. When the frames carry a
    usable topic and counter but the body is malformed, ``message`` is None
    and ``problem`` says why; the counter still counts (the publisher did send
    that message).

    Raises:
      BadFrame: wrong frame count, topic not in ``topics``, or a counter
        that is not 4 bytes; nothing in the message can be trusted.
    """
    if len(frames) != 3:
        raise BadFrame("frame_count", f"{len(frames)} frames")
    raw_topic, body, raw_counter = frames
    topic = raw_topic.decode("ascii", "replace")
    if topic not in topics:
        raise BadFrame("topic", topic[:32])
    if len(raw_counter) != 4:
        raise BadFrame("counter", f"{len(raw_counter)} bytes")
    counter = _COUNTER(raw_counter)[0]
    if topic == "rawtx":
        return topic, counter, RawTx(body, received), None
    if topic == "hashblock":
        if len(body) != 32:
            return topic, counter, None, BadFrame("hash_body", f"{len(body)} bytes")
        return topic, counter, HashBlock(body[::-1], received), None
    if len(body) < 33:
        return topic, counter, None, BadFrame("sequence_body", f"{len(body)} bytes")
    label = body[32:33]
    want = _SEQ_LEN.get(label)
    if want is None:
        return topic, counter, None, BadFrame("sequence_label", repr(label))
    if len(body) != want:
        problem = BadFrame("sequence_body", f"{len(body)} bytes for {label!r}")
        return topic, counter, None, problem
    seq = _MEMPOOL_SEQ(body, 33)[0] if want == 41 else None
    return (
        topic,
        counter,
        SequenceEvent(body[:32][::-1], label.decode(), seq, received),
        None,
    )


@attrs.define(eq=False)
class CounterTracker:
    """Follows each topic's message counter (pure state, no I/O).

    ``expected`` holds the next counter per topic; a topic not yet seen has
    no expectation, so the first message after start-up is never a gap.
    """

    expected: dict[str, int] = attrs.field(factory=dict)

    def check(self, topic: str, counter: int) -> tuple[str, int] | None:
        """Record ``counter`` for ``topic``.

        Returns None when it is the expected one (or the first),
        ``("gap", lost)`` when ``lost`` messages were skipped, and
        ``("restart", 0)`` when the counter went back (a restarted node).
        """
        expected = self.expected.get(topic)
        self.expected[topic] = (counter + 1) % COUNTER_WRAP
        if expected is None or counter == expected:
            return None
        if counter > expected:
            return ("gap", counter - expected)
        # Smaller than expected: a wrap past 2**32 with messages lost, or a
        # counter that started again.
        if (
            counter != 0
            and expected > COUNTER_WRAP - _WRAP_SLACK
            and counter < _WRAP_SLACK
        ):
            return ("gap", counter + COUNTER_WRAP - expected)
        return ("restart", 0)


def feed_endpoints(settings: Settings) -> dict[str, str]:
    """Topic -> endpoint from ``settings`` (``hashblock`` only if configured)."""
    eps = {"rawtx": settings.zmq_rawtx, "sequence": settings.zmq_sequence}
    if settings.zmq_hashblock:
        eps["hashblock"] = settings.zmq_hashblock
    return eps


@attrs.define(eq=False)
class _Intake:
    out: trio.MemorySendChannel[FeedMessage]
    stale_seconds: float
    metrics: Metrics | None
    counters: CounterTracker = attrs.field(factory=CounterTracker)
    #: trio time of the last message on any socket.
    last_message: float = attrs.field(factory=trio.current_time)
    #: Increased each time the feed is found stale and every socket replaced.
    generation: int = 0
    warn: RateLimitedLog = attrs.field(
        factory=lambda: RateLimitedLog(log, key_fields=("reason", "topic"))
    )

    async def handle(self, frames: list[bytes], topics: frozenset[str]) -> bool:
        """Check and forward one message; True if something was sent on.

        Blocks while ``out`` is full (back-pressure to ZMQ's queues).
        """
        m = self.metrics
        received = time.time()
        try:
            topic, counter, msg, problem = parse_message(frames, topics, received)
        except BadFrame as exc:
            self._bad(exc, frames[0][:32] if frames else b"")
            return False
        if m is not None:
            m.messages.labels(topic).inc()
            m.last_message.set(received)
        sent = False
        trouble = self.counters.check(topic, counter)
        if trouble is not None:
            kind, lost = trouble
            if kind == "gap":
                expected = (counter - lost) % COUNTER_WRAP
                if m is not None:
                    m.lost_messages.labels(topic).inc(lost)
                self.warn.warning(
                    "zmq_gap", topic=topic, expected=expected, got=counter, lost=lost
                )
                detail = f"expected={expected} got={counter} lost={lost}"
            else:
                if m is not None:
                    m.restarts.inc()
                log.warning(kv("zmq_restart", topic=topic, got=counter))
                detail = f"counter went back to {counter}"
            await self.out.send(FeedTrouble(kind, topic, detail, received, lost))
            sent = True
        if problem is not None:
            self._bad(problem, topic.encode())
            return sent
        assert msg is not None
        await self.out.send(msg)
        return True

    def _bad(self, exc: BadFrame, topic: bytes) -> None:
        if self.metrics is not None:
            self.metrics.decode_errors.labels(exc.reason).inc()
        self.warn.warning(
            "zmq_bad_frame",
            reason=exc.reason,
            topic=topic.decode("ascii", "replace"),
            detail=exc.detail,
        )

    async def read(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        topics: frozenset[str],
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Own one socket for ``endpoint``; replace it whenever the feed goes
        stale."""
        first = True
        while True:
            sock = ctx.socket(zmq.SUB)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, RCVHWM)
                sock.setsockopt(zmq.MAXMSGSIZE, MAXMSGSIZE)
                for t in sorted(topics):
                    sock.setsockopt(zmq.SUBSCRIBE, t.encode())
                sock.connect(endpoint)
                log.info(kv("zmq_connect", endpoint=endpoint, topics=",".join(topics)))
                if first:
                    task_status.started()
                    first = False
                await self._pump(sock, topics)
            finally:
                sock.close(linger=0)
            now = time.time()
            for t in sorted(topics):
                await self.out.send(
                    FeedTrouble(
                        "stale",
                        t,
                        f"feed silent for {self.stale_seconds}s; reconnected",
                        now,
                    )
                )

    async def _pump(self, sock: zmq.Socket[bytes], topics: frozenset[str]) -> None:
        """Read ``sock`` until the whole feed has been silent for
        ``stale_seconds`` (no message on any socket), then return.

        The feed as a whole, not each socket, is timed: a socket carrying only
        ``hashblock`` is legitimately quiet for many minutes. The socket that
        notices the silence starts a new generation; the others see it and
        return too, so every socket is replaced.
        """
        fd = int(sock.getsockopt(zmq.FD))
        generation = self.generation
        unsent = 0
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    continue
                if self.generation != generation:
                    return
                deadline = self.last_message + self.stale_seconds
                now = trio.current_time()
                if now >= deadline:
                    self.generation += 1
                    self.last_message = now
                    if self.metrics is not None:
                        self.metrics.reconnects.inc()
                    log.warning(kv("zmq_stale", silent_seconds=self.stale_seconds))
                    return
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(fd)
                continue
            if await self.handle(frames, topics):
                # Only messages in Core's format count as life: a publisher
                # sending nothing but garbage is as stale as a silent one.
                self.last_message = trio.current_time()
                unsent = 0
            else:
                unsent += 1
                if unsent >= _CHECKPOINT_EVERY:
                    unsent = 0
                    await trio.lowlevel.checkpoint()


async def run_intake(
    feed: Settings | Mapping[str, str | None],
    out: trio.MemorySendChannel[FeedMessage],
    *,
    stale_seconds: float | None = None,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read Core's ZMQ notifications and send checked messages on ``out``.

    Args:
      feed: the settings (``zmq_rawtx``, ``zmq_sequence``, ``zmq_hashblock``,
        ``stale_seconds``), or a mapping topic -> endpoint (None: not
        subscribed). Topics on the same endpoint share one socket.
      out: receives :class:`~oracle.events.RawTx`,
        :class:`~oracle.events.SequenceEvent`, :class:`~oracle.events.HashBlock`
        and :class:`~oracle.events.FeedTrouble`, in arrival order per socket.
      stale_seconds: silence of the whole feed (no message on any socket)
        after which every socket is replaced; overrides the
        settings' value (default 300 with a plain mapping).
      metrics: updated with messages, lost messages, restarts, reconnects and
        malformed frames.

    ``task_status.started`` receives the topic -> endpoint mapping once every
    socket has connected and subscribed (messages published before the
    subscription reaches the publisher are lost: that is ZMQ).

    When ``out`` is full the reading task blocks; meanwhile ZMQ queues
    messages up to its receive high-water mark and then the node drops them
    at its send high-water mark, which the counters reveal as a gap. Runs
    until cancelled; on cancellation the sockets are closed at once and
    messages still queued in ZMQ are discarded.

    Raises:
      ValueError: an unknown topic, or no topic configured.
      zmq.ZMQError: an endpoint is not a valid ZMQ address.
    """
    if isinstance(feed, Settings):
        endpoints: dict[str, str] = feed_endpoints(feed)
        stale = feed.stale_seconds if stale_seconds is None else stale_seconds
    else:
        endpoints = {t: ep for t, ep in feed.items() if ep}
        stale = 300.0 if stale_seconds is None else stale_seconds
    for topic in endpoints:
        if topic not in INTAKE_TOPICS:
            raise ValueError(f"unknown ZMQ topic {topic!r}; known: {INTAKE_TOPICS}")
    if not endpoints:
        raise ValueError("no ZMQ topic configured")
    by_endpoint: dict[str, set[str]] = {}
    for topic, ep in endpoints.items():
        by_endpoint.setdefault(ep, set()).add(topic)
    intake = _Intake(out, stale, metrics)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with trio.open_nursery() as nursery:
            for ep, topics in by_endpoint.items():
                await nursery.start(intake.read, ctx, ep, frozenset(topics))
            task_status.started(dict(endpoints))
    finally:
        intake.warn.flush(force=True)
        ctx.destroy(linger=0)
