"""The page in headless Chromium, driven over the DevTools protocol.

A server process (this file run as a script: the web app fed from real block
702861, split into a confirmed and a mempool half) serves the page on
127.0.0.1. Chromium loads it; the test reads the price text, counts cyan and
orange pixels on the canvas, kills the server with SIGKILL, restarts it on
the same port and waits for the page to reconnect by itself.

Skipped, with a message, only when no Chromium binary is installed.
Set ``FIATPRINT_SCREENSHOT=path.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next(
    (
        p
        for p in (
            os.environ.get("CHROMIUM"),
            "/usr/bin/chromium",
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p and os.path.exists(p)
    ),
    None,
)
PRICE_702861 = 42951.63645734903
PRICE_TEXT = "$42,952"  # block 702861: 42951.63645734903


def demo_updates(now: float, older_copies: int = 0) -> list[Any]:
    """What the server publishes: status, the block, its points (first half
    confirmed at the block, second half as if still in the mempool over the
    last ten minutes) and the block's estimate. ``older_copies`` adds that
    many copies of all the block's points, confirmed at earlier times, before
    the rest (7 copies fill the fan-out's 20,000-point snapshot)."""
    import attrs
    from test_fanout import block_updates, estimate_at

    from oracle.events import PointsBatch, StatusChange

    update, points, event = block_updates()
    pts = points.points
    half = len(pts) // 2
    confirmed = tuple(attrs.evolve(p, time=now - 700) for p in pts[:half])
    mempool = tuple(
        attrs.evolve(p, confirmed=False, time=now - 600 + 600 * i / (len(pts) - half))
        for i, p in enumerate(pts[half:])
    )
    # Older copies stand for other transactions: the page keys points by
    # txid and price (a transaction's points come again when it confirms),
    # so each copy gets txids of its own.
    older = [
        PointsBatch(
            tuple(
                attrs.evolve(p, time=now - 1300 - 600 * c, txid=f"{c:02x}{p.txid[2:]}")
                for p in pts
            )
        )
        for c in range(older_copies)
    ]
    return [
        StatusChange("zmq", "ok", "rawtx and sequence flowing", now),
        StatusChange("node", "synced", "height 702861", now),
        attrs.evolve(event, time=now - 700),
        *older,
        PointsBatch(confirmed),
        PointsBatch(mempool),
        # The first 200 mempool points again, now confirmed (their block
        # connected): the page must move those dots, not add new ones.
        PointsBatch(
            tuple(attrs.evolve(p, confirmed=True, time=now - 5) for p in mempool[:200])
        ),
        estimate_at(update, now - 2),
    ]


async def _serve(port: int, older_copies: int, history_path: str) -> None:
    from oracle.app import create_app, serve_http
    from oracle.config import Settings
    from oracle.fanout import FanOut
    from oracle.history import History
    from oracle.metrics import Metrics

    fan = FanOut(metrics=Metrics())
    for u in demo_updates(time.time(), older_copies):
        fan.publish(u)
    settings = Settings(host="127.0.0.1", port=port)
    history = await History.open(history_path) if history_path else None
    app = create_app(
        fan,
        settings=settings,
        health=lambda: {"status": "ok"},
        metrics=fan.metrics,
        history=history,
    )
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve_http, app, settings)
        print("URL", urls[0], flush=True)


async def start_server(
    port: int, older_copies: int = 0, history: Path | None = None
) -> tuple[trio.Process, str]:
    """Run this file as the server on ``port`` (0: any); return it and its
    URL once it listens."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, str(port), str(older_copies), str(history or "")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        assert chunk, "server exited before listening"
        line += chunk
    url = line.decode().split()[1]
    return proc, url


class Cdp:
    """A minimal Chrome DevTools Protocol client over one WebSocket."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send_message(json.dumps(msg))
        while True:
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate",
            session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, session: str, expression: str) -> Any:
        """Poll ``expression`` until it is truthy; the caller's timeout bounds
        the wait."""
        while True:
            value = await self.evaluate(session, expression)
            if value:
                return value
            await trio.sleep(0.05)


MAX_POINTS = 20_000
#: Ages in seconds of the history rows the restarted server holds.
HISTORY_TIMES = (3600.0, 1800.0, 60.0)


async def write_history(path: Path, ages: tuple[float, ...]) -> None:
    """A real SQLite history with the 702861 estimate at the given ages."""
    from test_fanout import block_updates, estimate_at

    from oracle.history import History, HistoryRow

    update, _, _ = block_updates()
    now = time.time()
    with await History.open(path) as history:
        for age in ages:
            row = HistoryRow.from_update(estimate_at(update, now - age))
            assert row is not None
            await history.append(row)


