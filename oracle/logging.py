"""Log set-up for the service and a helper for once-per-burst warnings.

Log lines are an event name followed by ``key=value`` fields::

    zmq_gap topic=rawtx expected=812 got=905

:func:`setup_logging` installs one handler on the root logger, writing either
that line after a UTC timestamp, the level and the logger name (``text``) or
one JSON object per line (``json``) whose ``event`` and ``fields`` are parsed
from the message. :func:`kv` formats fields with quoting so the JSON side can
parse them back.

:class:`RateLimitedLog` keeps a repeated problem (a malformed message every
millisecond, a client that keeps misbehaving) to one line per burst: the
first occurrence is logged, the rest within ``interval`` seconds are counted,
and the count is reported as ``suppressed=N`` on the next line for the same
key or by :meth:`RateLimitedLog.flush`.

This module shares its name with the standard library's ``logging``, which
it imports; that works because the package is imported as ``oracle``. Run
the command as ``fiatprint`` or ``python -m oracle.cli``: running a file
inside ``oracle/`` as a script puts this directory first on ``sys.path`` and
this module then shadows the standard one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Final

import attrs

__all__ = [
    "JsonFormatter",
    "RateLimitedLog",
    "TextFormatter",
    "kv",
    "parse_fields",
    "setup_logging",
]

_FIELD_RE: Final = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')
_PLAIN_RE: Final = re.compile(r'[^\s"=\\]+')


def _quote(value: object) -> str:
    text = str(value)
    if text and _PLAIN_RE.fullmatch(text):
        return text
    return json.dumps(text)


def kv(event: str, **fields: object) -> str:
    """``kv("zmq_gap", topic="rawtx", got=905)`` -> ``zmq_gap topic=rawtx got=905``.

    Values with spaces, quotes, ``=`` or nothing at all are JSON-quoted.
    """
    parts = [event]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
    return " ".join(parts)


def parse_fields(message: str) -> tuple[str, dict[str, str]]:
    """Split ``"event k=v k2=\\"a b\\""`` into the event and its fields.

    The event is the first word; a message that does not follow the
    convention comes back whole as the event with no fields.
    """
    head, _, rest = message.partition(" ")
    if "=" in head:
        return message, {}
    fields: dict[str, str] = {}
    for m in _FIELD_RE.finditer(rest):
        raw = m.group(2)
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:
                pass
        fields[m.group(1)] = raw
    return head, fields


def _utc(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-04T15:30:00.123Z WARNING oracle.intake zmq_gap topic=rawtx``.

    An exception's traceback follows on the next lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``event``,
    ``fields`` (parsed ``key=value`` pairs, values as strings), ``message``
    and, with an exception, ``exception`` (the formatted traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, fields = parse_fields(message)
        obj: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "event": event,
            "fields": fields,
            "message": message,
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


#: Bursts remembered at once; beyond this, bursts that are over are flushed.
_MAX_BURSTS: Final = 1024

_HANDLER_MARK: Final = "_fiatprint_handler"


def setup_logging(
    level: str = "INFO", fmt: str = "text", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send all logging to ``stream`` (default stderr) in format ``fmt``.

    ``level`` is a level name (any case); ``fmt`` is ``text`` or ``json``.
    Calling it again replaces the handler it installed before (other
    handlers are left alone). Returns the handler.

    Raises:
        ValueError: for an unknown level or format.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    formatter: logging.Formatter
    if fmt == "text":
        formatter = TextFormatter()
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Third-party chatter at INFO (hypercorn's per-request lines) stays out.
    for noisy in ("hypercorn.access",):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    return handler


@attrs.define
class _Burst:
    started: float
    suppressed: int = 0
    level: int = logging.WARNING
    line: str = ""


@attrs.define(eq=False)
class RateLimitedLog:
    """Log a repeated event at most once per ``interval`` seconds per key.

    Usage::

        _warn = RateLimitedLog(log)
        _warn.warning("decode_error", reason="bad_varint", topic="rawtx")

    The first call for a key logs ``decode_error reason=bad_varint
    topic=rawtx``; further calls within ``interval`` seconds are only
    counted. The first call after the interval logs again with
    ``suppressed=N`` (how many were not logged) and starts a new burst.
    :meth:`flush` logs the pending counts of bursts that are over, so a
    count is not lost when the problem simply stops; call it from a periodic
    task or at shutdown (``force=True`` also closes bursts still running).

    The key is the event name plus the values of ``key_fields`` (default:
    all fields), so ``decode_error reason=a`` and ``reason=b`` are separate
    bursts. ``clock`` returns seconds; pass ``trio.current_time`` to follow
    trio's (possibly virtual) clock. At most about a thousand keys are
    remembered: when more are live, finished bursts are flushed early. Not
    thread-safe; use one per task or
    from the trio thread only.
    """

    logger: logging.Logger
    interval: float = 60.0
    clock: Callable[[], float] = time.monotonic
    key_fields: tuple[str, ...] | None = None
    _bursts: dict[tuple[object, ...], _Burst] = attrs.field(factory=dict, init=False)

    def log(self, level: int, event: str, **fields: object) -> bool:
        """Log or count one occurrence; True if a line was written."""
        if self.key_fields is None:
            key = (event, *sorted((k, str(v)) for k, v in fields.items()))
        else:
            key = (event, *(str(fields.get(k)) for k in self.key_fields))
        now = self.clock()
        if len(self._bursts) >= _MAX_BURSTS:
            self.flush()
        burst = self._bursts.get(key)
        line = kv(event, **fields)
        if burst is not None and now - burst.started < self.interval:
            burst.suppressed += 1
            burst.level, burst.line = level, line
            return False
        if burst is not None and burst.suppressed:
            line = kv(event, **fields, suppressed=burst.suppressed)
        self._bursts[key] = _Burst(started=now, level=level, line=kv(event, **fields))
        self.logger.log(level, "%s", line)
        return True

    def debug(self, event: str, **fields: object) -> bool:
        return self.log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: object) -> bool:
        return self.log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: object) -> bool:
        return self.log(logging.WARNING, event, **fields)

    def error(self, event: str, **fields: object) -> bool:
        return self.log(logging.ERROR, event, **fields)

    def flush(self, *, force: bool = False) -> int:
        """Log the suppressed count of every burst that is over.

        A burst is over when ``interval`` has passed since its first line;
        with ``force`` every burst counts as over. Each flushed line repeats
        the last suppressed occurrence's fields plus ``suppressed=N``.
        Returns how many lines were written.
        """
        now = self.clock()
        written = 0
        for key, burst in list(self._bursts.items()):
            if not force and now - burst.started < self.interval:
                continue
            if burst.suppressed:
                self.logger.log(
                    burst.level, "%s suppressed=%d", burst.line, burst.suppressed
                )
                written += 1
            del self._bursts[key]
        return written
