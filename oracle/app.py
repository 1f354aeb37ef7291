"""The web layer: a quart-trio app served by hypercorn on trio.

Routes (all relative, so the app works under a path prefix behind a proxy):

``/``
    The page (``web/index.html``); its script and style sheet are under
    ``/static/``. Nothing is loaded from anywhere else.
``/ws``
    The WebSocket stream described in ``docs/websocket.md``: a ``snapshot``
    on connect, then ``estimate``, ``points``, ``block``, ``status`` frames
    (and ``gap`` when the client fell behind). Clients may send
    ``{"v": 1, "type": "ping"}`` and get a ``pong``; anything else, any
    message over :data:`MAX_CLIENT_MESSAGE` bytes, or more messages than the
    per-connection rate allows, closes that connection alone and counts in
    ``bad_client_messages``.
``/api/v1/price``
    The latest estimate as JSON (503 with ``price: null`` before the first).
``/health``
    The service's ``health()`` dict plus the fan-out's counts under ``web``;
    503 when its ``status`` is ``"down"`` or ``"error"``.
``/metrics``
    Prometheus text (404 when the app has no metrics).
``/api/v1/history?from=&to=&limit=``
    Stored estimates between two Unix times, oldest first (``to`` defaults
    to now, ``from`` to a day earlier; when more rows match than ``limit``,
    the history's default of 1000, the newest are returned). 404 with a JSON
    error when history is disabled, 400 for bad parameters, 503 when the
    database cannot be read.

The connection limits (:data:`SEND_TIMEOUT`, :data:`PING_INTERVAL`,
:data:`READ_TIMEOUT`, :data:`HYPERCORN_MAX_MESSAGE`) are applied by
:func:`serve_http`. When the app is run by a hypercorn started from its own
command line (``hypercorn oracle.asgi:app``), hypercorn's configuration is
used instead, and a client that stops reading is then never disconnected
(its cost stays bounded as described for :data:`SEND_TIMEOUT`): hypercorn's
own ``--read-timeout`` cannot end a write in progress.

Hypercorn accepts ``permessage-deflate`` whenever a client (every browser)
asks for it and offers no setting to refuse it: such connections compress each
frame with their own compressor, a per-client cost that the shared frames of
:mod:`oracle.fanout` do not avoid.

Hypercorn itself refuses WebSocket messages over
:data:`HYPERCORN_MAX_MESSAGE` bytes before the app sees them; those close the
connection with code 1009 but are not counted in ``bad_client_messages``,
because the app never learns of them.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve
from quart import Response, request, send_from_directory, websocket
from quart_trio import QuartTrio

from .config import Settings
from .fanout import PROTOCOL_VERSION, FanOut, Subscription
from .logging import RateLimitedLog
from .metrics import CONTENT_TYPE, Metrics

__all__ = [
    "HYPERCORN_MAX_MESSAGE",
    "MAX_CLIENT_MESSAGE",
    "PING_INTERVAL",
    "READ_TIMEOUT",
    "SEND_TIMEOUT",
    "create_app",
    "hypercorn_config",
    "serve_http",
]

log = logging.getLogger(__name__)

#: Largest client message the app accepts, in bytes (UTF-8 for text).
MAX_CLIENT_MESSAGE: Final = 4096
#: Hypercorn's own limit on one incoming WebSocket message.
HYPERCORN_MAX_MESSAGE: Final = 65536
#: Hypercorn pings every WebSocket client this often (seconds); browsers
#: answer by themselves.
PING_INTERVAL: Final = 20.0
#: Hypercorn closes a connection from which nothing arrived for this long
#: (seconds); a client that has stopped reading cannot answer pings.
READ_TIMEOUT: Final = 60
#: The kernel aborts a connection whose sent data stays unacknowledged, or
#: whose receive window stays shut, for this long (seconds; Linux
#: ``TCP_USER_TIMEOUT``, set on the listening sockets and inherited by every
#: accepted one). This is what disconnects a WebSocket client that has stopped
#: reading: hypercorn shields its socket writes from cancellation and only
#: acts on its read timeout once the write in flight has finished, so neither
#: the app nor hypercorn can end a write that a client never reads. Until the
#: kernel gives up, such a client holds its subscription (at most
#: ``queue_size`` references to shared frames) and the one frame being written.
#: A client that reads a trickle, just enough to keep the window open, is not
#: caught by this; its cost stays that same bounded amount.
SEND_TIMEOUT: Final = 30.0
#: Seconds a rejected client is read from, and its messages discarded, after
#: its close frame is sent. A client that goes on sending past this without
#: answering the close is left to hypercorn, which stops reading from it: the
#: connection then costs its socket buffers until the client goes away.
BAD_CLIENT_LINGER: Final = 5.0
#: Client message rate: a burst of this many, refilled at this many per second.
CLIENT_BURST: Final = 20
CLIENT_RATE: Final = 5.0
DEFAULT_HISTORY_SPAN: Final = 86400.0
#: Largest ``limit`` a history query may ask for (the history's own bound).
MAX_HISTORY_LIMIT: Final = 10_000

_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)

HealthFn = Callable[[], dict[str, Any]]


class _BadClient(Exception):
    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return Response(
        body,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str) -> Response:
    return _json({"v": PROTOCOL_VERSION, "error": message}, status)


def _parse_time(name: str, raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a Unix time in seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative Unix time")
    return value


def _row(row: Any) -> Any:
    if attrs.has(type(row)):
        return attrs.asdict(row)
    if isinstance(row, tuple):
        return list(row)
    return row


def create_app(
    fanout: FanOut,
    *,
    settings: Settings,
    health: HealthFn,
    metrics: Metrics | None = None,
    history: Any | None = None,
) -> QuartTrio:
    """The Fiatprint web app for one service.

    Args:
      fanout: the running fan-out whose state and updates the app serves.
      settings: ``web_dir`` locates the page.
      health: returns the service's component status; called per ``/health``
        request and must not block. An exception from it gives a 503.
      metrics: served on ``/metrics``; ``bad_client_messages`` is counted here.
      history: an :class:`oracle.history.History`, or any object with
        ``query(start, end[, limit])`` returning rows (dicts, attrs instances
        or tuples) between two Unix times, possibly as a coroutine; it may
        raise ``ValueError`` (answered 400) or anything else (answered 503).
        None disables ``/api/v1/history``.

    The app only reads from ``fanout``; it never publishes to it.
    """
    web_dir = Path(settings.web_dir)
    app = QuartTrio(__name__, static_folder=str(web_dir), static_url_path="/static")
    history_log = RateLimitedLog(log, key_fields=())
    bad_log = RateLimitedLog(log, key_fields=("reason",))

    @app.after_request
    async def _headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.route("/")
    async def index() -> Any:
        response = await send_from_directory(web_dir, "index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.route("/api/v1/price")
    async def price() -> Response:
        est = fanout.latest_estimate
        if est is None:
            return _json(
                {
                    "v": PROTOCOL_VERSION,
                    "price": None,
                    "rough_price": None,
                    "reason": "no estimate yet",
                    "outputs": 0,
                    "points": 0,
                    "spread": None,
                    "band": None,
                    "updated": None,
                    "age": None,
                },
                503,
            )
        age = max(0.0, time.time() - est["updated"])
        return _json({"v": PROTOCOL_VERSION, **est, "age": age})

    @app.route("/health")
    async def health_route() -> Response:
        try:
            body = dict(health())
        except Exception:
            log.exception("health_failed")
            body = {"status": "error", "detail": "health check raised"}
        body["web"] = attrs.asdict(fanout.statistics())
        status = 503 if body.get("status") in ("down", "error") else 200
        return _json(body, status)

    @app.route("/metrics")
    async def metrics_route() -> Response:
        if metrics is None:
            return _error(404, "metrics are disabled")
        return Response(metrics.render(), content_type=CONTENT_TYPE)

    @app.route("/api/v1/history")
    async def history_route() -> Response:
        if history is None:
            return _error(404, "history is disabled (set history_path to enable it)")
        now = time.time()
        try:
            end = _parse_time("to", request.args.get("to"), now)
            start = _parse_time(
                "from", request.args.get("from"), end - DEFAULT_HISTORY_SPAN
            )
        except ValueError as e:
            return _error(400, str(e))
        if start > end:
            return _error(400, "from must not be after to")
        raw_limit = request.args.get("limit")
        args: tuple[Any, ...] = (start, end)
        if raw_limit:
            try:
                limit = int(raw_limit)
            except ValueError:
                return _error(400, "limit must be an integer")
            if not 1 <= limit <= MAX_HISTORY_LIMIT:
                return _error(400, f"limit must be 1 to {MAX_HISTORY_LIMIT}")
            args += (limit,)
        try:
            rows = history.query(*args)
            if inspect.isawaitable(rows):
                rows = await rows
        except ValueError as e:
            return _error(400, str(e))
        except Exception:
            history_log.warning("history_query_failed", start=start, end=end)
            log.debug("history_query_failed", exc_info=True)
            return _error(503, "history could not be read")
        return _json(
            {
                "v": PROTOCOL_VERSION,
                "from": start,
                "to": end,
                "rows": [_row(r) for r in rows],
            }
        )

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        peer = _peer()
        bad: list[_BadClient] = []
        with fanout.subscribe() as sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_client, sub, nursery.cancel_scope, bad)
                await _send_frames(sub)
                nursery.cancel_scope.cancel()
        if bad:
            e = bad[0]
            if metrics is not None:
                metrics.bad_client_messages.inc()
            bad_log.warning("ws_bad_client", reason=e.reason, peer=peer)
            # Keep reading (and discarding) for a moment after the close
            # frame: a client still sending would otherwise find hypercorn no
            # longer reading, and the close handshake could not complete.
            with trio.move_on_after(BAD_CLIENT_LINGER):
                await websocket.close(e.code, e.reason)
                while True:
                    await websocket.receive()

    async def _read_client(
        sub: Subscription, scope: trio.CancelScope, bad: list[_BadClient]
    ) -> None:
        """Drain client messages until one breaks the rules; then record why
        in ``bad`` and cancel ``scope`` (the connection's tasks)."""
        try:
            await _check_client_messages(sub)
        except _BadClient as e:
            bad.append(e)
            scope.cancel()

    async def _check_client_messages(sub: Subscription) -> None:
        tokens = float(CLIENT_BURST)
        last = trio.current_time()
        while True:
            message = await websocket.receive()
            now = trio.current_time()
            tokens = min(CLIENT_BURST, tokens + (now - last) * CLIENT_RATE)
            last = now
            if tokens < 1.0:
                raise _BadClient("rate", 1008)
            tokens -= 1.0
            size = (
                len(message)
                if isinstance(message, bytes)
                else len(message.encode("utf-8", "surrogatepass"))
            )
            if size > MAX_CLIENT_MESSAGE:
                raise _BadClient("too_large", 1009)
            try:
                data = json.loads(message)
            except (ValueError, RecursionError):
                # RecursionError: nesting deeper than the decoder's limit,
                # which 4 KiB of brackets reaches.
                raise _BadClient("not_json", 1008) from None
            if (
                not isinstance(data, dict)
                or data.get("v") != PROTOCOL_VERSION
                or data.get("type") != "ping"
            ):
                raise _BadClient("unknown_message", 1008)
            sub.request_pong()

    async def _send_frames(sub: Subscription) -> None:
        while True:
            try:
                frame = await sub.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            await websocket.send(frame)

    return app


def _peer() -> str:
    client = websocket.scope.get("client")
    if not client:
        return "-"
    return f"{client[0]}:{client[1]}"


class _Config(HypercornConfig):
    """Hypercorn's configuration, with :data:`SEND_TIMEOUT` applied to the
    listening sockets where the platform supports ``TCP_USER_TIMEOUT``."""

    send_timeout: float = SEND_TIMEOUT

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if option is not None:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(
                        socket.IPPROTO_TCP, option, int(self.send_timeout * 1000)
                    )
        return sockets


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """The hypercorn configuration for ``settings.host`` and ``settings.port``
    (port 0 picks a free port). Access logging is off; WebSocket clients are
    pinged every :data:`PING_INTERVAL` seconds and any connection silent for
    :data:`READ_TIMEOUT` seconds is closed; the kernel aborts a connection
    that has not taken data for :data:`SEND_TIMEOUT` seconds (Linux)."""
    config = _Config()
    config.send_timeout = SEND_TIMEOUT
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None
    config.websocket_max_message_size = HYPERCORN_MAX_MESSAGE
    config.graceful_timeout = 1.0
    config.websocket_ping_interval = PING_INTERVAL
    config.read_timeout = int(READ_TIMEOUT)
    return config


async def serve_http(
    app: QuartTrio,
    settings: Settings,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on trio until cancelled.

    Calls ``task_status.started`` with the bound URLs (``http://host:port``,
    the real port when ``settings.port`` is 0) once listening.

    Raises:
      OSError: the address cannot be bound.

    Cancellation closes the listening socket and every connection; WebSocket
    clients see the connection drop and reconnect on their own.
    """
    await serve(app, hypercorn_config(settings), task_status=task_status)
