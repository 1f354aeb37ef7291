"""A small JSON-RPC client for Bitcoin Core, on trio.

:class:`RpcClient` sends one HTTP/1.1 POST per call (a fresh connection each
time, so concurrent calls never share a connection) with basic
authentication, and turns every failure into an :class:`RpcError` subclass
whose message names the cause and the fix.

Credentials and the URL are found the way ``bitcoin-cli`` finds them
(:func:`resolve_endpoint`): explicit user and password first, then an
explicit cookie file, then ``rpcuser``/``rpcpassword``/``rpccookiefile``/
``rpcport`` from ``<datadir>/bitcoin.conf`` (the network's section winning
over the top of the file), then the cookie that bitcoind writes at start,
``<datadir>/.cookie`` on main and ``<datadir>/<testnet3|testnet4|signet|
regtest>/.cookie`` elsewhere. A cookie is re-read on every call, because
bitcoind writes a new one each time it starts.

``rpcauth=`` lines in bitcoin.conf hold only a salted hash, from which no
password can be recovered: a node configured that way needs the user and
password given explicitly.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import h11
import trio

__all__ = [
    "DEFAULT_PORTS",
    "NETWORK_DIRS",
    "AuthenticationFailed",
    "CredentialsMissing",
    "NodeInfo",
    "NodeSyncing",
    "NodeUnreachable",
    "RpcCallError",
    "RpcClient",
    "RpcEndpoint",
    "RpcError",
    "RpcProtocolError",
    "WrongNetwork",
    "ZmqTopicsMissing",
    "parse_bitcoin_conf",
    "resolve_endpoint",
    "zmq_conf_lines",
]

logger = logging.getLogger(__name__)

#: Default RPC port per network (Settings.network values).
DEFAULT_PORTS: Final = {
    "main": 8332,
    "test": 18332,
    "testnet4": 48332,
    "signet": 38332,
    "regtest": 18443,
}
#: Sub-directory of the data directory per network ("" for main).
NETWORK_DIRS: Final = {
    "main": "",
    "test": "testnet3",
    "testnet4": "testnet4",
    "signet": "signet",
    "regtest": "regtest",
}
#: Options that bitcoind reads only from the network's own section when the
#: network is not main (the top of the file applies to main only).
_NETWORK_ONLY: Final = frozenset({"rpcport", "rpcbind", "port", "bind", "connect"})
#: Largest response accepted: a 4 MB block is 8 MB of hex, plus JSON.
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
#: Core's RPC error code while it loads its indexes at start.
RPC_IN_WARMUP: Final = -28
#: Suggested endpoints per ZMQ topic, for the bitcoin.conf lines we print.
_ZMQ_SUGGESTED: Final = {
    "rawtx": "tcp://127.0.0.1:28332",
    "sequence": "tcp://127.0.0.1:28333",
    "hashblock": "tcp://127.0.0.1:28334",
}


# ---------------------------------------------------------------- errors


class RpcError(Exception):
    """Base of every error this module raises; the message names the fix.

    ``retryable`` says whether the same call may succeed later without
    anyone changing the configuration (node down, starting or syncing).
    """

    retryable: bool = False


class NodeUnreachable(RpcError):
    """No HTTP answer: connection refused, reset, name unknown or timed out."""

    retryable = True


class AuthenticationFailed(RpcError):
    """The node answered 401 or 403 to our credentials."""


class CredentialsMissing(RpcError):
    """No user/password, bitcoin.conf entry or cookie file could be found."""


class RpcProtocolError(RpcError):
    """The answer was not HTTP or not JSON-RPC (wrong port, proxy, too big)."""


class WrongNetwork(RpcError):
    """``getblockchaininfo.chain`` differs from the configured network."""


class NodeSyncing(RpcError):
    """The node is in initial block download."""

    retryable = True


class ZmqTopicsMissing(RpcError):
    """The node does not publish ZMQ topics we need.

    ``lines`` holds the exact ``bitcoin.conf`` lines to add.
    """

    def __init__(self, message: str, missing: list[str], lines: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.lines = lines


class RpcCallError(RpcError):
    """The node returned a JSON-RPC error object for ``method``."""

    def __init__(self, method: str, code: int, message: str, status: int) -> None:
        fix = ""
        if code == RPC_IN_WARMUP:
            fix = " (the node is still starting; retry shortly)"
        elif code == -32601:
            fix = " (method not found: is this node too old, or a different service?)"
        elif code == -5:
            fix = " (not found on this node: pruned, or not on its best chain?)"
        super().__init__(
            f"RPC {method} failed: error {code}: {message}{fix} [HTTP {status}]"
        )
        self.method = method
        self.code = code
        self.rpc_message = message
        self.status = status
        self.retryable = code == RPC_IN_WARMUP


# ---------------------------------------------------------------- configuration


def parse_bitcoin_conf(text: str, network: str) -> dict[str, str]:
    """The options of a ``bitcoin.conf`` that apply to ``network``.

    Top-of-file options apply to every network except the network-only ones
    (``rpcport``, ``rpcbind``, ...), which apply to main only; a
    ``[main]``/``[test]``/``[testnet4]``/``[signet]``/``[regtest]`` section,
    or a ``<section>.option=`` prefix, wins for its network. The last
    occurrence of an option wins. Comments (``#``) and blank lines are
    ignored; malformed lines are skipped.
    """
    top: dict[str, str] = {}
    own: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if "." in key:
            prefix, key = key.split(".", 1)
            if prefix != network:
                continue
            own[key] = value
        elif section == "":
            top[key] = value
        elif section == network:
            own[key] = value
    if network != "main":
        top = {k: v for k, v in top.items() if k not in _NETWORK_ONLY}
    return {**top, **own}


@attrs.frozen
class RpcEndpoint:
    """Where and how to reach a node's RPC.

    Either ``user``/``password`` or ``cookie`` is set. ``source`` says where
    the credentials came from, for error messages.
    """

    url: str
    user: str | None
    password: str | None = attrs.field(repr=False)
    cookie: Path | None
    source: str


def _default_datadir() -> Path:
    return Path.home() / ".bitcoin"


def resolve_endpoint(
    *,
    network: str = "main",
    rpc_url: str | None = None,
    rpc_user: str | None = None,
    rpc_password: str | None = None,
    rpc_cookie: Path | None = None,
    datadir: Path | None = None,
) -> RpcEndpoint:
    """Find the URL and credentials for ``network``'s RPC, as described above.

    The data directory defaults to ``~/.bitcoin``. The URL defaults to
    ``http://127.0.0.1:<rpcport>``, ``rpcport`` from bitcoin.conf or the
    network's default port. The cookie file need not exist yet (the node may
    be down); it is read at each call.

    Raises:
      ValueError: ``network`` is not one of :data:`DEFAULT_PORTS`.
    """
    if network not in DEFAULT_PORTS:
        raise ValueError(f"unknown network {network!r}; one of {list(DEFAULT_PORTS)}")
    base = Path(datadir).expanduser() if datadir is not None else _default_datadir()
    netdir = base / NETWORK_DIRS[network] if NETWORK_DIRS[network] else base
    conf_path = base / "bitcoin.conf"
    conf: dict[str, str] = {}
    try:
        conf = parse_bitcoin_conf(conf_path.read_text(errors="replace"), network)
    except OSError:
        pass
    if rpc_url is None:
        port = conf.get("rpcport", str(DEFAULT_PORTS[network]))
        rpc_url = f"http://127.0.0.1:{port}"
    if rpc_user is not None and rpc_password is not None:
        return RpcEndpoint(rpc_url, rpc_user, rpc_password, None, "--rpc-user")
    if rpc_cookie is not None:
        return RpcEndpoint(
            rpc_url, None, None, Path(rpc_cookie), f"cookie {rpc_cookie}"
        )
    if "rpcuser" in conf and "rpcpassword" in conf:
        return RpcEndpoint(
            rpc_url, conf["rpcuser"], conf["rpcpassword"], None, str(conf_path)
        )
    if "rpccookiefile" in conf:
        cookie = Path(conf["rpccookiefile"]).expanduser()
        if not cookie.is_absolute():
            cookie = netdir / cookie
        return RpcEndpoint(rpc_url, None, None, cookie, f"cookie {cookie}")
    cookie = netdir / ".cookie"
    return RpcEndpoint(rpc_url, None, None, cookie, f"cookie {cookie}")


def zmq_conf_lines(
    topics: Iterable[str], endpoints: Mapping[str, str | None] | None = None
) -> list[str]:
    """The ``bitcoin.conf`` lines that make a node publish ``topics``.

    ``endpoints`` (topic -> endpoint) gives the addresses to suggest, e.g.
    the ones the service subscribes to; otherwise 127.0.0.1:28332 and up.
    """
    lines = []
    for topic in topics:
        ep = (endpoints or {}).get(topic) or _ZMQ_SUGGESTED.get(topic)
        lines.append(f"zmqpub{topic}={ep}")
    return lines


# ---------------------------------------------------------------- client


@attrs.frozen
class NodeInfo:
    """What :meth:`RpcClient.check` learnt about the node."""

    chain: str
    blocks: int
    headers: int
    best_block_hash: str
    initial_block_download: bool
    verification_progress: float
    zmq: dict[str, str]  # topic -> address the node publishes on


@attrs.define(eq=False)
class RpcClient:
    """JSON-RPC over HTTP to one node.

    Safe to use from many tasks at once: every call opens its own
    connection. ``timeout`` bounds each call (connect, send and receive).
    ``rest`` makes :meth:`raw_block` try ``/rest/block/<hash>.bin`` first
    (half the bytes; needs ``rest=1`` on the node), falling back to RPC for
    good if the node answers 404 or 403.
    """

    endpoint: RpcEndpoint
    timeout: float = 120.0
    rest: bool = False
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> RpcClient:
        """A client for ``settings`` (an ``oracle.config.Settings``).

        Raises:
          ValueError: unknown network.
        """
        return cls(
            resolve_endpoint(
                network=settings.network,
                rpc_url=settings.rpc_url,
                rpc_user=settings.rpc_user,
                rpc_password=settings.rpc_password,
                rpc_cookie=settings.rpc_cookie,
                datadir=settings.datadir,
            ),
            **kwargs,
        )

    @property
    def url(self) -> str:
        return self.endpoint.url

    def _auth(self) -> bytes:
        ep = self.endpoint
        if ep.user is not None and ep.password is not None:
            pair = f"{ep.user}:{ep.password}"
        elif ep.cookie is not None:
            try:
                pair = ep.cookie.read_text().strip()
            except FileNotFoundError:
                raise CredentialsMissing(
                    f"no RPC credentials: cookie file {ep.cookie} does not exist. "
                    "Start bitcoind (it writes the cookie), point --datadir at its "
                    "data directory or --rpc-cookie at the file, or give "
                    "--rpc-user and --rpc-password"
                ) from None
            except OSError as exc:
                raise CredentialsMissing(
                    f"cannot read RPC cookie {ep.cookie}: {exc.strerror or exc}. "
                    "Run as a user that can read it (e.g. in the bitcoin group, "
                    "with rpccookieperms=group on Core 28+), or give "
                    "--rpc-user and --rpc-password"
                ) from None
            if ":" not in pair:
                raise CredentialsMissing(
                    f"RPC cookie {ep.cookie} does not hold user:password"
                )
        else:  # pragma: no cover - RpcEndpoint always sets one
            raise CredentialsMissing("no RPC credentials configured")
        return b"Basic " + base64.b64encode(pair.encode())

    async def _http(
        self, method: str, path: str, body: bytes, what: str
    ) -> tuple[int, bytes]:
        parts = urlsplit(self.endpoint.url)
        if parts.scheme != "http":
            raise RpcProtocolError(
                f"{self.url}: only http:// is supported (Core's RPC has no TLS); "
                "use an SSH tunnel or a local proxy for a remote node"
            )
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        # JSON-RPC goes to the URL's own path ("/" or e.g. "/wallet/w1");
        # REST paths hang under the URL's path without its trailing slash.
        target = (parts.path or "/") if path == "/" else parts.path.rstrip("/") + path
        auth = self._auth()
        conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=64 * 1024)
        headers = [
            ("Host", f"{host}:{port}"),
            ("Authorization", auth.decode()),
            ("Connection", "close"),
            ("User-Agent", "fiatprint"),
        ]
        if method == "POST":
            headers += [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
            ]
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    req = h11.Request(method=method, target=target, headers=headers)
                    await stream.send_all(conn.send(req) or b"")
                    if body:
                        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return await self._read_response(conn, stream)
        except trio.TooSlowError:
            raise NodeUnreachable(
                f"the node at {self.url} did not answer {what} within "
                f"{self.timeout:g} s: is it overloaded or still starting?"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise NodeUnreachable(
                f"cannot reach the node's RPC at {self.url} ({reason}): is bitcoind "
                "running with server=1, and do --rpc-url / rpcport / rpcbind match?"
            ) from None
        except trio.BrokenResourceError:
            raise NodeUnreachable(
                f"the node at {self.url} closed the connection during {what}: "
                "is it shutting down or restarting?"
            ) from None
        except h11.RemoteProtocolError as exc:
            raise RpcProtocolError(
                f"{self.url} did not answer with valid HTTP ({exc}): "
                "is --rpc-url pointing at the node's RPC port?"
            ) from None

    async def _read_response(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[int, bytes]:
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(256 * 1024)
                if not data:
                    conn.receive_data(b"")
                else:
                    conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise RpcProtocolError(
                        f"{self.url}: response larger than {MAX_RESPONSE_BYTES} bytes"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if status == 0:
                    raise RpcProtocolError(
                        f"{self.url} closed the connection without an HTTP answer"
                    )
                return status, b"".join(chunks)

    def _auth_error(self, status: int) -> AuthenticationFailed:
        ep = self.endpoint
        if ep.cookie is not None:
            fix = (
                f"the cookie {ep.cookie} is stale or belongs to another node: "
                "point --datadir/--rpc-cookie at this node's data directory, or "
                "give --rpc-user and --rpc-password"
            )
        else:
            fix = (
                f"the user/password from {ep.source} do not match the node's "
                "rpcuser/rpcpassword (or rpcauth) in bitcoin.conf; fix them, or "
                "use the cookie with --datadir"
            )
        return AuthenticationFailed(
            f"the node at {self.url} refused our RPC credentials (HTTP {status}): {fix}"
        )

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with positional ``params``; return its ``result``.

        Raises:
          NodeUnreachable: no connection, closed early, or timeout.
          AuthenticationFailed: HTTP 401/403.
          CredentialsMissing: the cookie file is missing or unreadable.
          RpcCallError: the node returned an error object (``.code``).
          RpcProtocolError: the answer was not JSON-RPC.

        Cancellation: the connection is closed; the node may still run the
        call.
        """
        request_id = next(self._ids)
        payload = json.dumps(
            {"jsonrpc": "1.0", "id": request_id, "method": method, "params": params}
        ).encode()
        status, body = await self._http("POST", "/", payload, method)
        if status in (401, 403):
            raise self._auth_error(status)
        if status == 503:
            raise NodeUnreachable(
                f"the node at {self.url} is busy (HTTP 503: work queue full); "
                "retry later or raise rpcworkqueue"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            raise RpcProtocolError(
                f"{self.url} answered {method} with HTTP {status} and no JSON: "
                "is --rpc-url pointing at the node's RPC port?"
            ) from None
        if not isinstance(doc, dict) or "result" not in doc and "error" not in doc:
            raise RpcProtocolError(f"{self.url}: {method}: not a JSON-RPC answer")
        error = doc.get("error")
        if error:
            code = error.get("code", 0) if isinstance(error, dict) else 0
            text = error.get("message", "") if isinstance(error, dict) else str(error)
            raise RpcCallError(method, int(code), str(text), status)
        if status != 200:
            raise RpcProtocolError(f"{self.url}: {method}: HTTP {status}")
        return doc.get("result")

    async def raw_block(self, block_hash: str) -> bytes:
        """The serialised block whose display-hex hash is ``block_hash``.

        Uses REST when enabled and available, else ``getblock <hash> 0``.

        Raises:
          RpcCallError: unknown block (code -5) or pruned (-1); and the
            errors of :meth:`call`.
        """
        if self.rest:
            status, body = await self._http(
                "GET", f"/rest/block/{block_hash}.bin", b"", "REST block"
            )
            if status == 200:
                return body
            if status in (403, 404):
                logger.warning(
                    "rpc_rest_unavailable status=%d url=%s", status, self.url
                )
                self.rest = False
            elif status in (400, 500) and b"not found" in body.lower():
                raise RpcCallError("getblock", -5, "Block not found", status)
            else:
                raise RpcProtocolError(f"{self.url}: REST block: HTTP {status}")
        hex_block = await self.call("getblock", block_hash, 0)
        if not isinstance(hex_block, str):
            raise RpcProtocolError(f"{self.url}: getblock did not return hex")
        try:
            return bytes.fromhex(hex_block)
        except ValueError:
            raise RpcProtocolError(f"{self.url}: getblock returned bad hex") from None

    async def check(
        self,
        *,
        network: str,
        zmq_topics: Iterable[str] = (),
        zmq_endpoints: Mapping[str, str | None] | None = None,
        allow_ibd: bool = False,
    ) -> NodeInfo:
        """Check that the node is the right one and ready.

        Raises:
          WrongNetwork: ``getblockchaininfo.chain`` is not ``network``.
          NodeSyncing: in initial block download (unless ``allow_ibd``).
          ZmqTopicsMissing: a topic of ``zmq_topics`` is not published; the
            message holds the bitcoin.conf lines to add.
          and the errors of :meth:`call`.
        """
        info = await self.call("getblockchaininfo")
        try:
            chain = str(info["chain"])
            node = NodeInfo(
                chain=chain,
                blocks=int(info["blocks"]),
                headers=int(info.get("headers", info["blocks"])),
                best_block_hash=str(info.get("bestblockhash", "")),
                initial_block_download=bool(info.get("initialblockdownload", False)),
                verification_progress=float(info.get("verificationprogress", 1.0)),
                zmq={},
            )
        except (KeyError, TypeError, ValueError):
            raise RpcProtocolError(
                f"{self.url}: getblockchaininfo lacks chain/blocks"
            ) from None
        if chain != network:
            raise WrongNetwork(
                f"the node at {self.url} is on chain {chain!r} but the configured "
                f"network is {network!r}: set --network {chain} or point --rpc-url "
                f"at a {network} node (default port {DEFAULT_PORTS.get(network)})"
            )
        if node.initial_block_download and not allow_ibd:
            raise NodeSyncing(
                f"the node at {self.url} is in initial block download (block "
                f"{node.blocks} of {node.headers} headers, "
                f"{node.verification_progress:.1%} verified): prices need a synced "
                "node; this clears by itself once it catches up"
            )
        wanted = list(zmq_topics)
        if wanted:
            notes = await self.call("getzmqnotifications")
            published = {}
            for item in notes if isinstance(notes, list) else []:
                if isinstance(item, dict) and "type" in item:
                    kind = str(item["type"])
                    if kind.startswith("pub"):
                        kind = kind[3:]
                    published[kind] = str(item.get("address", ""))
            node = attrs.evolve(node, zmq=published)
            missing = [t for t in wanted if t not in published]
            if missing:
                lines = zmq_conf_lines(missing, zmq_endpoints)
                raise ZmqTopicsMissing(
                    f"the node at {self.url} does not publish ZMQ "
                    f"{', '.join(missing)}. Add to bitcoin.conf and restart "
                    "bitcoind:\n" + "\n".join(lines),
                    missing,
                    lines,
                )
        return node