#: Index and page coordinates of the first point drawn on the canvas, whose
#: dot has no other within hover range, so the tooltip must name it.
FIRST_DRAWN = """(() => {
  const f = window.fiatprint, xy = f.xy, n = xy.length / 2;
  const r = document.getElementById('cloud').getBoundingClientRect();
  for (let i = 0; i < n; i++) {
    const x = xy[2 * i], y = xy[2 * i + 1];
    if (Number.isNaN(x)) continue;
    let alone = true;
    for (let j = 0; j < n && alone; j++) {
      if (j === i || Number.isNaN(xy[2 * j])) continue;
      if (Math.hypot(xy[2 * j] - x, xy[2 * j + 1] - y) < 14) alone = false;
    }
    if (alone) return [i, r.left + x + 1, r.top + y + 1];
  }
  return null;
})()"""

COUNT_PIXELS = """(() => {
  const c = document.getElementById('cloud');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let cyan = 0, orange = 0;
  for (let i = 0; i < d.length; i += 4) {
    const r = d[i], g = d[i + 1], b = d[i + 2], a = d[i + 3];
    if (a < 128) continue;
    if (r < 80 && g > 170 && b > 190) cyan++;
    else if (r > 220 && g > 120 && g < 175 && b < 100) orange++;
  }
  return {cyan, orange, width: c.width, css: c.clientWidth,
          dpr: window.devicePixelRatio, drawn: window.fiatprint.drawn};
})()"""


