"""End to end: a real block over real ZMQ into the whole service.

Block 702861 is announced the way Core announces it (every transaction into
the mempool with ``rawtx`` + ``sequence A``, then the block: ``rawtx`` of all
its transactions, ``sequence C``), by the replay publisher, on 127.0.0.1
ephemeral ports. The service runs as ``fiatprint serve`` runs it (hypercorn
on port 0); trio-websocket clients and a plain HTTP client read it. The
price must be the method's answer for the block, exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import open_websocket_url

from oracle import cli
from oracle.config import Settings
from oracle.decode import parse_block
from oracle.estimate import estimate
from oracle.filter import TxFilter
from oracle.replay import CorePublisher
from oracle.service import ServiceInfo, run_service

BLOCKS = Path(__file__).parent / "data" / "blocks"
PRICE_702861 = 42951.63645734903
ROUGH_702861 = 42880
OUTPUTS_702861 = 3315


def _path(height: int) -> Path:
    (path,) = BLOCKS.glob(f"{height}-*.bin")
    return path


def _method_answer(path: Path) -> tuple[float | None, int | None, int]:
    """The price computed by ``oracle.estimate`` directly on the file."""
    f = TxFilter()
    amounts = []
    for tx in parse_block(path.read_bytes()).txs:
        kept = f.offer(tx)
        if kept:
            amounts.extend(s / 1e8 for _, s in kept)
    est = estimate(np.array(amounts))
    return est.price, est.rough_price, len(amounts)


def _http_get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _until_estimate(
    ws: Any, *, outputs: int, confirmed: int
) -> tuple[dict[str, Any], list[str]]:
    """Read frames until an estimate covering ``outputs`` (``confirmed`` of
    them confirmed) arrives; return it and the frame types seen."""
    kinds: list[str] = []
    while True:
        frame = json.loads(await ws.get_message())
        kinds.append(frame["type"])
        est = frame.get("estimate") if frame["type"] == "snapshot" else frame
        if (
            frame["type"] in ("snapshot", "estimate")
            and est is not None
            and est["window_outputs"] == outputs
            and est["confirmed_outputs"] == confirmed
        ):
            return est, kinds


async def test_replayed_block_gives_the_exact_price_to_websocket_and_rest() -> None:
    path = _path(702861)
    block = parse_block(path.read_bytes())
    price, rough, outputs = _method_answer(path)
    assert (price, rough, outputs) == (PRICE_702861, ROUGH_702861, OUTPUTS_702861)

    ep = "tcp://127.0.0.1:0"
    # hwm=0: unlimited, so a publisher faster than the subscriber loses
    # nothing and the test is about the pipeline, not about ZMQ's drops.
    with (
        CorePublisher.open({"rawtx": ep, "sequence": ep}, hwm=0) as pub,
        trio.fail_after(60),
    ):
        settings = Settings(
            zmq_rawtx=pub.bound["rawtx"],
            zmq_sequence=pub.bound["sequence"],
            port=0,
            window_seconds=3 * 3600.0,
            estimate_interval=0.05,
        )
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: run_service(settings, task_status=task_status)
            )
            assert isinstance(info, ServiceInfo)
            assert info.url.startswith("http://127.0.0.1:")
            ws_url = info.url.replace("http://", "ws://") + "/ws"
            status, body = await trio.to_thread.run_sync(
                _http_get_json, info.url + "/api/v1/price"
            )
            assert (status, body["price"]) == (503, None)
            results: list[tuple[dict[str, Any], list[str], dict[str, Any], list[str]]]
            results = []

            async def client(ready: trio.Event) -> None:
                async with open_websocket_url(ws_url) as ws:
                    first = json.loads(await ws.get_message())
                    assert first["type"] == "snapshot"
                    # Nothing published yet: no estimate, or one of nothing.
                    assert first["estimate"] is None or (
                        first["estimate"]["window_outputs"] == 0
                        and first["estimate"]["price"] is None
                    )
                    ready.set()
                    # Mempool first: the whole block, none of it confirmed.
                    mempool = await _until_estimate(ws, outputs=outputs, confirmed=0)
                    # Then the block connects and confirms every output.
                    mined = await _until_estimate(
                        ws, outputs=outputs, confirmed=outputs
                    )
                    results.append((*mempool, *mined))

            async with trio.open_nursery() as clients:
                for _ in range(3):
                    ready = trio.Event()
                    clients.start_soon(client, ready)
                    await ready.wait()
                await pub.wait_subscribed()
                for seq, tx in enumerate(block.txs[1:]):
                    pub.publish_mempool_tx(tx.raw, tx.txid, seq)
                    await trio.sleep(0)
                # Let the mempool estimate come out before the block.
                while (
                    info.service.window is None
                    or info.service.window.outputs != outputs
                ):
                    await trio.sleep(0.01)
                await trio.sleep(0.2)
                pub.publish_block_connected(block)

            status, body = await trio.to_thread.run_sync(
                _http_get_json, info.url + "/api/v1/price"
            )
            metrics_text = await trio.to_thread.run_sync(
                lambda: (
                    urllib.request.urlopen(info.url + "/metrics", timeout=10)
                    .read()
                    .decode()
                )
            )
            nursery.cancel_scope.cancel()

    assert len(results) == 3
    for mempool, mempool_kinds, mined, mined_kinds in results:
        for est in (mempool, mined):
            assert est["price"] == PRICE_702861 == price
            assert est["rough_price"] == ROUGH_702861
            assert est["outputs"] == OUTPUTS_702861
        # Each client got live updates after its snapshot: the estimate,
        # the price points, then the block and the new estimate.
        assert mempool_kinds[-1] == "estimate" and "points" in mempool_kinds
        assert "snapshot" not in mempool_kinds
        assert "block" in mined_kinds and mined_kinds[-1] == "estimate"
    assert status == 200
    assert body["price"] == PRICE_702861
    assert body["rough_price"] == ROUGH_702861
    assert body["confirmed_outputs"] == OUTPUTS_702861
    assert "fiatprint_price_usd 42951.63645734903" in metrics_text
    assert 'fiatprint_zmq_messages_total{topic="rawtx"} 4999.0' in metrics_text
    assert 'fiatprint_zmq_messages_total{topic="sequence"} 2500.0' in metrics_text


def test_serve_and_demo_subcommands_are_registered() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--port", "0", "--rate", "5"])
    assert (args.port, args.rate) == (0, 5.0)
    assert [Path(p).name for p in args.blocks] == [_path(818677).name]
    args = parser.parse_args(["serve", "--port", "0"])
    assert args.command == "serve"


async def test_hypercorn_runs_the_whole_service_from_oracle_asgi() -> None:
    """``hypercorn --worker-class trio oracle.asgi:app`` with settings from the
    environment: the same block gives the same exact price."""
    path = _path(702861)
    block = parse_block(path.read_bytes())
    ep = "tcp://127.0.0.1:0"
    with (
        CorePublisher.open({"rawtx": ep, "sequence": ep}, hwm=0) as pub,
        trio.fail_after(60),
    ):
        env = dict(os.environ)
        env.pop("FIATPRINT_CONFIG", None)
        env.update(
            FIATPRINT_ZMQ_RAWTX=pub.bound["rawtx"],
            FIATPRINT_ZMQ_SEQUENCE=pub.bound["sequence"],
            FIATPRINT_ESTIMATE_INTERVAL="0.05",
            FIATPRINT_LOG_LEVEL="WARNING",
        )
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "--worker-class",
                "trio",
                "--bind",
                "127.0.0.1:0",
                "oracle.asgi:app",
            ],
            env=env,
            cwd=str(Path(__file__).parent.parent),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stderr is not None
            seen = b""
            while (
                m := re.search(rb"Running on (http://127\.0\.0\.1:\d+)", seen)
            ) is None:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
            url = m.group(1).decode()
            await pub.wait_subscribed()
            for seq, tx in enumerate(block.txs[1:]):
                pub.publish_mempool_tx(tx.raw, tx.txid, seq)
                await trio.sleep(0)
            pub.publish_block_connected(block)
            while True:
                status, body = await trio.to_thread.run_sync(
                    _http_get_json, url + "/api/v1/price"
                )
                if status == 200 and body["confirmed_outputs"] == OUTPUTS_702861:
                    break
                await trio.sleep(0.05)
        finally:
            proc.terminate()
            await proc.wait()
    assert body["price"] == PRICE_702861
    assert body["rough_price"] == ROUGH_702861
    assert body["window_outputs"] == OUTPUTS_702861


async def test_demo_keeps_moving_across_replay_passes() -> None:
    """``fiatprint demo``'s engine: the bundled block replayed in a loop keeps
    producing estimates after it comes round again (its window is shorter
    than a pass, so the repeated txids count as new)."""
    from oracle.service_cli import DEFAULT_DEMO_BLOCKS, run_demo

    block = parse_block(DEFAULT_DEMO_BLOCKS[0].read_bytes())
    assert block.hash_hex.startswith("000000000000000000020750f322f4e7")
    rate = 1000.0
    frames: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: run_demo(
                    list(DEFAULT_DEMO_BLOCKS),
                    port=0,
                    rate=rate,
                    task_status=task_status,
                )
            )
            window = info.service.window
            assert window is not None
            assert window.span == 0.9 * (block.tx_count - 1) / rate
            # Pre-filled: about 90 % of the block, confirmed by its block.
            assert window.confirmed_outputs > 1500
            ws_url = info.url.replace("http://", "ws://") + "/ws"
            async with open_websocket_url(ws_url) as ws:
                blocks_seen = 0
                while True:
                    frame = json.loads(await ws.get_message())
                    frames.append(frame)
                    blocks_seen += frame["type"] == "block"
                    if (
                        blocks_seen >= 2
                        and frame["type"] == "estimate"
                        and frame["price"] is not None
                    ):
                        break
            nursery.cancel_scope.cancel()
    blocks = [f for f in frames if f["type"] == "block"]
    assert {b["hash"] for b in blocks} == {block.hash_hex}
    assert all(b["kind"] == "connected" for b in blocks)
    # Every pass confirmed what the window held of the block.
    assert all(b["confirmed_txids"] > 0 for b in blocks)
    last = frames[-1]
    # Not always below the block's 2157: a child whose parent has already
    # left the sliding window counts, which it does not within the block.
    assert 1000 < last["window_outputs"] < 2300
    # The window starts pre-filled with the previous pass, so from the first
    # estimate on each one sees most of the block. (At this test's speed, a
    # window of a few seconds, a busy machine's delays can still thin it out
    # for a moment; at the demo's 20 per second the window is 156 s long.)
    prices = sorted(f["price"] for f in frames if f["type"] == "estimate")
    assert prices and None not in prices
    close = [p for p in prices if abs(p - 37355.24841240194) < 0.01 * 37355.24841240194]
    assert len(close) >= 0.8 * len(prices)


def _hash(height: int) -> str:
    return parse_block(_path(height).read_bytes()).hash_hex


def _blocks(frames: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """Block events in the frames, from ``block`` frames and snapshots (a
    client that fell behind gets a snapshot instead of the frames it missed)."""
    out: list[tuple[str, int | None]] = []
    for fr in frames:
        found = [fr] if fr["type"] == "block" else []
        if fr["type"] == "snapshot":
            found = [b for b in fr["blocks"] if (b["hash"], b["height"]) not in out]
        out.extend((b["hash"], b["height"]) for b in found)
    return out


async def test_service_with_rpc_loads_the_baseline_and_confirms_by_full_block() -> None:
    """With a node reachable over RPC (the stand-in Core), the service loads
    the window's baseline block, and a new block announced over ZMQ is
    confirmed from the full block fetched by node sync, height included."""
    try:
        from .standin import open_standin, real_block
    except ImportError:
        from standin import open_standin, real_block  # type: ignore[no-redef]

    f = TxFilter()
    amounts: list[float] = []
    for height in (818677, 553724):
        for tx in parse_block(_path(height).read_bytes()).txs:
            kept = f.offer(tx)
            if kept:
                amounts.extend(s / 1e8 for _, s in kept)
    expected = estimate(np.array(amounts))
    assert len(amounts) == 2157 + 6
    # A block of four transactions: its announcement is no burst, so the
    # stand-in's publisher (Core's send queue of 1,000, in this process)
    # cannot drop any of it and the window is exactly predictable.
    block = parse_block(_path(553724).read_bytes())
    t553724 = block.header.time
    with trio.fail_after(60):
        # Height 999 holds a 2011 block, older than the window: the baseline
        # walk stops there and loads 818677 (2023) alone.
        async with open_standin({999: 150013, 1000: 818677}) as node:
            assert node.publisher is not None
            settings = Settings(
                zmq_rawtx=node.zmq_bound["rawtx"],
                zmq_sequence=node.zmq_bound["sequence"],
                rpc_url=node.url,
                rpc_user=node.user,
                rpc_password=node.password,
                # The stand-in serves real, old blocks: the window reaches
                # back to a month before 553724 (2018), not to 150013 (2011).
                window_seconds=time.time() - (t553724 - 30 * 86400),
                estimate_interval=0.05,
                port=0,
            )
            async with trio.open_nursery() as nursery:
                info = await nursery.start(
                    lambda task_status: run_service(settings, task_status=task_status)
                )
                window = info.service.window
                assert window is not None
                ws_url = info.url.replace("http://", "ws://") + "/ws"
                async with open_websocket_url(ws_url) as ws:
                    frames = []
                    while (_hash(818677), 1000) not in _blocks(frames):
                        frames.append(json.loads(await ws.get_message()))
                    assert window.confirmed_outputs == window.outputs == 2157
                    await node.publisher.wait_subscribed()
                    assert node.connect_block(real_block(553724)) == 1001
                    while (block.hash_hex, 1001) not in _blocks(frames):
                        frames.append(json.loads(await ws.get_message()))
                while True:
                    status, body = await trio.to_thread.run_sync(
                        _http_get_json, info.url + "/api/v1/price"
                    )
                    if status == 200 and body["window_outputs"] == len(amounts):
                        break
                    await trio.sleep(0.05)
                health = info.service.health()
                nursery.cancel_scope.cancel()
    blocks = _blocks(frames)
    assert blocks[0] == (_hash(818677), 1000)
    # The block is announced over ZMQ, with the height its coinbase pushes
    # (BIP34: the real block is 553724, which the stand-in serves at 1001),
    # then known from the full block, with the node's height.
    assert blocks[-2:] == [(block.hash_hex, 553724), (block.hash_hex, 1001)]
    assert body["price"] == expected.price
    assert body["rough_price"] == expected.rough_price
    assert body["confirmed_outputs"] == len(amounts)
    assert health["node"]["status"] == "ok"
    assert health["node"]["tip_height"] == 1001


def test_demo_window_is_prefilled_as_after_one_pass() -> None:
    from oracle.service_cli import DEFAULT_DEMO_BLOCKS, prefill_window
    from oracle.window import Window

    block = parse_block(DEFAULT_DEMO_BLOCKS[0].read_bytes())
    rate = 20.0
    span = 0.9 * (block.tx_count - 1) / rate  # 155.79 s
    window = Window(span)
    now = 1_800_000_000.0
    added = prefill_window(window, [block], rate, now)
    # Transactions arrive every 50 ms over the 173.1 s before now; those of
    # the last 155.79 s are kept (3116 of 3462), plus the coinbase.
    assert added == len(window) == 3116 + 1
    assert window.confirmed_outputs == window.outputs == 1860
    assert window.expire(now) == 0
    # The last 90 % of the block gives (almost) the whole block's price.
    assert window.estimate().price == 37355.24841240195
