"""Node sync against the stand-in node on loopback: the baseline, new blocks,
a reorganisation, a restart, a node that is down, syncing or refuses us, and
a node missing ZMQ topics. Window events are applied to a real ``Window`` to
count the confirmed outputs exactly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from oracle.config import Settings
from oracle.decode import parse_block
from oracle.events import (
    BlockConnected,
    BlockDisconnected,
    FeedTrouble,
    Resync,
    SequenceEvent,
    StatusChange,
)
from oracle.nodesync import NodeSyncState, run_node_sync
from oracle.rpc import RpcClient, RpcEndpoint
from oracle.window import Window

try:
    from .standin import StandinNode, open_standin, real_block, zmq_recv
except ImportError:
    from standin import (  # type: ignore[no-redef]
        StandinNode,
        open_standin,
        real_block,
        zmq_recv,
    )

# Heights 1000..1002 hold real blocks 553724 (2018), 757739 and 757753
# (2022-10-08 17:25:55 and 19:45:59). One minute after the tip, a three-hour
# window reaches back to 16:46:59: it holds 1001 and 1002 only.
CHAIN = {1000: 553724, 1001: 757739, 1002: 757753}
NOW = 1665258359.0 + 60
SETTINGS = Settings(window_seconds=3 * 3600.0)
HASH = {h: parse_block(real_block(h)).header.hash for h in (757739, 757753)}
HASH[774628] = parse_block(real_block(774628)).header.hash
HASH[951658] = parse_block(real_block(951658)).header.hash


def client_for(node: StandinNode, password: str | None = None) -> RpcClient:
    return RpcClient(
        RpcEndpoint(node.url, node.user, password or node.password, None, "--rpc-user")
    )


@attrs.define
class Harness:
    requests: trio.MemorySendChannel[object]
    window_events: trio.MemoryReceiveChannel[object]
    statuses: trio.MemoryReceiveChannel[StatusChange]
    state: NodeSyncState
    window: Window = attrs.field(factory=lambda: Window(span=3 * 3600.0))

    async def next_event(self) -> object:
        event = await self.window_events.receive()
        w = self.window
        if isinstance(event, BlockConnected):
            w.connect(event.hash, NOW, block=event.block, height=event.height)
        elif isinstance(event, BlockDisconnected):
            w.disconnect(event.hash)
        elif isinstance(event, Resync):
            w.clear()
        return event

    async def blocks(self, n: int) -> list[tuple[str, int | None]]:
        """The next ``n`` window events as (kind, height)."""
        out: list[tuple[str, int | None]] = []
        for _ in range(n):
            ev = await self.next_event()
            if isinstance(ev, BlockConnected):
                assert ev.block is not None and ev.block.header.hash == ev.hash
                out.append(("C", ev.height))
            elif isinstance(ev, BlockDisconnected):
                out.append(("D", None))
            elif isinstance(ev, Resync):
                out.append(("resync", None))
            else:
                raise AssertionError(ev)
        return out

    async def statuses_until(self, last: str) -> list[str]:
        """Node statuses reported so far, up to and including ``last``."""
        out = []
        while not out or out[-1] != last:
            change = await self.statuses.receive()
            assert change.component == "node"
            out.append(change.status)
        return out


@asynccontextmanager
async def running_sync(
    node: StandinNode, *, rpc: RpcClient | None = None, settings: Settings = SETTINGS
) -> AsyncIterator[Harness]:
    req_send, req_recv = trio.open_memory_channel[object](100)
    win_send, win_recv = trio.open_memory_channel[object](100)
    st_send, st_recv = trio.open_memory_channel[StatusChange](100)
    async with trio.open_nursery() as nursery:
        state = await nursery.start(
            partial(
                run_node_sync,
                rpc or client_for(node),
                req_recv,  # type: ignore[arg-type]
                win_send,  # type: ignore[arg-type]
                settings=settings,
                status_out=st_send,
                now=lambda: NOW,
            )
        )
        yield Harness(req_send, win_recv, st_recv, state)
        nursery.cancel_scope.cancel()


async def test_baseline_new_block_and_one_block_reorganisation() -> None:
    with trio.fail_after(30):
        async with open_standin(CHAIN) as node, running_sync(node) as h:
            assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
            assert h.window.confirmed_outputs == 169
            assert h.window.mempool_outputs == 0
            # A new block: the decoder forwards its hash from sequence C.
            assert node.connect_block(real_block(774628)) == 1003
            await h.requests.send(HASH[774628])
            assert await h.blocks(1) == [("C", 1003)]
            assert h.window.confirmed_outputs == 237
            # One-block reorganisation: D of the tip, then C of another block.
            assert node.disconnect_tip() == HASH[774628][::-1].hex()
            await h.requests.send(SequenceEvent(HASH[774628], "D", None, NOW))
            assert node.connect_block(real_block(951658)) == 1003
            await h.requests.send(HASH[951658])
            assert await h.blocks(2) == [("D", None), ("C", 1003)]
            assert h.window.confirmed_outputs == 255
            assert h.window.outputs == 255 + 68  # 774628's back in the mempool
            # A hash already sent is not fetched twice.
            calls = len(node.calls)
            await h.requests.send(HASH[951658])
            await h.requests.send(HASH[757753])
            with trio.move_on_after(0.2):
                await h.window_events.receive()
                raise AssertionError("a block was sent twice")
            assert len(node.calls) == calls
            assert h.state.status == "ok"
            assert await h.statuses_until("ok") == ["loading", "loading", "ok"]
            assert node.calls[:6] == [
                "getblockchaininfo",
                "getzmqnotifications",
                "getblockcount",
                "getblockhash",
                "getblockheader",
                "getblockhash",
            ]


async def test_missed_heights_are_filled_in_order() -> None:
    with trio.fail_after(30):
        async with open_standin(CHAIN) as node, running_sync(node) as h:
            assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
            node.connect_block(real_block(774628))
            node.connect_block(real_block(951658))
            await h.requests.send(HASH[951658])
            assert await h.blocks(2) == [("C", 1003), ("C", 1004)]
            assert h.window.confirmed_outputs == 169 + 68 + 86


async def test_restart_mid_stream_resyncs_and_reloads(autojump_clock) -> None:
    with trio.fail_after(600):
        async with open_standin(CHAIN) as node, running_sync(node) as h:
            assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
            assert await h.statuses_until("ok") == ["loading", "loading", "ok"]
            node.connect_block(real_block(774628))
            await h.requests.send(HASH[774628])
            assert await h.blocks(1) == [("C", 1003)]
            # The node goes down; the intake sees its counters restart.
            await node.stop_rpc()
            await h.requests.send(
                FeedTrouble("restart", "sequence", "counter 0 after 5", NOW)
            )
            await trio.sleep(10)
            assert h.state.status == "down"
            await node.restart()
            assert await h.blocks(4) == [
                ("resync", None),
                ("C", 1001),
                ("C", 1002),
                ("C", 1003),
            ]
            assert h.window.confirmed_outputs == 237
            assert h.state.reloads == 1
            assert await h.statuses_until("ok") == [
                "down",
                "loading",
                "loading",
                "ok",
            ]


async def test_standin_restart_resets_the_zmq_counters() -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"sequence")
    try:
        with trio.fail_after(20):
            async with open_standin(CHAIN) as node:
                assert node.publisher is not None
                sub.connect(node.zmq_bound["sequence"])
                await node.publisher.wait_subscribed(["sequence"])
                node.connect_block(real_block(774628))
                node.connect_block(real_block(951658))
                await node.restart()
                node.disconnect_tip()
                frames = [await zmq_recv(sub) for _ in range(3)]
        assert [(f[1][32:], f[2]) for f in frames] == [
            (b"C", b"\x00\x00\x00\x00"),
            (b"C", b"\x01\x00\x00\x00"),
            (b"D", b"\x00\x00\x00\x00"),
        ]
        assert frames[2][1][:32] == HASH[951658][::-1]
    finally:
        sub.close(linger=0)
        ctx.term()


async def test_node_down_at_start_appears_a_minute_later(autojump_clock) -> None:
    with trio.fail_after(600):
        async with open_standin(CHAIN, start_down=True) as node:
            start = trio.current_time()
            async with running_sync(node) as h:
                await trio.sleep(60)
                assert h.state.status == "down"
                assert h.state.detail.startswith(
                    f"cannot reach the node's RPC at {node.url} ("
                )
                await node.start_rpc()
                assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
                # Retries at 0, 1, 3, 7, 15, 31 and 63 s (backoff 1 s doubling).
                assert trio.current_time() - start == 63.0
                assert h.window.confirmed_outputs == 169
                assert await h.statuses_until("ok") == [
                    "down",
                    "loading",
                    "loading",
                    "ok",
                ]


async def test_wrong_credentials_name_the_fix_and_are_retried(autojump_clock) -> None:
    with trio.fail_after(600):
        async with open_standin(CHAIN) as node:
            rpc = client_for(node, password="not-the-password")
            async with running_sync(node, rpc=rpc) as h:
                await trio.sleep(30)
                assert h.state.status == "error"
                assert h.state.detail == (
                    f"the node at {node.url} refused our RPC credentials (HTTP 401): "
                    "the user/password from --rpc-user do not match the node's "
                    "rpcuser/rpcpassword (or rpcauth) in bitcoin.conf; fix them, or "
                    "use the cookie with --datadir"
                )
                # The operator fixes the node's side; the next retry succeeds.
                node.password = "not-the-password"
                assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
                assert await h.statuses_until("ok") == [
                    "error",
                    "loading",
                    "loading",
                    "ok",
                ]


async def test_missing_zmq_topics_print_the_bitcoin_conf_lines(caplog) -> None:
    caplog.set_level(logging.INFO, logger="oracle.nodesync")
    settings = attrs.evolve(SETTINGS, zmq_sequence="tcp://127.0.0.1:29000")
    with trio.fail_after(30):
        async with open_standin(CHAIN, zmq={"rawtx": "tcp://127.0.0.1:0"}) as node:
            async with running_sync(node, settings=settings) as h:
                # The confirmed baseline still loads.
                assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
                with trio.move_on_after(5):
                    while h.state.status == "loading":
                        await trio.sleep(0.01)
                assert h.state.status == "degraded"
                assert h.state.detail == (
                    f"the node at {node.url} does not publish ZMQ sequence. Add "
                    "to bitcoin.conf and restart bitcoind:\n"
                    "zmqpubsequence=tcp://127.0.0.1:29000"
                )
    lines = [r.getMessage() for r in caplog.records]
    assert (
        'node_zmq_missing topics=sequence add="zmqpubsequence=tcp://127.0.0.1:29000"'
        in lines
    )


async def test_syncing_node_is_waited_for(autojump_clock) -> None:
    with trio.fail_after(600):
        async with open_standin(CHAIN, ibd=True) as node, running_sync(node) as h:
            await trio.sleep(100)
            assert h.state.status == "syncing"
            assert "initial block download" in h.state.detail
            node.ibd = False
            assert await h.blocks(2) == [("C", 1001), ("C", 1002)]


async def test_whole_service_with_the_standin_node() -> None:
    """``run_service`` with RPC configured: the baseline arrives through node
    sync, and a block announced over ZMQ is fetched in full and confirmed."""
    import time

    from oracle.service import run_service

    # Start at height 0, as a real chain does; 553724 (2018) stays outside a
    # window reaching one hour before 757739.
    chain = {0: 553724, 1: 757739, 2: 757753}
    with trio.fail_after(60):
        async with open_standin(chain) as node:
            assert node.publisher is not None
            settings = Settings(
                port=0,
                window_seconds=time.time() - 1665249955 + 3600,
                rpc_url=node.url,
                rpc_user=node.user,
                rpc_password=node.password,
                zmq_rawtx=node.zmq_bound["rawtx"],
                zmq_sequence=node.zmq_bound["sequence"],
            )
            async with trio.open_nursery() as nursery:
                info = await nursery.start(partial(run_service, settings))
                service = info.service
                await node.publisher.wait_subscribed(["rawtx", "sequence"])
                while service.node is None or service.node.status != "ok":
                    await trio.sleep(0.02)
                assert service.node.baseline_blocks == 2
                window = service.window
                assert window is not None
                while window.confirmed_outputs != 169:
                    await trio.sleep(0.02)
                node.connect_block(real_block(774628))
                while window.confirmed_outputs != 237:
                    await trio.sleep(0.02)
                assert window.mempool_outputs == 0
                assert service.node.blocks_sent == 3
                assert node.calls.count("getblock") == 3
                nursery.cancel_scope.cancel()


async def test_a_block_failing_mid_baseline_is_retried(autojump_clock) -> None:
    with trio.fail_after(600):
        async with open_standin(CHAIN) as node:
            node.faults["getblock"] = 1
            async with running_sync(node) as h:
                assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
                assert await h.statuses_until("ok") == [
                    "loading",
                    "loading",
                    "syncing",
                    "loading",
                    "loading",
                    "ok",
                ]
                # Both blocks were asked for at once; the whole load is redone.
                assert node.calls.count("getblock") == 4


async def test_a_zmq_port_mismatch_is_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="oracle.nodesync")
    with trio.fail_after(30):
        async with open_standin(CHAIN) as node:
            async with running_sync(node) as h:  # SETTINGS: ports 28332/28333
                assert await h.blocks(2) == [("C", 1001), ("C", 1002)]
                assert await h.statuses_until("ok") == ["loading", "loading", "ok"]
            bound = node.zmq_bound
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"node_zmq_port_differs topic=rawtx node={bound['rawtx']} "
        "ours=tcp://127.0.0.1:28332",
        f"node_zmq_port_differs topic=sequence node={bound['sequence']} "
        "ours=tcp://127.0.0.1:28333",
    ]
