"""The RPC client against the stand-in node on loopback: calls, raw blocks,
credentials from flags, bitcoin.conf and cookies, and errors that name the fix.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from oracle.rpc import (
    AuthenticationFailed,
    CredentialsMissing,
    NodeSyncing,
    NodeUnreachable,
    RpcCallError,
    RpcClient,
    RpcEndpoint,
    RpcProtocolError,
    WrongNetwork,
    ZmqTopicsMissing,
    parse_bitcoin_conf,
    resolve_endpoint,
)

try:
    from .standin import open_standin, real_block
except ImportError:
    from standin import open_standin, real_block  # type: ignore[no-redef]

HASH_553724 = "0000000000000000002849bd7ea6df81fa2f07652af0600ffa0f2b0bc47d736c"
HASH_542213 = "000000000000000000143a2c56c0214236dadfd30df41d4a0345492ad6d861ec"


def client_for(node, **kw) -> RpcClient:
    return RpcClient(
        RpcEndpoint(node.url, node.user, node.password, None, "--rpc-user"), **kw
    )


async def test_calls_and_raw_block_match_the_real_block() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 542213, 11: 553724}) as node:
            rpc = client_for(node)
            assert await rpc.call("getblockcount") == 11
            assert await rpc.call("getblockhash", 11) == HASH_553724
            header = await rpc.call("getblockheader", HASH_553724)
            assert header["time"] == 1544751216
            assert header["height"] == 11
            assert header["previousblockhash"] != HASH_542213  # real parent kept
            assert await rpc.raw_block(HASH_553724) == real_block(553724)
            verbose = await rpc.call("getblock", HASH_542213, 1)
            assert verbose["nTx"] == 4 and len(verbose["tx"]) == 4
            assert verbose["nextblockhash"] == HASH_553724
            assert node.calls == [
                "getblockcount",
                "getblockhash",
                "getblockheader",
                "getblock",
                "getblock",
            ]


async def test_rest_block_is_used_when_enabled_and_rpc_otherwise() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}, rest=True) as node:
            rpc = client_for(node, rest=True)
            assert await rpc.raw_block(HASH_553724) == real_block(553724)
            node.rest = False
            assert await rpc.raw_block(HASH_553724) == real_block(553724)
            assert rpc.rest is False  # 404 -> RPC for good
            assert node.calls == ["rest_block", "getblock"]


async def test_rpc_error_object_keeps_the_code() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}) as node:
            rpc = client_for(node)
            with pytest.raises(RpcCallError) as err:
                await rpc.call("getblockhash", 99)
            assert err.value.code == -8
            assert str(err.value) == (
                "RPC getblockhash failed: error -8: Block height out of range "
                "[HTTP 500]"
            )
            with pytest.raises(RpcCallError) as err:
                await rpc.call("getblock", "00" * 32, 0)
            assert err.value.code == -5
            assert "not found on this node" in str(err.value)
            with pytest.raises(RpcCallError) as err:
                await rpc.call("nosuchmethod")
            assert (err.value.code, err.value.status) == (-32601, 404)


async def test_wrong_credentials_name_the_fix() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}) as node:
            rpc = RpcClient(RpcEndpoint(node.url, "alice", "wrong", None, "--rpc-user"))
            with pytest.raises(AuthenticationFailed) as err:
                await rpc.call("getblockcount")
            assert str(err.value) == (
                f"the node at {node.url} refused our RPC credentials (HTTP 401): "
                "the user/password from --rpc-user do not match the node's "
                "rpcuser/rpcpassword (or rpcauth) in bitcoin.conf; fix them, or "
                "use the cookie with --datadir"
            )
            assert not err.value.retryable


async def test_connection_refused_names_the_fix() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}, start_down=True) as node:
            rpc = client_for(node)
            with pytest.raises(NodeUnreachable) as err:
                await rpc.call("getblockcount")
            assert str(err.value).startswith(
                f"cannot reach the node's RPC at {node.url} ("
            )
            assert str(err.value).endswith(
                "): is bitcoind running with server=1, and do --rpc-url / rpcport / "
                "rpcbind match?"
            )
            assert err.value.retryable
            await node.start_rpc()
            assert await rpc.call("getblockcount") == 10


async def test_cookie_is_reread_after_a_restart(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}, datadir=tmp_path) as node:
            ep = resolve_endpoint(rpc_url=node.url, datadir=tmp_path)
            assert ep.cookie == tmp_path / ".cookie"
            rpc = RpcClient(ep)
            assert await rpc.call("getblockcount") == 10
            await node.restart()
            assert (tmp_path / ".cookie").read_text().endswith(node.password)
            assert await rpc.call("getblockcount") == 10


async def test_missing_cookie_names_the_fix(tmp_path: Path) -> None:
    rpc = RpcClient(resolve_endpoint(rpc_url="http://127.0.0.1:1", datadir=tmp_path))
    with pytest.raises(CredentialsMissing) as err:
        await rpc.call("getblockcount")
    assert str(err.value).startswith(
        f"no RPC credentials: cookie file {tmp_path / '.cookie'} does not exist. "
        "Start bitcoind"
    )


async def test_check_reports_wrong_network_ibd_and_missing_zmq() -> None:
    with trio.fail_after(10):
        async with open_standin(
            {10: 553724}, zmq={"rawtx": "tcp://127.0.0.1:0"}
        ) as node:
            rpc = client_for(node)
            info = await rpc.check(network="main", zmq_topics=["rawtx"])
            assert (info.chain, info.blocks, info.best_block_hash) == (
                "main",
                10,
                HASH_553724,
            )
            assert info.zmq == {"rawtx": node.zmq_bound["rawtx"]}
            with pytest.raises(ZmqTopicsMissing) as err:
                await rpc.check(network="main", zmq_topics=["rawtx", "sequence"])
            assert err.value.lines == ["zmqpubsequence=tcp://127.0.0.1:28333"]
            assert str(err.value) == (
                f"the node at {node.url} does not publish ZMQ sequence. Add to "
                "bitcoin.conf and restart bitcoind:\n"
                "zmqpubsequence=tcp://127.0.0.1:28333"
            )
            with pytest.raises(ZmqTopicsMissing) as err:
                await rpc.check(
                    network="main",
                    zmq_topics=["sequence", "hashblock"],
                    zmq_endpoints={"sequence": "tcp://127.0.0.1:5555"},
                )
            assert err.value.lines == [
                "zmqpubsequence=tcp://127.0.0.1:5555",
                "zmqpubhashblock=tcp://127.0.0.1:28334",
            ]
            with pytest.raises(WrongNetwork) as err2:
                await rpc.check(network="signet")
            assert str(err2.value) == (
                f"the node at {node.url} is on chain 'main' but the configured "
                "network is 'signet': set --network main or point --rpc-url at a "
                "signet node (default port 38332)"
            )
            node.ibd = True
            with pytest.raises(NodeSyncing) as err3:
                await rpc.check(network="main")
            assert "initial block download (block 10 of 1010 headers" in str(err3.value)
            assert err3.value.retryable


async def test_not_http_is_a_protocol_error() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        request = b""
        while not request.endswith(b"}"):  # the end of the JSON body
            request += await stream.receive_some(65536)
        await stream.send_all(b"\x00\x01 this is not HTTP\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, garbage, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            rpc = RpcClient(
                RpcEndpoint(f"http://127.0.0.1:{port}", "u", "p", None, "--rpc-user")
            )
            with pytest.raises(RpcProtocolError) as err:
                await rpc.call("getblockcount")
            assert "did not answer with valid HTTP" in str(err.value)
            nursery.cancel_scope.cancel()


def test_bitcoin_conf_sections_and_network_only_options() -> None:
    conf = """
