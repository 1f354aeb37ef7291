"""The node-sync actor: the window's confirmed baseline, fetched over RPC.

ZMQ alone tells the window which transactions a block confirmed only when
their ``rawtx`` repeats arrived, and says nothing about the blocks mined
before the service started. :func:`run_node_sync` fills both gaps:

* At start it loads every block whose header time is within
  ``settings.window_seconds`` of now, walking back from the node's tip, and
  sends them to the window as :class:`~oracle.events.BlockConnected` (with
  the decoded block and its height) in height order.
* For each block hash the decoder forwards (``sequence C``) it fetches the
  block and sends it the same way, so the window knows exactly what the block
  confirmed. A block already sent is not sent twice; a hash that skips
  heights first brings the missing blocks (up to :data:`MAX_GAP_FILL`, beyond
  which the baseline is reloaded).
* After a :class:`~oracle.events.FeedTrouble` (a counter gap, a node restart,
  a silent feed) it sends :class:`~oracle.events.Resync` and reloads the
  baseline rather than trust a window that may have missed blocks.
* If the node is down, starting, syncing or refuses us, it retries with
  exponential backoff (1 s doubling to ``backoff_max``) and reports a
  :class:`~oracle.events.StatusChange` for component ``"node"``; it never
  raises for anything the node does.

Channels:

* ``requests`` is read by a task of its own that never blocks the sender:
  requests queue in memory (up to :data:`MAX_PENDING`; beyond that they are
  dropped and a full reload is scheduled, which covers them).
* ``window_in`` is sent to with a blocking ``send``: when the window is
  behind, node sync waits; blocks are never dropped.
* ``status_out`` (optional) gets status changes with ``send_nowait``; when it
  is full the change is dropped and logged (the latest status is always in
  :class:`NodeSyncState`, which ``task_status.started`` hands to the caller).

Header times are not monotonic in height: the walk back stops at the first
block older than the window, so a block just past that point whose time
happens to fall inside the window is left out. The walk also stops after
:func:`max_baseline_blocks` blocks, so a wrong clock cannot make it load the
whole chain.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from .config import Settings
from .decode import Block, DecodeError, parse_block
from .events import (
    BlockConnected,
    BlockDisconnected,
    FeedTrouble,
    Resync,
    SequenceEvent,
    StatusChange,
    Update,
    WindowEvent,
)
from .logging import kv
from .metrics import Metrics
from .rpc import (
    AuthenticationFailed,
    CredentialsMissing,
    NodeSyncing,
    NodeUnreachable,
    RpcCallError,
    RpcClient,
    RpcError,
    WrongNetwork,
    ZmqTopicsMissing,
    zmq_conf_lines,
)

__all__ = [
    "MAX_GAP_FILL",
    "MAX_PENDING",
    "NodeRequest",
    "NodeSyncState",
    "max_baseline_blocks",
    "run_node_sync",
]

log = logging.getLogger(__name__)

#: What node sync accepts on ``requests``: a connected block's hash (internal
#: byte order), a feed trouble, or a ``sequence`` event / disconnection.
NodeRequest = bytes | FeedTrouble | SequenceEvent | BlockDisconnected
#: Requests held in memory before they are replaced by one full reload.
MAX_PENDING: Final = 1000
#: Missing heights fetched before a new block; a larger jump reloads.
MAX_GAP_FILL: Final = 6
#: Blocks fetched at once.
DEFAULT_CONCURRENCY: Final = 4
_BACKOFF_START: Final = 1.0


def max_baseline_blocks(window_seconds: float) -> int:
    """The most blocks a baseline loads: three times the expected count + 12."""
    return 3 * math.ceil(window_seconds / 600.0) + 12


@attrs.define(eq=False)
class NodeSyncState:
    """What node sync is doing, for health checks. Updated in place.

    ``status`` is one of ``starting``, ``loading``, ``ok``, ``degraded``
    (baseline loaded but the node does not publish a ZMQ topic we need),
    ``down`` (unreachable), ``syncing`` (initial block download or warm-up),
    ``error`` (credentials, network or protocol: needs a fix, still retried).
    """

    status: str = "starting"
    detail: str = ""
    tip_height: int | None = None
    baseline_blocks: int = 0
    blocks_sent: int = 0
    reloads: int = 0
    dropped_requests: int = 0

    def statistics(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _status_for(exc: RpcError) -> str:
    if isinstance(exc, NodeUnreachable):
        return "down"
    if isinstance(exc, NodeSyncing) or (
        isinstance(exc, RpcCallError) and exc.retryable
    ):
        return "syncing"
    return "error"


def _raise_first_rpc_error(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise the first :class:`RpcError` in ``group`` on its own, if any.

    Concurrent fetches fail together; the retry logic wants one error to
    report, not a group. Groups without one (cancellation) are left alone.
    """
    matched = group.subgroup(RpcError)
    if matched is None:
        return
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    raise first from None


