"""The web app under real hypercorn on 127.0.0.1 port 0, with real
trio-websocket clients and a plain HTTP/1.1 client.

Every frame a client receives is validated against
``docs/websocket.schema.json``; prices are compared with ``==`` against the
estimator's float (JSON floats round-trip exactly).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import jsonschema
import pytest
import trio
from test_fanout import (
    BLOCK_818677,
    PRICE_702861,
    PRICE_818677,
    block_updates,
    estimate_at,
)
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from oracle.app import create_app, serve_http
from oracle.config import Settings
from oracle.events import StatusChange
from oracle.fanout import FanOut
from oracle.history import History, HistoryRow
from oracle.metrics import Metrics

SCHEMA = json.loads(
    (Path(__file__).parent.parent / "docs" / "websocket.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def frame(text: str) -> dict[str, Any]:
    """Parse one server frame, failing the test if it breaks the schema."""
    data = json.loads(text)
    VALIDATOR.validate(data)
    return data


@attrs.define
class Server:
    url: str
    fanout: FanOut
    metrics: Metrics

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :] + "/ws"


@asynccontextmanager
async def running(
    fanout: FanOut | None = None,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
    history: Any = None,
    port: int = 0,
) -> AsyncIterator[Server]:
    """The app served by hypercorn until the block ends."""
    fan = fanout if fanout is not None else FanOut(metrics=Metrics())
    metrics = fan.metrics or Metrics()
    settings = Settings(host="127.0.0.1", port=port)
    app = create_app(
        fan,
        settings=settings,
        health=health or (lambda: {"status": "ok"}),
        metrics=metrics,
        history=history,
    )
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve_http, app, settings)
        try:
            yield Server(urls[0], fan, metrics)
        finally:
            nursery.cancel_scope.cancel()


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET; the body is read up to its ``content-length``
    (hypercorn may keep the connection open despite ``Connection: close``)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    target = parts.path + ("?" + parts.query if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed before the headers ended"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed before the body ended"
            body += chunk
    return status, headers, body


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    text = await ws.get_message()
    assert isinstance(text, str)
    return frame(text)


async def test_snapshot_then_updates_with_exact_prices() -> None:
    update, points, event = block_updates()
    update2, points2, event2 = block_updates(BLOCK_818677)
    fan = FanOut()
    fan.publish(update)
    fan.publish(points)
    fan.publish(event)
    with trio.fail_after(20):
        async with running(fan) as server:
            async with open_websocket_url(server.ws_url) as ws:
                snap = await receive(ws)
                assert snap["type"] == "snapshot"
                assert snap["estimate"]["price"] == PRICE_702861
                assert len(snap["points"]) == update.estimate.point_count
                assert snap["blocks"][0]["hash"] == event.hash
                fan.publish(StatusChange("zmq", "ok", "rawtx 12 msg/s", 5.0))
                fan.publish(event2)
                fan.publish(points2)
                fan.publish(update2)
                got = [await receive(ws) for _ in range(4)]
    assert [g["type"] for g in got] == ["status", "block", "points", "estimate"]
    assert [g["seq"] for g in got] == [4, 5, 6, 7]
    assert got[0]["component"] == "zmq" and got[0]["detail"] == "rawtx 12 msg/s"
    assert got[1]["height"] == 818677
    assert len(got[2]["points"]) == update2.estimate.point_count
    first = points2.points[0]
    expected = [first.price, first.sats, first.time, first.txid, True]
    assert got[2]["points"][0] == expected
    assert got[3]["price"] == PRICE_818677
    assert got[3]["rough_price"] == 37378
    assert got[3]["band"] == list(update2.estimate.band)


async def test_ping_gets_pong() -> None:
    with trio.fail_after(20):
        async with running() as server:
            async with open_websocket_url(server.ws_url) as ws:
                assert (await receive(ws))["type"] == "snapshot"
                await ws.send_message('{"v":1,"type":"ping"}')
                assert await receive(ws) == {"v": 1, "type": "pong"}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", 1008),
        ('{"v":1,"type":"subscribe"}', 1008),
        ('{"v":2,"type":"ping"}', 1008),
        (b"\x00\x01", 1008),
        ("x" * 5000, 1009),
    ],
)
async def test_bad_client_message_closes_that_connection_only(
    message: str | bytes, code: int
) -> None:
    update, _, _ = block_updates()
    fan = FanOut()
    with trio.fail_after(20):
        async with running(fan) as server:
            async with open_websocket_url(server.ws_url) as good:
                await receive(good)
                async with open_websocket_url(server.ws_url) as bad:
                    await receive(bad)
                    await bad.send_message(message)
                    with pytest.raises(ConnectionClosed) as info:
                        while True:
                            await bad.get_message()
                    assert info.value.reason.code == code
                fan.publish(update)
                assert (await receive(good))["price"] == PRICE_702861
                assert server.metrics.bad_client_messages._value.get() == 1


async def test_price_endpoint() -> None:
    update, _, _ = block_updates()
    fan = FanOut()
    with trio.fail_after(20):
        async with running(fan) as server:
            status, _, body = await http_get(server.url + "/api/v1/price")
            assert status == 503
            assert json.loads(body)["price"] is None
            fan.publish(estimate_at(update, 1700000000.25))
            status, headers, body = await http_get(server.url + "/api/v1/price")
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert data["price"] == PRICE_702861
    assert data["rough_price"] == 42880
    assert data["outputs"] == update.estimate.outputs
    assert data["points"] == update.estimate.point_count
    assert data["updated"] == 1700000000.25
    assert data["spread"] == update.estimate.spread
    assert data["band"] == list(update.estimate.band)
    assert data["reason"] is None
    assert data["age"] > 0


async def test_health_merges_fanout_counts_and_reports_down() -> None:
    state = {"status": "ok", "zmq": {"last_message_age": 1.5, "lost": 0}}
    with trio.fail_after(20):
        async with running(health=lambda: dict(state)) as server:
            async with open_websocket_url(server.ws_url) as ws:
                await receive(ws)
                status, _, body = await http_get(server.url + "/health")
                assert status == 200
                data = json.loads(body)
                assert data["zmq"] == {"last_message_age": 1.5, "lost": 0}
                assert data["web"]["clients"] == 1
                state["status"] = "down"
                status, _, _ = await http_get(server.url + "/health")
                assert status == 503


async def test_metrics_endpoint_counts_clients() -> None:
    with trio.fail_after(20):
        async with running() as server:
            async with open_websocket_url(server.ws_url) as ws:
                await receive(ws)
                status, headers, body = await http_get(server.url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"fiatprint_ws_clients 1.0" in body


async def test_history_endpoint_reads_real_sqlite(tmp_path: Path) -> None:
    update, _, _ = block_updates()
    history = await History.open(tmp_path / "history.sqlite")
    with history:
        for t in (100.0, 200.0, 300.0):
            row = HistoryRow.from_update(estimate_at(update, t))
            assert row is not None
            await history.append(row)
        with trio.fail_after(20):
            async with running(history=history) as server:
                ok = await http_get(server.url + "/api/v1/history?from=150&to=400")
                last = await http_get(server.url + "/api/v1/history?from=0&limit=1")
                swapped = await http_get(server.url + "/api/v1/history?from=9&to=5")
                junk = await http_get(server.url + "/api/v1/history?from=abc")
                nan = await http_get(server.url + "/api/v1/history?to=nan")
                big = await http_get(server.url + "/api/v1/history?limit=99999")
            async with running() as server:
                off = await http_get(server.url + "/api/v1/history")
    assert ok[0] == 200
    body = json.loads(ok[2])
    assert (body["v"], body["from"], body["to"]) == (1, 150.0, 400.0)
    assert [r["time"] for r in body["rows"]] == [200.0, 300.0]
    assert body["rows"][0]["price"] == PRICE_702861
    assert body["rows"][0]["rough_price"] == 42880
    assert [r["time"] for r in json.loads(last[2])["rows"]] == [300.0]
    assert swapped[0] == 400 and "from" in json.loads(swapped[2])["error"]
    assert junk[0] == 400 and "Unix time" in json.loads(junk[2])["error"]
    assert nan[0] == 400
    assert big[0] == 400 and "limit" in json.loads(big[2])["error"]
    assert off[0] == 404 and "disabled" in json.loads(off[2])["error"]


async def test_page_and_assets_are_served_locally() -> None:
    with trio.fail_after(20):
        async with running() as server:
            index = await http_get(server.url + "/")
            js = await http_get(server.url + "/static/app.js")
            css = await http_get(server.url + "/static/style.css")
    assert index[0] == 200 and b"<canvas" in index[2]
    assert "default-src 'self'" in index[1]["content-security-policy"]
    assert js[0] == 200 and b"new WebSocket" in js[2]
    assert css[0] == 200
    # Nothing from another origin: no absolute http(s) URLs in the page.
    for body in (index[2], js[2], css[2]):
        assert b"http://" not in body and b"https://" not in body
