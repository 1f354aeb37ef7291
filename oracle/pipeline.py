"""The decoder actor: feed messages in, window events out.

:func:`run_decoder` sits between the intake and the window. It decodes every
``rawtx`` body with :func:`oracle.decode.parse_tx` and applies the method's
rules that need no window state (inputs, outputs, coinbase, OP_RETURN,
witness size, amount bounds), so the window only has to judge the
same-window parent rule. A body that does not decode is dropped and counted
by reason (``Metrics.decode_errors``: ``tx_truncated``, ``tx_limits``,
``tx_noncanonical``, ``tx_trailing``, ``tx_malformed``) and logged once per
burst; it never stops the actor.

``sequence`` notifications become :class:`~oracle.events.TxAnnounced` (``A``),
:class:`~oracle.events.TxRemoved` (``R``),
:class:`~oracle.events.BlockConnected` with no block (``C``) and
:class:`~oracle.events.BlockDisconnected` (``D``). When a node is reachable
over RPC, the hash of each connected block and every
:class:`~oracle.events.FeedTrouble` also go to the node-sync actor on
``requests``, so that it can fetch the full block (which the window uses to
correct what it inferred from ZMQ alone) or resynchronise after a gap or a
restart. ``hashblock`` carries nothing that ``sequence C`` does not, and is
dropped here.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .decode import DecodeError, parse_tx
from .events import (
    BlockConnected,
    BlockDisconnected,
    FeedMessage,
    FeedTrouble,
    HashBlock,
    RawTx,
    SequenceEvent,
    TxAnnounced,
    TxRemoved,
    TxSeen,
    WindowEvent,
)
from .filter import kept_outputs, reject_reason
from .logging import RateLimitedLog, kv
from .metrics import Metrics

__all__ = ["NodeRequest", "decode_reason", "run_decoder", "to_window_event"]

log = logging.getLogger(__name__)

#: What the decoder asks of the node-sync actor: fetch this block (hash in
#: internal byte order), or resynchronise after this trouble.
NodeRequest = bytes | FeedTrouble

_NO_SEEN: Final[frozenset[bytes]] = frozenset()


def decode_reason(exc: DecodeError) -> str:
    """A metric label for a decoding failure (a handful of fixed values)."""
    what = exc.what
    if what.startswith("truncated"):
        return "tx_truncated"
    if "beyond consensus limits" in what or "larger than the" in what:
        return "tx_limits"
    if "non-canonical" in what:
        return "tx_noncanonical"
    if "trailing bytes" in what:
        return "tx_trailing"
    return "tx_malformed"


def to_window_event(msg: FeedMessage) -> WindowEvent | None:
    """The window event for one feed message, or None if it carries none.

    Raises:
      DecodeError: a ``rawtx`` body that is not one well-formed transaction.
    """
    if isinstance(msg, RawTx):
        tx = parse_tx(msg.body)
        reject = reject_reason(tx, _NO_SEEN)
        kept = () if reject is not None else tuple(kept_outputs(tx))
        return TxSeen(tx, msg.received, reject, kept, True)
    if isinstance(msg, SequenceEvent):
        if msg.label == "A":
            return TxAnnounced(msg.hash, msg.mempool_seq, msg.received)
        if msg.label == "R":
            return TxRemoved(msg.hash, msg.received)
        if msg.label == "C":
            return BlockConnected(msg.hash, None, None, msg.received)
        if msg.label == "D":
            return BlockDisconnected(msg.hash, msg.received)
        return None
    if isinstance(msg, FeedTrouble):
        return msg
    if isinstance(msg, HashBlock):
        return None
    return None


async def run_decoder(
    inp: trio.MemoryReceiveChannel[FeedMessage],
    out: trio.MemorySendChannel[WindowEvent],
    *,
    requests: trio.MemorySendChannel[NodeRequest] | None = None,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Decode feed messages from ``inp`` and send window events on ``out``.

    Args:
      inp: the intake's output.
      out: the window's input. When it is full the decoder blocks, which in
        turn blocks the intake (see :func:`oracle.intake.run_intake`).
      requests: the node-sync actor's input, or None without RPC. Block
        hashes (``sequence C``) and feed troubles are sent with
        ``send_nowait``: when it is full the request is dropped and logged,
        because a stuck node connection must not stall the live feed (node
        sync resynchronises from the node's state anyway).
      metrics: ``decode_errors`` is counted here.

    Returns when ``inp`` is closed (and then closes ``out``). On
    cancellation a message being decoded is lost.
    """
    warn = RateLimitedLog(log, key_fields=("reason",))
    task_status.started()
    try:
        async with inp, out:
            async for msg in inp:
                try:
                    event = to_window_event(msg)
                except DecodeError as exc:
                    reason = decode_reason(exc)
                    if metrics is not None:
                        metrics.decode_errors.labels(reason).inc()
                    warn.warning(
                        "rawtx_decode_error",
                        reason=reason,
                        offset=exc.offset,
                        what=exc.what,
                    )
                    continue
                if event is None:
                    continue
                await out.send(event)
                if requests is None:
                    continue
                request: NodeRequest | None = None
                if isinstance(event, BlockConnected):
                    request = event.hash
                elif isinstance(event, FeedTrouble):
                    request = event
                if request is not None:
                    try:
                        requests.send_nowait(request)
                    except trio.WouldBlock:
                        warn.warning("node_request_dropped", reason="queue_full")
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        warn.warning("node_request_dropped", reason="closed")
    finally:
        warn.flush(force=True)
        log.debug(kv("decoder_stopped"))
