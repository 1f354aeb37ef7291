"""A stand-in Bitcoin Core for tests: JSON-RPC over HTTP plus a ZMQ publisher.

It serves real mainnet blocks from ``tests/data`` on loopback. The test
chooses the chain: which real block stands at which height (each keeps its
real hash and header, so a block's time is its real time). Heights must be
consecutive; the blocks need not be (the stand-in does not check that a
block's parent hash matches the block below it).

RPC methods: ``getblockchaininfo``, ``getblockcount``, ``getblockhash``,
``getblockheader``, ``getblock`` (verbosity 0 and 1), ``getrawmempool``,
``getzmqnotifications``, ``getnetworkinfo``; errors use Core's codes and
HTTP statuses (JSON-RPC 1.0 style: 500 for an error object, 404 for an
unknown method, 401 for bad credentials). With ``rest=True``,
``GET /rest/block/<hash>.bin`` too.

Test controls (all on the trio thread):

* :meth:`StandinNode.connect_block` - a new tip: ``rawtx`` of every
  transaction, then ``sequence C``, then ``hashblock``, as Core announces it;
* :meth:`StandinNode.disconnect_tip` - ``sequence D`` and the tip goes;
* :meth:`StandinNode.add_mempool_tx` - ``rawtx`` + ``sequence A``;
* :meth:`StandinNode.stop_rpc` / :meth:`StandinNode.start_rpc` - the RPC
  port refuses connections while stopped (``start_down=True`` starts so);
* :meth:`StandinNode.restart` - RPC down and up again, a new cookie, and the
  ZMQ counters back to 0 (the ZMQ socket itself stays bound, which a
  subscriber cannot tell from a restart, since SUB sockets reconnect
  silently);
* ``faults`` (method -> count): the next calls of a method fail with Core's
  warm-up error -28;
* attributes ``user``/``password`` (change them to refuse the client),
  ``ibd``, ``chain_name``, ``rest``; ZMQ topics left out of ``zmq`` are
  missing from ``getzmqnotifications``.

``calls`` records every RPC method called, in order.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
import zmq

from oracle.decode import Block, parse_block
from oracle.replay import CorePublisher

DATA_DIR = Path(__file__).resolve().parent / "data"
BLOCKS_DIR = DATA_DIR / "blocks"


def block_path(height: int) -> Path:
    """The data file of the real block at mainnet ``height``."""
    (path,) = DATA_DIR.glob(f"blocks*/{height}-*.bin")
    return path


def real_block(height: int) -> bytes:
    """The raw bytes of the real mainnet block at ``height``."""
    return block_path(height).read_bytes()


async def zmq_recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one multipart message from ``sock`` under trio.

    Follows the edge-triggered reader rule: try NOBLOCK until ``zmq.Again``,
    then check ``EVENTS``; only when ``POLLIN`` is clear wait on the FD.
    """
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            continue
        await trio.lowlevel.wait_readable(int(sock.getsockopt(zmq.FD)))