@asynccontextmanager
async def open_page(profile: Path, url: str) -> AsyncIterator[tuple[Cdp, str]]:
    """Headless Chromium showing ``url``: yields the DevTools client and the
    page's session id; the browser is killed when the block ends."""
    assert CHROMIUM is not None
    profile.mkdir()
    chromium = await trio.lowlevel.open_process(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--force-device-scale-factor=2",
            "--window-size=1280,900",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        while not active.exists() or len(active.read_text().splitlines()) < 2:
            await trio.sleep(0.05)
        cdp_port, cdp_path = active.read_text().splitlines()[:2]
        browser_url = f"ws://127.0.0.1:{cdp_port}{cdp_path}"
        async with open_websocket_url(browser_url, max_message_size=2**26) as ws:
            cdp = Cdp(ws)
            target = await cdp.call("Target.createTarget", url=url)
            attached = await cdp.call(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            yield cdp, attached["sessionId"]
            await cdp.call("Browser.close")
    finally:
        if chromium.returncode is None:
            chromium.kill()
        with trio.move_on_after(10):
            await chromium.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_page_shows_price_draws_clouds_and_reconnects(tmp_path: Path) -> None:
    from test_fanout import block_updates

    update, points, _ = block_updates()
    lo, hi = update.estimate.band

    def distinct(pts: Any) -> list[Any]:
        # The page keeps one dot per txid, amount and price (a later copy
        # replaces an earlier one; equal outputs of one tx share a dot).
        return list({(p.txid, p.sats, p.price): p for p in pts}.values())

    in_band = sum(1 for p in distinct(points.points) if lo <= p.price <= hi)
    full = distinct(
        [p for u in demo_updates(0.0, 7) if hasattr(u, "points") for p in u.points][
            -MAX_POINTS:
        ]
    )
    in_band_full = sum(1 for p in full if lo <= p.price <= hi)
    with trio.fail_after(90):
        server, url = await start_server(0)
        port = int(url.rsplit(":", 1)[1])
        try:
            async with open_page(tmp_path / "profile", url + "/") as (cdp, s):
                price = await cdp.wait_for(
                    s,
                    "window.fiatprint && window.fiatprint.connected &&"
                    " window.fiatprint.drawn > 0 &&"
                    " document.getElementById('price').textContent",
                )
                assert price == PRICE_TEXT
                assert (
                    await cdp.evaluate(s, "document.getElementById('conn').textContent")
                    == "live"
                )
                first = distinct(
                    [
                        p
                        for u in demo_updates(0.0)
                        if hasattr(u, "points")
                        for p in u.points
                    ]
                )
                assert await cdp.evaluate(
                    s,
                    "window.fiatprint.state.confirmed.filter(Boolean).length",
                ) == sum(1 for p in first if p.confirmed)
                assert await cdp.evaluate(
                    s, "window.fiatprint.state.price.length"
                ) == len(first)
                pixels = await cdp.evaluate(s, COUNT_PIXELS)
                assert pixels["dpr"] == 2
                assert pixels["width"] == 2 * pixels["css"]  # sharp on HiDPI
                assert pixels["drawn"] == in_band
                assert pixels["cyan"] > 500 and pixels["orange"] > 500, pixels
                shot = await cdp.call("Page.captureScreenshot", s, format="png")
                keep = os.environ.get("FIATPRINT_SCREENSHOT")
                png = base64.b64decode(shot["data"])
                (tmp_path / "page.png").write_bytes(png)
                if keep:
                    Path(keep).write_bytes(png)

                server.send_signal(signal.SIGKILL)
                await server.wait()
                text = await cdp.wait_for(
                    s,
                    "!window.fiatprint.connected &&"
                    " document.getElementById('conn').textContent",
                )
                assert "retrying" in text

                # The restarted server holds a full 20,000-point snapshot and
                # a history the first one did not have.
                history_path = tmp_path / "history.sqlite"
                await write_history(history_path, HISTORY_TIMES)
                server, url2 = await start_server(
                    port, older_copies=7, history=history_path
                )
                assert url2 == url
                await cdp.wait_for(
                    s,
                    "window.fiatprint.connected && window.fiatprint.snapshots >= 2"
                    " && window.fiatprint.drawn > 3000",
                )
                assert await cdp.evaluate(s, "window.fiatprint.state.price.length") == (
                    len(full)
                )
                assert len(full) > MAX_POINTS - 300  # 200 re-sends, a few equal outputs
                assert await cdp.evaluate(s, "window.fiatprint.drawn") == in_band_full
                rows = await cdp.wait_for(
                    s,
                    "!document.getElementById('history-panel').hidden &&"
                    " window.fiatprint.state.history",
                )
                assert [r[1] for r in rows] == [PRICE_702861] * len(HISTORY_TIMES)
                draw_ms = await cdp.evaluate(s, "window.fiatprint.drawMs")
                print(f"draw of {MAX_POINTS} points: {draw_ms:.1f} ms")

                # Hovering a dot shows its price, amount and txid.
                i, x, y = await cdp.evaluate(s, FIRST_DRAWN)
                await cdp.call(
                    "Input.dispatchMouseEvent", s, type="mouseMoved", x=x, y=y
                )
                tip = await cdp.wait_for(
                    s,
                    "!document.getElementById('tip').hidden &&"
                    " document.getElementById('tip').textContent",
                )
                txid = await cdp.evaluate(s, f"window.fiatprint.state.txid[{i}]")
                assert txid in tip and "implied" in tip and "sats" in tip
                if keep:
                    shot = await cdp.call("Page.captureScreenshot", s, format="png")
                    full = Path(keep).with_name(Path(keep).stem + "-full.png")
                    full.write_bytes(base64.b64decode(shot["data"]))
                assert (
                    await cdp.evaluate(
                        s, "document.getElementById('price').textContent"
                    )
                    == PRICE_TEXT
                )
                assert (
                    await cdp.evaluate(s, "document.getElementById('conn').textContent")
                    == "live"
                )
        finally:
            if server.returncode is None:
                server.kill()
            with trio.move_on_after(10):
                await server.wait()


async def start_demo(port: int) -> tuple[trio.Process, str]:
    """``fiatprint demo`` (replay of the bundled block 818677 into the whole
    service) on ``port``; returns it and its URL once it listens."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "oracle.cli", "demo", "--port", str(port),
         "--rate", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.stdout is not None
    line = b""
    while b"http://" not in line or not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        assert chunk, "demo exited before listening"
        line += chunk
    url = line.decode().split("open ", 1)[1].strip().rstrip("/")
    return proc, url


PAGE_ESTIMATE = """(() => {
  const f = window.fiatprint;
  const e = f && f.state.estimate;
  return e && f.connected ? [e.price, e.updated,
    document.getElementById('price').textContent] : null;
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_page_follows_the_demo_service_and_reconnects(tmp_path: Path) -> None:
    """The whole service (``fiatprint demo``): the page shows what
    ``/api/v1/price`` says, draws mempool dots, and reconnects after the
    service is killed and started again on the same port."""
    from test_app import http_get

    with trio.fail_after(120):
        demo, url = await start_demo(0)
        port = int(url.rsplit(":", 1)[1])
        try:
            async with open_page(tmp_path / "profile", url + "/") as (cdp, s):
                # Poll until the page and the API report the same estimate.
                while True:
                    shown = await cdp.evaluate(s, PAGE_ESTIMATE)
                    status, _, body = await http_get(url + "/api/v1/price")
                    api = json.loads(body)
                    if shown and status == 200 and shown[1] == api["updated"]:
                        break
                    await trio.sleep(0.1)
                assert shown[0] == api["price"]
                assert shown[2] == "$" + f"{api['price']:,.0f}"
                await cdp.wait_for(s, "window.fiatprint.drawn > 100")
                pixels = await cdp.evaluate(s, COUNT_PIXELS)
                assert pixels["orange"] > 100, pixels

                demo.send_signal(signal.SIGKILL)
                await demo.wait()
                await cdp.wait_for(s, "!window.fiatprint.connected")
                demo, url2 = await start_demo(port)
                assert url2 == url
                await cdp.wait_for(
                    s, "window.fiatprint.connected && window.fiatprint.snapshots >= 2"
                )
        finally:
            if demo.returncode is None:
                demo.kill()
            with trio.move_on_after(10):
                await demo.wait()


if __name__ == "__main__":
    trio.run(_serve, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
