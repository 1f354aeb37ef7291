"""Log lines: the event format, the JSON formatter, once-per-burst warnings."""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio

from oracle.logging import (
    RateLimitedLog,
    TextFormatter,
    kv,
    parse_fields,
    setup_logging,
)


def test_kv_quotes_only_what_needs_it() -> None:
    assert kv("zmq_gap", topic="rawtx", expected=812, got=905) == (
        "zmq_gap topic=rawtx expected=812 got=905"
    )
    assert kv("e", error="no such file", empty="", eq="a=b") == (
        'e error="no such file" empty="" eq="a=b"'
    )


def test_parse_fields_reads_back_kv() -> None:
    line = kv("history_write_failed", path="/var/lib/x y", error='say "no"', n=3)
    assert parse_fields(line) == (
        "history_write_failed",
        {"path": "/var/lib/x y", "error": 'say "no"', "n": "3"},
    )
    assert parse_fields("free text without fields") == (
        "free",
        {},
    )
    assert parse_fields("a=b c=d") == ("a=b c=d", {})


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(restore_root_logger) -> None:
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    logging.getLogger("oracle.test").warning(kv("zmq_gap", topic="rawtx", got=905))
    obj = json.loads(out.getvalue())
    assert obj["level"] == "WARNING"
    assert obj["logger"] == "oracle.test"
    assert obj["event"] == "zmq_gap"
    assert obj["fields"] == {"topic": "rawtx", "got": "905"}
    assert obj["message"] == "zmq_gap topic=rawtx got=905"
    assert obj["time"].endswith("Z")


def test_text_lines_and_replacing_the_handler(restore_root_logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", stream=first)
    handler = setup_logging("warning", "text", stream=second)
    log = logging.getLogger("oracle.test")
    log.info("not_shown")
    log.warning("shown a=1")
    assert first.getvalue() == ""
    line = second.getvalue()
    assert line.endswith(" WARNING oracle.test shown a=1\n")
    assert isinstance(handler.formatter, TextFormatter)
    ours = [h for h in logging.getLogger().handlers if hasattr(h, "_fiatprint_handler")]
    assert ours == [handler]


def test_setup_logging_rejects_unknown_level_and_format() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup_logging("loud")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging("INFO", "xml")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_rate_limited_once_per_burst_with_count(autojump_clock) -> None:
    log = logging.getLogger("oracle.test.burst")
    records = _Records()
    log.addHandler(records)
    log.propagate = False
    try:
        warn = RateLimitedLog(log, interval=60.0, clock=trio.current_time)
        with trio.fail_after(1000):
            for _ in range(100):  # one burst: 100 in 10 s
                warn.warning("decode_error", reason="tx_truncated")
                await trio.sleep(0.1)
            assert warn.warning("decode_error", reason="tx_limits")  # other key
            await trio.sleep(60)
            assert warn.warning("decode_error", reason="tx_truncated")
            warn.warning("decode_error", reason="tx_truncated")
            assert warn.flush() == 0  # the new burst is still running
            await trio.sleep(61)
            assert warn.flush() == 1
            assert warn.flush(force=True) == 0
    finally:
        log.removeHandler(records)
        log.propagate = True
    assert records.lines == [
        "decode_error reason=tx_truncated",
        "decode_error reason=tx_limits",
        "decode_error reason=tx_truncated suppressed=99",
        "decode_error reason=tx_truncated suppressed=1",
    ]


def test_key_fields_group_bursts_by_chosen_fields() -> None:
    log = logging.getLogger("oracle.test.keys")
    records = _Records()
    log.addHandler(records)
    log.propagate = False
    now = [0.0]
    try:
        warn = RateLimitedLog(log, clock=lambda: now[0], key_fields=("reason",))
        warn.warning("ws_bad_client", reason="too_large", peer="127.0.0.1:1")
        warn.warning("ws_bad_client", reason="too_large", peer="127.0.0.1:2")
        warn.warning("ws_bad_client", reason="not_json", peer="127.0.0.1:3")
        assert warn.flush(force=True) == 1
    finally:
        log.removeHandler(records)
        log.propagate = True
    assert records.lines == [
        "ws_bad_client reason=too_large peer=127.0.0.1:1",
        "ws_bad_client reason=not_json peer=127.0.0.1:3",
        "ws_bad_client reason=too_large peer=127.0.0.1:2 suppressed=1",
    ]