class _RpcFault(Exception):
    def __init__(self, code: int, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@attrs.define(eq=False)
class StandinNode:
    """The stand-in's state; create and run it with :func:`open_standin`."""

    blocks: dict[int, bytes]
    chain_name: str = "main"
    user: str = "standin"
    password: str = "standin-password"
    ibd: bool = False
    rest: bool = False
    datadir: Path | None = None
    zmq: dict[str, str | None] = attrs.field(
        factory=lambda: {"rawtx": "tcp://127.0.0.1:0", "sequence": "tcp://127.0.0.1:0"}
    )
    calls: list[str] = attrs.field(factory=list)
    paths: list[str] = attrs.field(factory=list)  # HTTP request targets
    #: method -> how many of its next calls fail with Core's warm-up error.
    faults: dict[str, int] = attrs.field(factory=dict)
    mempool: list[bytes] = attrs.field(factory=list)  # raw transactions
    port: int = 0
    publisher: CorePublisher | None = None
    _parsed: dict[int, Block] = attrs.field(factory=dict)
    _by_hash: dict[str, int] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _rpc_scope: trio.CancelScope | None = None
    _rpc_closed: trio.Event | None = None
    _mempool_seq: int = 0

    def __attrs_post_init__(self) -> None:
        for height, raw in self.blocks.items():
            self._index(height, raw)

    def _index(self, height: int, raw: bytes) -> Block:
        block = parse_block(raw)
        self._parsed[height] = block
        self._by_hash[block.hash_hex] = height
        return block

    # ------------------------------------------------------------ views

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tip(self) -> int:
        return max(self.blocks)

    def block(self, height: int) -> Block:
        return self._parsed[height]

    def hash_at(self, height: int) -> str:
        return self._parsed[height].hash_hex

    @property
    def zmq_bound(self) -> dict[str, str]:
        """Topic -> bound endpoint, for a subscriber to connect to."""
        return dict(self.publisher.bound) if self.publisher else {}

    def write_cookie(self) -> Path | None:
        """Write ``<datadir>/.cookie`` as bitcoind does at start."""
        if self.datadir is None:
            return None
        path = self.datadir / ".cookie"
        path.write_text(f"__cookie__:{self.password}")
        return path

    # ------------------------------------------------------------ controls

    def connect_block(self, raw: bytes) -> int:
        """Make ``raw`` the new tip; announce it over ZMQ; return its height."""
        height = self.tip + 1
        self.blocks[height] = raw
        block = self._index(height, raw)
        mined = {tx.txid for tx in block.txs}
        self.mempool = [r for r in self.mempool if parse_block_tx_id(r) not in mined]
        if self.publisher is not None:
            self.publisher.publish_block_connected(block)
        return height

    def disconnect_tip(self) -> str:
        """Remove the tip; announce ``sequence D``; return its display hash."""
        height = self.tip
        block = self._parsed.pop(height)
        del self.blocks[height]
        del self._by_hash[block.hash_hex]
        if self.publisher is not None:
            self.publisher.publish_block_disconnected(block.header.hash)
        return block.hash_hex

    def add_mempool_tx(self, raw_tx: bytes) -> None:
        """A transaction enters the mempool: ``rawtx`` then ``sequence A``."""
        self.mempool.append(raw_tx)
        if self.publisher is not None:
            self.publisher.publish_mempool_tx(
                raw_tx, parse_block_tx_id(raw_tx), self._mempool_seq
            )
        self._mempool_seq += 1

    async def start_rpc(self) -> None:
        """Listen on the RPC port (the same one as before, if any)."""
        assert self._nursery is not None
        if self._rpc_scope is not None:
            return
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self.write_cookie()
        await self._nursery.start(self._serve, listeners[0])

    async def stop_rpc(self) -> None:
        """Close the RPC port and every open connection; returns once closed."""
        if self._rpc_scope is None or self._rpc_closed is None:
            return
        self._rpc_scope.cancel()
        await self._rpc_closed.wait()
        self._rpc_scope = None

    async def restart(self) -> None:
        """RPC down and up, a new cookie password, ZMQ counters reset to 0."""
        await self.stop_rpc()
        if self.datadir is not None:
            self.password = secrets.token_hex(16)
        if self.publisher is not None:
            for topic in self.publisher.counters:
                self.publisher.counters[topic] = 0
        self._mempool_seq = 0
        await self.start_rpc()

    # ------------------------------------------------------------ HTTP

    async def _serve(
        self,
        listener: trio.SocketListener,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._rpc_closed = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._rpc_scope = scope
                task_status.started()
                async with trio.open_nursery() as nursery:
                    while True:
                        stream = await listener.accept()
                        nursery.start_soon(self._handle, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            self._rpc_closed.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            assert request is not None
            status, ctype, payload = self._respond(request, body)
            headers = [("Content-Type", ctype), ("Content-Length", str(len(payload)))]
            await stream.send_all(
                conn.send(h11.Response(status_code=status, headers=headers)) or b""
            )
            await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    def _authorised(self, request: h11.Request) -> bool:
        want = base64.b64encode(
            f"{'__cookie__' if self.datadir else self.user}:{self.password}".encode()
        )
        for name, value in request.headers:
            if name.lower() == b"authorization":
                return bytes(value) == b"Basic " + want
        return False

    def _respond(self, request: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        target = request.target.decode()
        self.paths.append(target)
        if request.method == b"GET" and target.startswith("/rest/block/"):
            if not self.rest:
                return 404, "text/plain", b"REST is disabled\r\n"
            name = target[len("/rest/block/") :]
            if not name.endswith(".bin") or name[:-4] not in self._by_hash:
                return 404, "text/plain", b"Block not found\r\n"
            self.calls.append("rest_block")
            return (
                200,
                "application/octet-stream",
                self.blocks[self._by_hash[name[:-4]]],
            )
        if not self._authorised(request):
            return 401, "text/html", b""
        try:
            doc = json.loads(body)
            method, params, rid = doc["method"], doc.get("params", []), doc.get("id")
        except (ValueError, KeyError, TypeError):
            return 500, "application/json", _reply(None, -32700, "Parse error")
        self.calls.append(method)
        if self.faults.get(method, 0) > 0:
            self.faults[method] -= 1
            return 500, "application/json", _reply(rid, -28, "Loading block index...")
        try:
            result = self._dispatch(method, list(params))
        except _RpcFault as fault:
            return (
                fault.status,
                "application/json",
                _reply(rid, fault.code, fault.message),
            )
        text = json.dumps({"result": result, "error": None, "id": rid})
        return 200, "application/json", text.encode() + b"\n"

    # ------------------------------------------------------------ RPC methods

    def _height_of(self, block_hash: Any) -> int:
        if not isinstance(block_hash, str) or len(block_hash) != 64:
            raise _RpcFault(-8, "blockhash must be of length 64")
        height = self._by_hash.get(block_hash)
        if height is None:
            raise _RpcFault(-5, "Block not found")
        return height

    def _header(self, height: int) -> dict[str, Any]:
        block = self._parsed[height]
        h = block.header
        out: dict[str, Any] = {
            "hash": block.hash_hex,
            "confirmations": self.tip - height + 1,
            "height": height,
            "version": h.version,
            "merkleroot": h.merkle_root[::-1].hex(),
            "time": h.time,
            "nonce": h.nonce,
            "bits": f"{h.bits:08x}",
            "nTx": block.tx_count,
            "previousblockhash": h.prev_hash_hex,
        }
        if height + 1 in self._parsed:
            out["nextblockhash"] = self._parsed[height + 1].hash_hex
        return out

    def _dispatch(self, method: str, params: list[Any]) -> Any:
        if method == "getblockchaininfo":
            return {
                "chain": self.chain_name,
                "blocks": self.tip,
                "headers": self.tip + (1000 if self.ibd else 0),
                "bestblockhash": self.hash_at(self.tip),
                "initialblockdownload": self.ibd,
                "verificationprogress": 0.5 if self.ibd else 1.0,
                "pruned": False,
            }
        if method == "getblockcount":
            return self.tip
        if method == "getblockhash":
            if not params or not isinstance(params[0], int):
                raise _RpcFault(-1, "getblockhash height")
            if params[0] not in self._parsed:
                raise _RpcFault(-8, "Block height out of range")
            return self.hash_at(params[0])
        if method == "getblockheader":
            if not params:
                raise _RpcFault(-1, "getblockheader blockhash")
            return self._header(self._height_of(params[0]))
        if method == "getblock":
            if not params:
                raise _RpcFault(-1, "getblock blockhash")
            height = self._height_of(params[0])
            verbosity = params[1] if len(params) > 1 else 1
            if verbosity == 0:
                return self.blocks[height].hex()
            block = self._parsed[height]
            return {
                **self._header(height),
                "size": block.size,
                "tx": [tx.txid_hex for tx in block.txs],
            }
        if method == "getrawmempool":
            return [parse_block_tx_id(r)[::-1].hex() for r in self.mempool]
        if method == "getzmqnotifications":
            bound = self.zmq_bound
            return [
                {"type": f"pub{topic}", "address": bound[topic], "hwm": 1000}
                for topic in ("hashblock", "rawtx", "sequence")
                if topic in bound
            ]
        if method == "getnetworkinfo":
            return {"version": 270000, "subversion": "/Satoshi:27.0.0/"}
        raise _RpcFault(-32601, "Method not found", status=404)


def parse_block_tx_id(raw_tx: bytes) -> bytes:
    """The txid (internal order) of a raw transaction."""
    from oracle.decode import parse_tx

    return parse_tx(raw_tx).txid


def _reply(rid: Any, code: int, message: str) -> bytes:
    text = json.dumps({"result": None, "error": {"code": code, "message": message}})
    return text[:-1].encode() + f', "id": {json.dumps(rid)}}}\n'.encode()


@asynccontextmanager
async def open_standin(
    blocks: Mapping[int, bytes | int],
    *,
    start_down: bool = False,
    **options: Any,
) -> AsyncIterator[StandinNode]:
    """Run a stand-in node serving ``blocks`` (height -> raw bytes, or the
    mainnet height of a block in ``tests/data``) until the block exits.

    With ``start_down`` the RPC port is chosen but not listened on until
    :meth:`StandinNode.start_rpc`. ``options`` are :class:`StandinNode`
    fields (``chain_name``, ``user``, ``password``, ``ibd``, ``rest``,
    ``datadir``, ``zmq``).
    """
    chain = {h: real_block(v) if isinstance(v, int) else v for h, v in blocks.items()}
    node = StandinNode(chain, **options)
    with CorePublisher.open(node.zmq) as pub:
        node.publisher = pub
        async with trio.open_nursery() as nursery:
            node._nursery = nursery
            if start_down:
                probe = await trio.open_tcp_listeners(0, host="127.0.0.1")
                node.port = probe[0].socket.getsockname()[1]
                await probe[0].aclose()
            else:
                await node.start_rpc()
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
