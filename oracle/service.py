"""The whole service: the actors, wired together, plus the web layer.

:class:`Service` holds what one running service shares (settings, metrics,
fan-out, window, history, node-sync state) and starts the actors with
:meth:`Service.run_pipeline`; :func:`run_service` adds the HTTP server and is
what ``fiatprint serve`` and ``fiatprint demo`` run. ``oracle.asgi`` uses
:meth:`Service.run_pipeline` inside hypercorn's own server instead.

The channels and what happens when each is full::

    intake --(FEED_CHANNEL)--> decoder --(WINDOW_CHANNEL)--> window
                                  |                            ^
                                  '--(NODE_CHANNEL)--> node sync (RPC only)
    window --(UPDATES_CHANNEL)--> distributor --(FANOUT_CHANNEL)--> fan-out
                                       '--(history channel)--> history

* intake -> decoder, :data:`FEED_CHANNEL` messages: the intake blocks. ZMQ
  then queues up to its receive high-water mark and the node drops at its
  send high-water mark, and the counters reveal the loss as a gap. The size
  holds a block announcement's burst of ``rawtx`` (a few thousand).
* decoder (and node sync) -> window, :data:`WINDOW_CHANNEL` events: the
  sender blocks; the window applies an event in microseconds, so this only
  fills while an estimate runs inline.
* decoder -> node sync, :data:`NODE_CHANNEL` requests: ``send_nowait``; a
  request that does not fit is dropped and logged (node sync keeps its own
  queue and reloads when it falls behind, so this does not fill in practice).
* window -> distributor, :data:`UPDATES_CHANNEL` updates: the window never
  waits; an update that does not fit is dropped (an estimate is re-sent at
  the next tick). See :func:`oracle.window.run_window`.
* distributor -> fan-out, :data:`FANOUT_CHANNEL`: a blocking send; the
  fan-out never waits for a client, so it drains at once.
* distributor -> history: ``oracle.history.offer`` (drop the newest when the
  disk stalls).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import attrs
import trio
from quart_trio import QuartTrio

from .app import create_app, serve_http
from .config import Settings
from .events import FeedMessage, StatusChange, Update, WindowEvent
from .fanout import FanOut
from .history import History, offer, open_history_channel, run_history
from .intake import run_intake
from .logging import kv
from .metrics import Metrics
from .nodesync import NodeSyncState, run_node_sync
from .pipeline import NodeRequest, run_decoder
from .window import Window, run_window

__all__ = [
    "FANOUT_CHANNEL",
    "FEED_CHANNEL",
    "NODE_CHANNEL",
    "UPDATES_CHANNEL",
    "WINDOW_CHANNEL",
    "Service",
    "ServiceInfo",
    "rpc_configured",
    "run_service",
]

log = logging.getLogger(__name__)

#: intake -> decoder: feed messages (blocking; see the module docstring).
FEED_CHANNEL: Final = 8192
#: decoder and node sync -> window: window events (blocking).
WINDOW_CHANNEL: Final = 2048
#: decoder -> node sync: block hashes and feed troubles (drop when full).
NODE_CHANNEL: Final = 256
#: window -> distributor: updates (the window never waits; drop when full).
UPDATES_CHANNEL: Final = 512
#: distributor -> fan-out: updates (blocking; the fan-out drains at once).
FANOUT_CHANNEL: Final = 64


def rpc_configured(settings: Settings) -> bool:
    """Whether the settings name a node to reach over RPC."""
    return any(
        v is not None
        for v in (
            settings.rpc_url,
            settings.rpc_user,
            settings.rpc_cookie,
            settings.datadir,
        )
    )


@attrs.frozen
class ServiceInfo:
    """What :func:`run_service` reports once it is listening.

    Attributes:
      urls: the HTTP URLs bound (the real port when ``port`` was 0).
      feed: ZMQ topic -> endpoint subscribed.
      service: the running :class:`Service` (window, fan-out, metrics).
    """

    urls: tuple[str, ...]
    feed: dict[str, str]
    service: Service

    @property
    def url(self) -> str:
        """The first bound URL."""
        return self.urls[0]


@attrs.define(eq=False)
class Service:
    """One service's shared state; the actors run in :meth:`run_pipeline`.

    Args:
      settings: everything configurable.
      metrics: the service's metrics (a fresh registry by default).
      history: an open history (None: as ``settings.history_path`` says,
        opened by :meth:`run_pipeline` and closed when it ends).
      clock: wall-clock time for the window (tests may pass trio's clock).
      initial_window: the window state to start from (a fresh, empty one of
        ``settings.window_seconds`` by default); the demo starts from a
        pre-filled one.
    """

    settings: Settings
    metrics: Metrics = attrs.field(factory=Metrics)
    history: History | None = None
    clock: Any = time.time
    initial_window: Window | None = None
    fanout: FanOut = attrs.field(init=False)
    window: Window | None = attrs.field(init=False, default=None)
    node: NodeSyncState | None = attrs.field(init=False, default=None)
    feed: dict[str, str] = attrs.field(init=False, factory=dict)
    started: float = attrs.field(init=False, factory=time.time)
    _own_history: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.fanout = FanOut(metrics=self.metrics)

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """Component status for ``/health`` and the watchdog; never blocks.

        ``status`` is ``starting`` until the pipeline runs, then ``ok`` when
        the latest estimate has a price, ``degraded`` when it has none or the
        feed or node reports trouble, ``down`` when the node is unreachable.
        """
        est = self.fanout.latest_estimate
        components = dict(self.fanout.status)
        status = "starting" if self.window is None else "ok"
        if status == "ok":
            if est is None or est.get("price") is None:
                status = "degraded"
            feed = components.get("feed", {}).get("status", "ok")
            if feed not in ("ok",):
                status = "degraded"
        node = None
        if self.node is not None:
            node = self.node.statistics()
            if self.node.status == "down":
                status = "down"
            elif self.node.status not in ("ok", "starting", "loading"):
                status = "degraded" if status != "starting" else status
        w = self.window
        return {
            "status": status,
            "uptime": time.time() - self.started,
            "feed": dict(self.feed),
            "components": components,
            "window": None
            if w is None
            else {
                "transactions": len(w),
                "outputs": w.outputs,
                "confirmed_outputs": w.confirmed_outputs,
                "mempool_outputs": w.mempool_outputs,
                "span_seconds": w.span,
            },
            "estimate": est,
            "node": node,
            "zmq": self.metrics.feed_summary(),
        }

    def healthy(self) -> bool:
        """For the systemd watchdog: False while the feed is stale (no ZMQ
        message for ``stale_seconds``) or the node is unreachable, so that
        systemd can restart a service that no longer hears its node."""
        health = self.health()
        feed = health["components"].get("feed", {}).get("status")
        return feed != "stale" and health["status"] != "down"

    def create_app(self) -> QuartTrio:
        """The web app serving this service's fan-out, health and metrics."""
        return create_app(
            self.fanout,
            settings=self.settings,
            health=self.health,
            metrics=self.metrics,
            history=self.history,
        )

    # ------------------------------------------------------------ actors

    async def _distribute(
        self,
        updates: trio.MemoryReceiveChannel[Update],
        fanout_in: trio.MemorySendChannel[Update],
        history_in: trio.MemorySendChannel[Update] | None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        async with updates, fanout_in:
            async for update in updates:
                if history_in is not None:
                    offer(history_in, update, self.history)
                await fanout_in.send(update)
        if history_in is not None:
            await history_in.aclose()

    async def run_pipeline(
        self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every actor (not the HTTP server) and run until cancelled.

        Reports ready (with ``self``) once the intake has subscribed. The
        node-sync actor runs only when :func:`rpc_configured`; it reports
        ready before reaching the node, so the service starts while the node
        is down. Cancellation stops every actor; an open history is closed.

        Raises (possibly wrapped in an ``ExceptionGroup`` by trio):
          oracle.history.HistoryError: the history file cannot be opened.
          zmq.ZMQError: a ZMQ endpoint is not a valid address.
        """
        s = self.settings
        m = self.metrics
        if self.history is None and s.history_path is not None:
            self.history = await History.open(s.history_path)
            self._own_history = True
        try:
            async with trio.open_nursery() as nursery:
                fan_send, fan_recv = trio.open_memory_channel[Update](FANOUT_CHANNEL)
                await nursery.start(self.fanout.run, fan_recv)
                hist_send = None
                if self.history is not None:
                    hist_send, hist_recv = open_history_channel()
                    await nursery.start(
                        lambda task_status: run_history(
                            self.history,  # type: ignore[arg-type]
                            hist_recv,
                            interval=s.history_interval,
                            task_status=task_status,
                        )
                    )
                up_send, up_recv = trio.open_memory_channel[Update](UPDATES_CHANNEL)
                await nursery.start(self._distribute, up_recv, fan_send, hist_send)
                ev_send, ev_recv = trio.open_memory_channel[WindowEvent](WINDOW_CHANNEL)
                self.window = await nursery.start(
                    lambda task_status: run_window(
                        ev_recv,
                        up_send,
                        settings=s,
                        metrics=m,
                        window=self.initial_window,
                        clock=self.clock,
                        task_status=task_status,
                    )
                )
                requests_send = None
                if rpc_configured(s):
                    requests_send, requests_recv = trio.open_memory_channel[
                        NodeRequest
                    ](NODE_CHANNEL)
                    self.node = await nursery.start(
                        self._node_sync, requests_recv, ev_send.clone(), up_send.clone()
                    )
                feed_send, feed_recv = trio.open_memory_channel[FeedMessage](
                    FEED_CHANNEL
                )
                await nursery.start(
                    lambda task_status: run_decoder(
                        feed_recv,
                        ev_send,
                        requests=requests_send,
                        metrics=m,
                        task_status=task_status,
                    )
                )
                self.feed = await nursery.start(
                    lambda task_status: run_intake(
                        s, feed_send, metrics=m, task_status=task_status
                    )
                )
                up_send.send_nowait(
                    StatusChange(
                        "feed",
                        "ok",
                        " ".join(f"{t}={e}" for t, e in self.feed.items()),
                        time.time(),
                    )
                )
                log.info(
                    kv(
                        "pipeline_started",
                        window_seconds=s.window_seconds,
                        rpc=rpc_configured(s),
                        history=s.history_path,
                        **self.feed,
                    )
                )
                task_status.started(self)
        finally:
            if self._own_history and self.history is not None:
                self.history.close()

    async def _node_sync(
        self,
        requests: trio.MemoryReceiveChannel[NodeRequest],
        window_in: trio.MemorySendChannel[WindowEvent],
        status_out: trio.MemorySendChannel[Update],
        task_status: trio.TaskStatus[NodeSyncState] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from .rpc import RpcClient

        rpc = RpcClient.from_settings(self.settings)
        async with window_in, status_out:
            await run_node_sync(
                rpc,
                requests,
                window_in,
                settings=self.settings,
                metrics=self.metrics,
                status_out=status_out,
                task_status=task_status,
            )


async def run_service(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    clock: Any = time.time,
    window: Window | None = None,
    task_status: trio.TaskStatus[ServiceInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole service (actors and HTTP) until cancelled.

    ``window`` is the state to start from (default: empty); ``clock`` the
    wall clock the window uses.

    Calls ``task_status.started`` with a :class:`ServiceInfo` once the
    pipeline runs and the HTTP server listens (``settings.port`` 0 picks a
    free port). Cancellation closes the listener, every connection and every
    actor.

    Raises (each possibly wrapped in an ``ExceptionGroup`` by trio's
    nurseries; ``oracle.service_cli`` unwraps them for the operator):
      OSError: the HTTP address cannot be bound.
      oracle.history.HistoryError: the history file cannot be opened.
      zmq.ZMQError: a ZMQ endpoint is not a valid address.
    """
    service = Service(
        settings, metrics=metrics or Metrics(), clock=clock, initial_window=window
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: service.run_pipeline(task_status=task_status)
        )
        app = service.create_app()
        urls = await nursery.start(serve_http, app, settings)
        log.info(kv("service_listening", urls=",".join(urls)))
        task_status.started(ServiceInfo(tuple(urls), dict(service.feed), service))
