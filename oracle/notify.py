"""systemd's notification protocol (sd_notify), without a dependency.

Under a unit with ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a
datagram unix socket (a path, or an abstract name written with a leading
``@``) and the service sends newline-separated ``KEY=value`` lines to it:

- ``READY=1`` once the service is really serving (the service calls
  :func:`notify_ready` after its HTTP listeners are bound and its ZMQ
  sockets subscribed); until then ``systemctl start`` waits;
- ``STATUS=...`` a line ``systemctl status`` shows;
- ``WATCHDOG=1`` pings: with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC``
  and restarts the service when no ping arrives in time. :func:`run_watchdog`
  pings at half that interval, but only while a health check passes, so a
  service whose node feed has gone stale is restarted by systemd;
- ``STOPPING=1`` when shutting down.

Without ``NOTIFY_SOCKET`` (not under systemd) every call is a no-op that
returns False. A send that fails (socket gone, queue full) is logged once
per burst and returns False; it never raises and never blocks.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Final

import attrs
import trio

from .logging import RateLimitedLog

__all__ = [
    "Notifier",
    "default_notifier",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "run_watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)

#: Shown while pings are withheld because the health check fails.
UNHEALTHY_STATUS: Final = "feed unhealthy: watchdog pings withheld"


def _address(raw: str | None) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    _warn.warning("notify_socket_unsupported", address=raw)
    return None


@attrs.define(eq=False)
class Notifier:
    """Sends notifications to one socket address (None: disabled).

    ``address`` is ``NOTIFY_SOCKET`` as systemd writes it: an absolute path
    or ``@name`` for an abstract socket; other forms (``vsock:``) are not
    supported and disable the notifier with a warning. The socket is opened
    on first use. Remembers the last ``STATUS=`` text so the watchdog can
    restore it.
    """

    address: str | None
    _target: str | bytes | None = attrs.field(init=False)
    _sock: socket.socket | None = attrs.field(init=False, default=None)
    last_status: str | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._target = _address(self.address)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for ``environ["NOTIFY_SOCKET"]`` (disabled if unset)."""
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True if it was sent.

        Never blocks: the socket is non-blocking, and a full queue or any
        other error drops the message (logged ``notify_failed``, once per
        burst).
        """
        if self._target is None:
            return False
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._sock.setblocking(False)
            self._sock.sendto(data, self._target)
        except OSError as e:
            _warn.warning("notify_failed", address=self.address, error=e)
            return False
        for line in lines:
            if line.startswith("STATUS="):
                self.last_status = line[len("STATUS=") :]
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with ``STATUS=`` in the same datagram if given."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={status}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """``STATUS=text``; newlines in ``text`` become spaces."""
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """``STOPPING=1``."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """One ``WATCHDOG=1`` ping."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; a later send opens it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_default: Notifier | None = None


def default_notifier() -> Notifier:
    """The process's notifier, made from ``os.environ`` on first use."""
    global _default
    if _default is None:
        _default = Notifier.from_environ()
    return _default


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd the service is ready; see :meth:`Notifier.ready`.

    Call only once every listener is bound and the feed is subscribed.
    """
    return default_notifier().ready(status)


def notify_status(text: str) -> bool:
    """Set the status line ``systemctl status`` shows."""
    return default_notifier().status(text)


def notify_stopping() -> bool:
    """Tell systemd the service is shutting down."""
    return default_notifier().stopping()


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between pings: half of ``WATCHDOG_USEC``, or None.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer (logged),
    or when ``WATCHDOG_PID`` is set to another process's id (the variable
    was inherited, the watchdog is not ours).
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        _warn.warning("watchdog_usec_invalid", value=raw)
        return None
    return usec / 2 / 1_000_000


async def run_watchdog(
    is_healthy: Callable[[], bool],
    *,
    notifier: Notifier | None = None,
    interval: float | None = None,
    environ: Mapping[str, str] = os.environ,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the systemd watchdog while ``is_healthy()`` returns True.

    ``interval`` defaults to :func:`watchdog_interval` of ``environ``; when
    there is no watchdog the function reports ready and returns at once.
    Otherwise it checks health immediately and then every ``interval``
    seconds (trio's clock), sending ``WATCHDOG=1`` when healthy. When the
    check fails (returns false or raises) no ping is sent, and on that
    transition ``STATUS=`` :data:`UNHEALTHY_STATUS` is sent and
    ``watchdog_withheld`` logged; on recovery the status line shown before
    is sent again. Runs until cancelled; cancellation sends nothing.
    """
    notifier = notifier if notifier is not None else default_notifier()
    if interval is None:
        interval = watchdog_interval(environ)
    task_status.started()
    if interval is None:
        return
    healthy_before = True
    previous_status: str | None = None
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.warning("watchdog_health_check_failed", exc_info=True)
            healthy = False
        if healthy:
            if not healthy_before:
                log.warning("watchdog_resumed")
                if previous_status is not None:
                    notifier.status(previous_status)
            notifier.watchdog()
        elif healthy_before:
            log.warning("watchdog_withheld reason=unhealthy")
            previous_status = notifier.last_status
            notifier.status(UNHEALTHY_STATUS)
        healthy_before = healthy
        await trio.sleep(interval)
