"""Replay real blocks as a Bitcoin Core node would announce them over ZMQ.

:class:`CorePublisher` writes Bitcoin Core's exact notification format: three
frames per message (ASCII topic, body, 4-byte little-endian counter), one
counter per topic starting at 0 and wrapping at 2**32. Topics configured on
the same endpoint share one socket, as in Core.

Hashes in ``sequence`` and ``hashblock`` bodies are written the way Core
writes them: the 32 bytes reversed from the internal (serialised, SHA-256
output) order, so ``body[:32].hex()`` is the familiar display hex that
``getblockhash`` returns. A subscriber that wants internal order reverses
them (``body[:32][::-1]``).

:func:`run_replay` drives a publisher from raw block files: every
non-coinbase transaction of a block first arrives "in the mempool"
(``rawtx``, then ``sequence`` ``A`` with an 8-byte mempool sequence number) at
the requested rate, then the block connects (``rawtx`` for every transaction
of the block including the coinbase, then ``sequence`` ``C``, then
``hashblock``), which is the order Core uses.

The sockets are ``XPUB`` rather than Core's ``PUB``: the two are the same on
the wire, and ``XPUB`` lets :meth:`CorePublisher.wait_subscribed` wait until a
subscriber's subscription has arrived, so a test or a demo loses nothing to
ZMQ's "slow joiner" race. Sending never blocks: once a subscriber's queue
holds ``hwm`` messages, further messages to it are dropped, exactly as Core
drops them, and only the counters show the loss.
"""

from __future__ import annotations

import argparse
import logging
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import attrs
import trio
import zmq

from .decode import Block, DecodeError, parse_block
from .intake import COUNTER_WRAP, INTAKE_TOPICS
from .logging import kv, setup_logging

__all__ = [
    "TOPICS",
    "CorePublisher",
    "ReplayBlock",
    "add_arguments",
    "load_blocks",
    "run",
    "run_replay",
]

logger = logging.getLogger(__name__)

#: The topics this publisher knows, in the order Core announces them: the
#: ones the intake reads.
TOPICS: Final = INTAKE_TOPICS
_COUNTER = struct.Struct("<I")
_MEMPOOL_SEQ = struct.Struct("<Q")
#: How long :meth:`CorePublisher.wait_subscribed` sleeps between checks when
#: the socket's descriptor gives no signal (it is edge-triggered and another
#: call on the socket may have consumed the edge).
_POLL_SECONDS: Final = 0.02


#: After a replay that does not loop, how long closing may wait for queued
#: messages to reach the subscribers.
FLUSH_LINGER_MS: Final = 2000