class _ReloadNeeded(Exception):
    """Internal: the live chain cannot be followed block by block."""


@attrs.define(eq=False)
class _NodeSync:
    rpc: RpcClient
    window_in: trio.MemorySendChannel[WindowEvent]
    settings: Settings
    metrics: Metrics | None
    status_out: trio.MemorySendChannel[Update] | None
    now: Callable[[], float]
    concurrency: int
    backoff_max: float
    state: NodeSyncState = attrs.field(factory=NodeSyncState)
    pending: collections.deque[NodeRequest] = attrs.field(factory=collections.deque)
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    reload: bool = True
    resync_reason: str | None = None
    closed: bool = False
    #: display hash -> height of every block sent since the last (re)load.
    sent: dict[bytes, int] = attrs.field(factory=dict)
    last_height: int | None = None

    # ------------------------------------------------------------ status

    def set_status(self, status: str, detail: str = "") -> None:
        st = self.state
        if (status, detail) == (st.status, st.detail):
            return
        st.status, st.detail = status, detail
        level = logging.INFO if status in ("loading", "ok") else logging.WARNING
        if status == "error":
            level = logging.ERROR
        log.log(level, "%s", kv("node_status", status=status, detail=detail))
        if self.status_out is not None:
            try:
                self.status_out.send_nowait(
                    StatusChange("node", status, detail, time.time())
                )
            except trio.WouldBlock:
                log.warning("%s", kv("node_status_dropped", status=status))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    # ------------------------------------------------------------ requests

    async def read_requests(
        self, requests: trio.MemoryReceiveChannel[NodeRequest]
    ) -> None:
        async with requests:
            async for req in requests:
                if len(self.pending) >= MAX_PENDING:
                    self.state.dropped_requests += len(self.pending) + 1
                    self.pending.clear()
                    self.reload = True
                    self.resync_reason = "node sync fell behind its requests"
                    log.warning(
                        "%s", kv("node_requests_overflow", dropped=MAX_PENDING + 1)
                    )
                else:
                    self.pending.append(req)
                self.wakeup.set()
        self.closed = True
        self.wakeup.set()

    # ------------------------------------------------------------ RPC helpers

    async def fetch(self, height: int | None, block_hash: str) -> Block:
        raw = await self.rpc.raw_block(block_hash)
        try:
            block = parse_block(raw)
        except DecodeError as exc:
            if self.metrics is not None:
                self.metrics.decode_errors.labels("block_rpc").inc()
            raise RpcError(
                f"block {block_hash} from the node does not decode: {exc}"
            ) from None
        if block.hash_hex != block_hash:
            raise RpcError(f"the node returned another block for {block_hash}")
        return block

    async def send_block(self, height: int, block: Block) -> None:
        await self.window_in.send(
            BlockConnected(block.header.hash, block, height, time.time())
        )
        self.sent[block.header.hash] = height
        self.last_height = height
        self.state.blocks_sent += 1
        self.state.tip_height = height

    # ------------------------------------------------------------ baseline

    async def check_node(self) -> str | None:
        """Check the node; return a ZMQ problem (bitcoin.conf lines) or None."""
        s = self.settings
        topics = ["rawtx", "sequence"] + (["hashblock"] if s.zmq_hashblock else [])
        endpoints = {
            "rawtx": s.zmq_rawtx,
            "sequence": s.zmq_sequence,
            "hashblock": s.zmq_hashblock,
        }
        try:
            info = await self.rpc.check(
                network=s.network, zmq_topics=topics, zmq_endpoints=endpoints
            )
        except ZmqTopicsMissing as exc:
            log.error(
                "%s",
                kv(
                    "node_zmq_missing",
                    topics=",".join(exc.missing),
                    add=" ".join(zmq_conf_lines(exc.missing, endpoints)),
                ),
            )
            return str(exc)
        for topic in topics:
            ours, theirs = endpoints[topic] or "", info.zmq.get(topic, "")
            if ours.rsplit(":", 1)[-1] != theirs.rsplit(":", 1)[-1]:
                # Different ports cannot be the same socket (a different host
                # may be: the node may bind 0.0.0.0 where we connect to
                # 127.0.0.1), so this is most likely a misconfiguration.
                log.warning(
                    "%s",
                    kv("node_zmq_port_differs", topic=topic, node=theirs, ours=ours),
                )
        return None

    async def load_baseline(self) -> None:
        zmq_problem = await self.check_node()
        self.set_status("loading", "finding the blocks of the window")
        tip = int(await self.rpc.call("getblockcount"))
        cutoff = self.now() - self.settings.window_seconds
        limit = max_baseline_blocks(self.settings.window_seconds)
        wanted: list[tuple[int, str]] = []
        height = tip
        while height >= 0 and len(wanted) < limit:
            block_hash = str(await self.rpc.call("getblockhash", height))
            header = await self.rpc.call("getblockheader", block_hash)
            if int(header["time"]) < cutoff:
                break
            wanted.append((height, block_hash))
            height -= 1
        wanted.reverse()
        log.info(
            "%s",
            kv("node_baseline_start", tip=tip, blocks=len(wanted), cutoff=int(cutoff)),
        )
        self.set_status("loading", f"fetching {len(wanted)} blocks")
        blocks: dict[int, Block] = {}
        limiter = trio.CapacityLimiter(max(1, self.concurrency))
        step = max(1, len(wanted) // 10)

        async def one(h: int, bh: str) -> None:
            async with limiter:
                blocks[h] = await self.fetch(h, bh)
            if len(blocks) % step == 0 or len(blocks) == len(wanted):
                log.info(
                    "%s",
                    kv("node_baseline_progress", fetched=len(blocks), of=len(wanted)),
                )

        try:
            async with trio.open_nursery() as nursery:
                for h, bh in wanted:
                    nursery.start_soon(one, h, bh)
        except BaseExceptionGroup as group:
            _raise_first_rpc_error(group)
            raise
        if self.state.blocks_sent:
            self.state.reloads += 1
        if self.resync_reason is not None:
            await self.window_in.send(Resync(self.resync_reason, time.time()))
            self.resync_reason = None
        self.sent.clear()
        self.last_height = None
        for h, _bh in wanted:
            await self.send_block(h, blocks[h])
        self.state.baseline_blocks = len(wanted)
        self.state.tip_height = tip
        log.info("%s", kv("node_baseline_done", tip=tip, blocks=len(wanted)))
        if zmq_problem is not None:
            self.set_status("degraded", zmq_problem)
        else:
            self.set_status("ok", f"following the node at height {tip}")

    # ------------------------------------------------------------ live

    async def connected(self, block_hash: bytes) -> None:
        if block_hash in self.sent:
            return
        display = block_hash[::-1].hex()
        try:
            header = await self.rpc.call("getblockheader", display)
        except RpcCallError as exc:
            if exc.code == -5:
                log.warning("%s", kv("node_block_unknown", hash=display))
                return
            raise
        height = int(header["height"])
        if self.last_height is not None and height > self.last_height + 1:
            missing = range(self.last_height + 1, height)
            if len(missing) > MAX_GAP_FILL:
                raise _ReloadNeeded(f"{len(missing)} blocks missed before {display}")
            for h in missing:
                bh = str(await self.rpc.call("getblockhash", h))
                await self.send_block(h, await self.fetch(h, bh))
        await self.send_block(height, await self.fetch(height, display))

    async def disconnected(self, block_hash: bytes) -> None:
        height = self.sent.pop(block_hash, None)
        await self.window_in.send(BlockDisconnected(block_hash, time.time()))
        if height is not None and height == self.last_height:
            self.last_height = height - 1

    async def handle(self, req: NodeRequest) -> None:
        if isinstance(req, bytes):
            await self.connected(req)
        elif isinstance(req, FeedTrouble):
            self.reload = True
            self.resync_reason = f"{req.kind}: {req.topic}: {req.detail}"
        elif isinstance(req, SequenceEvent):
            if req.label == "C":
                await self.connected(req.hash)
            elif req.label == "D":
                await self.disconnected(req.hash)
        elif isinstance(req, BlockDisconnected):
            await self.disconnected(req.hash)

    async def work(self) -> None:
        backoff = _BACKOFF_START
        while True:
            try:
                if self.reload:
                    again = self.state.blocks_sent > 0
                    if again and self.resync_reason is None:
                        self.resync_reason = "reload"
                    # Requests queued so far are covered by the reload.
                    self.pending.clear()
                    await self.load_baseline()
                    self.reload = False
                while self.pending and not self.reload:
                    await self.handle(self.pending[0])
                    self.pending.popleft()
                backoff = _BACKOFF_START
            except _ReloadNeeded as exc:
                log.warning("%s", kv("node_reload", reason=str(exc)))
                self.reload = True
                self.resync_reason = str(exc)
                continue
            except (KeyError, TypeError, ValueError) as exc:
                # A malformed answer from the node: treat as a protocol error.
                self.set_status("error", f"unexpected answer from the node: {exc!r}")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            except RpcError as exc:
                self.set_status(_status_for(exc), str(exc))
                if isinstance(exc, AuthenticationFailed | CredentialsMissing):
                    log.debug("%s", kv("node_retry_after_auth_failure"))
                elif isinstance(exc, WrongNetwork):
                    log.debug("%s", kv("node_retry_after_wrong_network"))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.info("%s", kv("node_sync_stopped", reason="window closed"))
                return
            except Exception as exc:
                # A bug here must not take the service down: report it,
                # start again from a fresh baseline.
                log.exception("%s", kv("node_sync_failure", error=repr(exc)))
                self.set_status("error", f"internal failure: {exc!r}")
                self.reload = True
                self.resync_reason = "node sync failure"
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if self.closed and not self.pending:
                return
            if not self.pending and not self.reload:
                self.wakeup = trio.Event()
                if self.pending or self.reload or self.closed:
                    continue
                await self.wakeup.wait()


async def run_node_sync(
    rpc: RpcClient,
    requests: trio.MemoryReceiveChannel[NodeRequest],
    window_in: trio.MemorySendChannel[WindowEvent],
    *,
    settings: Settings,
    metrics: Metrics | None = None,
    status_out: trio.MemorySendChannel[Update] | None = None,
    now: Callable[[], float] = time.time,
    concurrency: int = DEFAULT_CONCURRENCY,
    backoff_max: float = 60.0,
    task_status: trio.TaskStatus[NodeSyncState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the window's confirmed blocks in step with the node (see module).

    Args:
      rpc: the node's RPC client.
      requests: hashes of connected blocks (internal byte order) and feed
        troubles from the decoder; ``SequenceEvent`` and
        ``BlockDisconnected`` are accepted too (a ``D`` is forwarded to the
        window as ``BlockDisconnected``).
      window_in: the window's input; sent to with a blocking ``send``.
      settings: ``network``, ``window_seconds`` and the ZMQ endpoints (for
        the bitcoin.conf lines printed when the node lacks a topic).
      metrics: ``decode_errors["block_rpc"]`` counts blocks that do not decode.
      status_out: where :class:`~oracle.events.StatusChange` for component
        ``"node"`` go (``send_nowait``; dropped and logged when full).
      now: the wall clock for the window's cut-off (tests pass a fixed time).
      concurrency: blocks fetched at once while loading.
      backoff_max: the longest wait between retries, in seconds.

    ``task_status.started`` is called at once with the live
    :class:`NodeSyncState`, before the node is reached: the service starts
    even when the node is down.

    Returns when ``requests`` is closed and every queued request is handled
    (``window_in`` is not closed: the decoder owns the window's input too).
    Cancellation: a block being fetched or sent is abandoned; the window may
    have received part of a baseline, which the next start reloads.
    """
    sync = _NodeSync(
        rpc=rpc,
        window_in=window_in,
        settings=settings,
        metrics=metrics,
        status_out=status_out,
        now=now,
        concurrency=concurrency,
        backoff_max=backoff_max,
    )
    task_status.started(sync.state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync.read_requests, requests)
        await sync.work()
        nursery.cancel_scope.cancel()