# a comment
rpcuser=top
rpcpassword=toppw  # trailing comment
rpcport=9000
server=1
regtest.rpcport=9999
[test]
rpcuser=testuser
[regtest]
rpcpassword=regpw
"""
    assert parse_bitcoin_conf(conf, "main") == {
        "rpcuser": "top",
        "rpcpassword": "toppw",
        "rpcport": "9000",
        "server": "1",
    }
    # rpcport at the top applies to main only; the [test] section wins.
    assert parse_bitcoin_conf(conf, "test") == {
        "rpcuser": "testuser",
        "rpcpassword": "toppw",
        "server": "1",
    }
    assert parse_bitcoin_conf(conf, "regtest") == {
        "rpcuser": "top",
        "rpcpassword": "regpw",
        "rpcport": "9999",
        "server": "1",
    }


def test_resolve_endpoint_order(tmp_path: Path) -> None:
    (tmp_path / "bitcoin.conf").write_text(
        "[signet]\nrpcport=40000\nrpccookiefile=my.cookie\n[main]\nrpcuser=u\n"
        "rpcpassword=p\n"
    )
    main = resolve_endpoint(datadir=tmp_path)
    assert (main.url, main.user, main.password, main.cookie) == (
        "http://127.0.0.1:8332",
        "u",
        "p",
        None,
    )
    assert main.source == str(tmp_path / "bitcoin.conf")
    flags = resolve_endpoint(datadir=tmp_path, rpc_user="x", rpc_password="y")
    assert (flags.user, flags.password, flags.source) == ("x", "y", "--rpc-user")
    signet = resolve_endpoint(network="signet", datadir=tmp_path)
    assert signet.url == "http://127.0.0.1:40000"
    assert signet.cookie == tmp_path / "signet" / "my.cookie"
    for network, port, sub in [
        ("test", 18332, "testnet3"),
        ("testnet4", 48332, "testnet4"),
        ("regtest", 18443, "regtest"),
    ]:
        ep = resolve_endpoint(network=network, datadir=tmp_path)
        assert ep.url == f"http://127.0.0.1:{port}"
        assert ep.cookie == tmp_path / sub / ".cookie"
    with pytest.raises(ValueError):
        resolve_endpoint(network="mainnet")


async def test_standin_mempool_follows_arrivals_and_blocks() -> None:
    from oracle.decode import parse_block

    block = parse_block(real_block(553724))
    with trio.fail_after(10):
        async with open_standin({10: 542213}) as node:
            rpc = client_for(node)
            node.add_mempool_tx(block.txs[1].raw)
            node.add_mempool_tx(block.txs[2].raw)
            assert await rpc.call("getrawmempool") == [
                block.txs[1].txid_hex,
                block.txs[2].txid_hex,
            ]
            assert node.connect_block(real_block(553724)) == 11
            assert await rpc.call("getrawmempool") == []
            assert await rpc.call("getblockcount") == 11
            info = await rpc.call("getnetworkinfo")
            assert info["subversion"] == "/Satoshi:27.0.0/"
            assert node.publisher is not None
            assert node.publisher.counters == {"rawtx": 2 + 4, "sequence": 2 + 1}


async def test_the_url_path_is_kept_for_rpc_and_rest() -> None:
    with trio.fail_after(10):
        async with open_standin({10: 553724}, rest=True) as node:
            for suffix, rest in (("", False), ("/", False), ("/wallet/w1", False)):
                rpc = RpcClient(
                    RpcEndpoint(node.url + suffix, node.user, node.password, None, "x"),
                    rest=rest,
                )
                await rpc.call("getblockcount")
            rest_client = RpcClient(
                RpcEndpoint(node.url + "/", node.user, node.password, None, "x"),
                rest=True,
            )
            await rest_client.raw_block(HASH_553724)
            assert node.paths == [
                "/",
                "/",
                "/wallet/w1",
                f"/rest/block/{HASH_553724}.bin",
            ]