@attrs.define(eq=False)
class CorePublisher:
    """ZMQ publisher speaking Bitcoin Core's notification format.

    Create with :meth:`open`; close with :meth:`close` (or use as a context
    manager). ``bound`` maps each topic to the endpoint actually bound (a port
    of 0 is resolved to the port the system chose). ``counters`` holds the next
    counter per topic; ``dropped`` counts messages ZMQ refused outright.

    Only one trio task may use a publisher: trio runs tasks on one thread, but
    :meth:`wait_subscribed` relies on no other task touching the sockets while
    it waits.
    """

    context: zmq.Context[zmq.Socket[bytes]]
    sockets: dict[str, zmq.Socket[bytes]]
    bound: dict[str, str]
    counters: dict[str, int] = attrs.field(factory=dict)
    dropped: int = 0
    _owns_context: bool = False
    _subscriptions: dict[str, set[bytes]] = attrs.field(factory=dict)

    @classmethod
    def open(
        cls,
        endpoints: Mapping[str, str | None],
        *,
        hwm: int = 1000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> CorePublisher:
        """Bind one socket per distinct endpoint and return the publisher.

        ``endpoints`` maps topic to endpoint (``tcp://127.0.0.1:0`` binds an
        ephemeral port); a topic mapped to None is not published. ``hwm`` is
        the send high-water mark per subscriber (Core's default is 1000).

        Raises:
          ValueError: an unknown topic.
          zmq.ZMQError: an endpoint cannot be bound (in use, bad address).
        """
        owns = context is None
        ctx = context if context is not None else zmq.Context()
        by_endpoint: dict[str, zmq.Socket[bytes]] = {}
        sockets: dict[str, zmq.Socket[bytes]] = {}
        bound: dict[str, str] = {}
        try:
            for topic, endpoint in endpoints.items():
                if topic not in TOPICS:
                    raise ValueError(f"unknown ZMQ topic {topic!r}; known: {TOPICS}")
                if endpoint is None:
                    continue
                sock = by_endpoint.get(endpoint)
                if sock is None:
                    sock = ctx.socket(zmq.XPUB)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDHWM, hwm)
                    sock.bind(endpoint)
                    by_endpoint[endpoint] = sock
                sockets[topic] = sock
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                bound[topic] = last.decode() if isinstance(last, bytes) else str(last)
        except BaseException:
            for sock in by_endpoint.values():
                sock.close(linger=0)
            if owns:
                ctx.term()
            raise
        return cls(
            context=ctx,
            sockets=sockets,
            bound=bound,
            counters={topic: 0 for topic in sockets},
            owns_context=owns,
        )

    def __enter__(self) -> CorePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger_ms: int = 0) -> None:
        """Close the sockets. Idempotent.

        With ``linger_ms`` 0 pending messages are discarded; otherwise this
        blocks (when it owns its ZMQ context) for up to ``linger_ms`` while
        they are delivered to connected subscribers.
        """
        for sock in {id(s): s for s in self.sockets.values()}.values():
            if not sock.closed:
                sock.close(linger=linger_ms)
        if self._owns_context and not self.context.closed:
            self.context.term()

    def publishes(self, topic: str) -> bool:
        """Whether ``topic`` has an endpoint."""
        return topic in self.sockets

    def publish(self, topic: str, body: bytes) -> int | None:
        """Send one notification; return the counter it carried.

        Returns None (and sends nothing, counting nothing) when ``topic`` has
        no endpoint. Never blocks: a subscriber whose queue is full silently
        misses the message, as with Core.
        """
        sock = self.sockets.get(topic)
        if sock is None:
            return None
        counter = self.counters[topic]
        try:
            sock.send_multipart(
                [topic.encode(), body, _COUNTER.pack(counter)], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            self.dropped += 1
        self.counters[topic] = (counter + 1) % COUNTER_WRAP
        return counter

    def publish_mempool_tx(self, raw_tx: bytes, txid: bytes, mempool_seq: int) -> None:
        """A transaction accepted to the mempool: ``rawtx``, then ``sequence A``.

        ``txid`` is in internal byte order; it is published reversed, as Core
        does.
        """
        self.publish("rawtx", raw_tx)
        self.publish("sequence", txid[::-1] + b"A" + _MEMPOOL_SEQ.pack(mempool_seq))

    def publish_mempool_removal(self, txid: bytes, mempool_seq: int) -> None:
        """A transaction left the mempool unmined: ``sequence R``."""
        self.publish("sequence", txid[::-1] + b"R" + _MEMPOOL_SEQ.pack(mempool_seq))

    def publish_block_connected(self, block: Block) -> None:
        """Core's announcement of a connected block.

        ``rawtx`` for every transaction in block order (coinbase included),
        then ``sequence C``, then ``hashblock``.
        """
        for tx in block.txs:
            self.publish("rawtx", tx.raw)
        self.publish("sequence", block.header.hash[::-1] + b"C")
        self.publish("hashblock", block.header.hash[::-1])

    def publish_block_disconnected(self, block_hash: bytes) -> None:
        """``sequence D`` for a block (hash in internal order) leaving the chain.

        Core publishes nothing else for a disconnection: the block's
        transactions return to the mempool without ``rawtx`` or ``A``.
        """
        self.publish("sequence", block_hash[::-1] + b"D")

    def _drain_subscriptions(self) -> None:
        for sock in {id(s): s for s in self.sockets.values()}.values():
            seen = self._subscriptions.setdefault(str(id(sock)), set())
            while True:
                try:
                    msg = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msg[:1] == b"\x01":
                    seen.add(msg[1:])
                elif msg[:1] == b"\x00":
                    seen.discard(msg[1:])

    def subscribed(self, topic: str) -> bool:
        """Whether some subscriber's filter matches ``topic`` (as last seen)."""
        sock = self.sockets.get(topic)
        if sock is None:
            return False
        prefixes = self._subscriptions.get(str(id(sock)), set())
        return any(topic.encode().startswith(p) for p in prefixes)

    async def wait_subscribed(self, topics: Iterable[str] | None = None) -> None:
        """Wait until a subscriber has subscribed to each of ``topics``.

        ``topics`` defaults to every published topic. Messages published
        before a subscription reaches the publisher are lost to that
        subscriber; call this before the first message that matters.

        The descriptor is edge-triggered, so besides waiting on it this
        checks again every 20 ms; under trio's autojump clock those checks run
        in virtual time and spin until the real subscription arrives, so use
        a real clock around this call.

        Cancellation: safe at any point; nothing is sent.
        """
        wanted = list(self.sockets if topics is None else topics)
        while True:
            self._drain_subscriptions()
            if all(self.subscribed(t) for t in wanted):
                return
            sock = next(s for t, s in self.sockets.items() if not self.subscribed(t))
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                continue
            with trio.move_on_after(_POLL_SECONDS):
                await trio.lowlevel.wait_readable(int(sock.getsockopt(zmq.FD)))


@attrs.frozen
class ReplayBlock:
    """A block to replay: the decoded block and a label for logs."""

    block: Block
    label: str


def load_blocks(paths: Iterable[Path | str]) -> list[ReplayBlock]:
    """Read and decode raw block files.

    Raises:
      OSError: a file cannot be read.
      oracle.decode.DecodeError: a file is not a valid serialised block.
    """
    out = []
    for path in paths:
        p = Path(path)
        try:
            block = parse_block(p.read_bytes())
        except DecodeError as exc:
            raise DecodeError(
                f"{p}: not a valid block: {exc.what}", exc.offset
            ) from None
        out.append(ReplayBlock(block, p.name))
    return out


async def run_replay(
    blocks: Iterable[Path | str | Block],
    *,
    endpoints: Mapping[str, str | None],
    rate: float | None,
    loop: bool,
    hwm: int = 1000,
    wait_for_subscriber: bool = False,
    block_pause: float = 0.0,
    burst: int = 0,
    task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish ``blocks`` over ZMQ in Core's format, in the order given.

    Each block's non-coinbase transactions arrive as mempool transactions at
    ``rate`` per second (None or 0: as fast as possible, yielding to other
    tasks between messages), then the block connects. With ``loop`` the list
    starts over after the last block (same transactions, counters continuing);
    otherwise the function returns after the last block.

    ``endpoints`` maps topic (``rawtx``, ``sequence``, ``hashblock``) to an
    endpoint or None. ``task_status.started`` receives the dict topic ->
    bound endpoint once the sockets are bound. With ``wait_for_subscriber``
    nothing is published until every topic has a subscriber. ``block_pause``
    seconds are slept after each block connects. The first ``burst`` mempool
    transactions of every pass are published back to back, as a node that
    starts with a full mempool would relay them, and the rest at ``rate``:
    every pass keeps the same timing, so each transaction comes back exactly
    one pass after its previous copy.

    The block announcement is a burst (every ``rawtx`` of the block at once),
    as from Core; with the default ``hwm`` of 1000, a subscriber that cannot
    keep up loses messages and sees a counter gap, which is realistic. Raise
    ``hwm`` for a lossless demo.

    Raises:
      OSError, DecodeError: a block file cannot be read or decoded (before
        anything is bound).
      zmq.ZMQError: an endpoint cannot be bound.

    Cancellation: the sockets are closed; messages not yet delivered are lost.
    """
    decoded: list[Block] = []
    for item in blocks:
        if isinstance(item, Block):
            decoded.append(item)
        else:
            decoded.append(load_blocks([item])[0].block)
    with CorePublisher.open(endpoints, hwm=hwm) as pub:
        logger.info("%s", kv("replay_bound", **pub.bound, blocks=len(decoded)))
        task_status.started(dict(pub.bound))
        if wait_for_subscriber:
            await pub.wait_subscribed()
        interval = 1.0 / rate if rate else 0.0
        mempool_seq = 0
        next_at = trio.current_time()
        rounds = 0
        while True:
            sent_this_pass = 0
            for block in decoded:
                for tx in block.txs:
                    if tx.is_coinbase:
                        continue
                    sent_this_pass += 1
                    if sent_this_pass <= burst:
                        await trio.lowlevel.checkpoint()
                        next_at = trio.current_time()
                    elif interval:
                        next_at += interval
                        await trio.sleep_until(next_at)
                    else:
                        await trio.lowlevel.checkpoint()
                    pub.publish_mempool_tx(tx.raw, tx.txid, mempool_seq)
                    mempool_seq += 1
                pub.publish_block_connected(block)
                # Core's mempool sequence also advances once per transaction
                # removed because it was mined, though no R is published.
                mempool_seq += sum(1 for tx in block.txs if not tx.is_coinbase)
                logger.info(
                    "%s",
                    kv("replay_block", hash=block.hash_hex, txs=block.tx_count),
                )
                if block_pause:
                    await trio.sleep(block_pause)
                    next_at = trio.current_time()
                else:
                    await trio.lowlevel.checkpoint()
            rounds += 1
            if not loop or not decoded:
                logger.info("%s", kv("replay_done", rounds=rounds, dropped=pub.dropped))
                # Let the last block's announcement reach the subscribers.
                await trio.to_thread.run_sync(pub.close, FLUSH_LINGER_MS)
                return
            next_at = max(next_at, trio.current_time())


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fiatprint replay``."""
    parser.add_argument(
        "--blocks", nargs="+", required=True, type=Path, metavar="FILE",
        help="raw block files, replayed in the order given",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=50.0,
        help="mempool transactions per second (0: as fast as possible)",
    )  # fmt: skip
    parser.add_argument("--rawtx", default="tcp://127.0.0.1:28332", metavar="EP")
    parser.add_argument("--sequence", default="tcp://127.0.0.1:28333", metavar="EP")
    parser.add_argument("--hashblock", default=None, metavar="EP")
    parser.add_argument(
        "--hwm", type=int, default=1000,
        help="send high-water mark per subscriber (Core's default: 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--block-pause", type=float, default=0.0, metavar="SECONDS",
        help="pause after each block connects",
    )  # fmt: skip
    parser.add_argument(
        "--burst", type=int, default=0, metavar="N",
        help="publish the first N mempool transactions of every pass at once",
    )  # fmt: skip
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop after the last block instead of looping",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fiatprint replay``; returns the exit status.

    2 for bad flags or a block file that cannot be read or decoded, 1 when an
    endpoint cannot be bound, 0 after ``--once`` completes.
    """
    if not math.isfinite(args.rate) or args.rate < 0:
        print("fiatprint replay: --rate must be a number >= 0", file=sys.stderr)
        return 2
    if args.burst < 0:
        print("fiatprint replay: --burst must be >= 0", file=sys.stderr)
        return 2
    try:
        blocks = [rb.block for rb in load_blocks(args.blocks)]
    except (OSError, DecodeError) as exc:
        print(f"fiatprint replay: {exc}", file=sys.stderr)
        return 2
    setup_logging("INFO")
    endpoints = {
        "rawtx": args.rawtx,
        "sequence": args.sequence,
        "hashblock": args.hashblock,
    }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: run_replay(
                    blocks,
                    endpoints=endpoints,
                    rate=args.rate,
                    loop=not args.once,
                    hwm=args.hwm,
                    block_pause=args.block_pause,
                    burst=args.burst,
                    task_status=task_status,
                )
            )
            for topic, ep in bound.items():
                print(f"zmqpub{topic}={ep}", file=sys.stderr, flush=True)

    try:
        trio.run(main)
    except (OSError, ValueError, zmq.ZMQError) as exc:
        print(f"fiatprint replay: cannot publish: {exc}", file=sys.stderr)
        return 1
    return 0
