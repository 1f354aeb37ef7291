"""The replay publisher speaks Bitcoin Core's exact ZMQ format.

Real ZMQ sockets on 127.0.0.1 with ephemeral ports, a real mainnet block, and
every frame compared byte for byte.
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio
import zmq

from oracle import cli
from oracle.decode import parse_block
from oracle.replay import CorePublisher, run_replay

try:
    from .standin import BLOCKS_DIR, zmq_recv
except ImportError:
    from standin import BLOCKS_DIR, zmq_recv  # type: ignore[no-redef]

# 4 transactions (coinbase + 3), segwit-era, 1076 bytes.
BLOCK_553724 = (
    BLOCKS_DIR
    / "553724-0000000000000000002849bd7ea6df81fa2f07652af0600ffa0f2b0bc47d736c.bin"
)
HASH_553724 = "0000000000000000002849bd7ea6df81fa2f07652af0600ffa0f2b0bc47d736c"


def _le32(n: int) -> bytes:
    return struct.pack("<I", n)


def _expected_frames(path: Path) -> list[list[bytes]]:
    block = parse_block(path.read_bytes())
    frames: list[list[bytes]] = []
    n = 0
    for tx in block.txs[1:]:
        frames.append([b"rawtx", tx.raw, _le32(n)])
        txid_display = bytes.fromhex(tx.txid_hex)
        frames.append(
            [b"sequence", txid_display + b"A" + struct.pack("<Q", n), _le32(n)]
        )
        n += 1
    for i, tx in enumerate(block.txs):
        frames.append([b"rawtx", tx.raw, _le32(n + i)])
    frames.append([b"sequence", bytes.fromhex(HASH_553724) + b"C", _le32(n)])
    frames.append([b"hashblock", bytes.fromhex(HASH_553724), _le32(0)])
    return frames


async def test_shared_endpoint_carries_cores_frames_in_cores_order() -> None:
    expected = _expected_frames(BLOCK_553724)
    assert len(expected) == 3 * 2 + 4 + 2
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"rawtx", b"sequence", b"hashblock"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                ep = "tcp://127.0.0.1:0"
                bound = await nursery.start(
                    lambda task_status: run_replay(
                        [BLOCK_553724],
                        endpoints={"rawtx": ep, "sequence": ep, "hashblock": ep},
                        rate=None,
                        loop=False,
                        wait_for_subscriber=True,
                        task_status=task_status,
                    )
                )
                assert bound["rawtx"] == bound["sequence"] == bound["hashblock"]
                assert bound["rawtx"].startswith("tcp://127.0.0.1:")
                sub.connect(bound["rawtx"])
                got = [await zmq_recv(sub) for _ in expected]
        assert got == expected
        # The first transaction's txid as a block explorer shows it.
        assert (
            got[1][1][:32].hex()
            == parse_block(BLOCK_553724.read_bytes()).txs[1].txid_hex
        )
    finally:
        sub.close(linger=0)
        ctx.term()


async def test_separate_endpoints_keep_per_topic_counters() -> None:
    expected = _expected_frames(BLOCK_553724)
    ctx = zmq.Context()
    subs = {}
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                # Two topics on the same endpoint string share one socket;
                # "*" asks for an ephemeral port as "0" does.
                bound = await nursery.start(
                    lambda task_status: run_replay(
                        [BLOCK_553724, BLOCK_553724],
                        endpoints={
                            "rawtx": "tcp://127.0.0.1:0",
                            "sequence": "tcp://127.0.0.1:*",
                            "hashblock": None,
                        },
                        rate=1000.0,
                        loop=False,
                        wait_for_subscriber=True,
                        task_status=task_status,
                    )
                )
                assert set(bound) == {"rawtx", "sequence"}
                assert bound["rawtx"] != bound["sequence"]
                for topic in ("rawtx", "sequence"):
                    s = ctx.socket(zmq.SUB)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.SUBSCRIBE, b"")
                    s.connect(bound[topic])
                    subs[topic] = s
                per_topic = {
                    t: [f for f in expected if f[0] == t.encode()]
                    for t in ("rawtx", "sequence")
                }
                got_rawtx = [await zmq_recv(subs["rawtx"]) for _ in range(14)]
                got_seq = [await zmq_recv(subs["sequence"]) for _ in range(8)]
        # Replaying the same block twice continues the counters.
        assert [f[2] for f in got_rawtx] == [_le32(i) for i in range(14)]
        assert [f[2] for f in got_seq] == [_le32(i) for i in range(8)]
        assert got_rawtx[:7] == per_topic["rawtx"]
        assert got_seq[:4] == per_topic["sequence"]
        # Mempool sequence numbers continue too: 3 adds, 3 mined removals.
        assert [struct.unpack("<Q", f[1][33:])[0] for f in got_seq[4:7]] == [6, 7, 8]
    finally:
        for s in subs.values():
            s.close(linger=0)
        ctx.term()


def test_counter_wraps_at_2_pow_32() -> None:
    with CorePublisher.open({"rawtx": "tcp://127.0.0.1:0"}) as pub:
        pub.counters["rawtx"] = 2**32 - 1
        assert pub.publish("rawtx", b"x") == 2**32 - 1
        assert pub.publish("rawtx", b"x") == 0
        assert pub.publish("sequence", b"x") is None


def test_replay_subcommand_is_registered() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["replay", "--blocks", str(BLOCK_553724), "--rate", "5", "--once"]
    )
    assert args.once is True
    assert args.rate == 5.0
    assert args.blocks == [BLOCK_553724]
    assert args.hashblock is None


def test_replay_subcommand_runs_once_and_exits_0(capsys) -> None:
    status = cli.main(
        [
            "replay",
            "--blocks",
            str(BLOCK_553724),
            "--rate",
            "0",
            "--once",
            "--rawtx",
            "tcp://127.0.0.1:0",
            "--sequence",
            "tcp://127.0.0.1:*",
        ]
    )
    err = capsys.readouterr().err
    assert status == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("zmqpub")]
    assert [ln.split("=")[0] for ln in lines] == ["zmqpubrawtx", "zmqpubsequence"]
    assert all(ln.split("=")[1].startswith("tcp://127.0.0.1:") for ln in lines)


def test_replay_subcommand_rejects_a_bad_block_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(BLOCK_553724.read_bytes()[:100])
    status = cli.main(["replay", "--blocks", str(bad), "--once"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == (
        f"fiatprint replay: {bad}: not a valid block: transaction count 4 larger "
        "than the 19 bytes left at byte 80\n"
    )


async def test_burst_publishes_the_first_n_of_every_pass_back_to_back(
    autojump_clock: trio.testing.MockClock, monkeypatch
) -> None:
    # Publication times on trio's virtual clock: the first `burst` mempool
    # transactions of each pass at once, the rest `1/rate` apart, and every
    # pass with the same timing.
    published: list[tuple[float, str]] = []
    original = CorePublisher.publish_mempool_tx

    def spy(self, raw, txid, mempool_seq):
        published.append((trio.current_time(), txid[::-1].hex()))
        return original(self, raw, txid, mempool_seq)

    monkeypatch.setattr(CorePublisher, "publish_mempool_tx", spy)
    block = parse_block(BLOCK_553724.read_bytes())
    ep = "tcp://127.0.0.1:0"
    with trio.move_on_after(0.95):  # two passes of 0.4 s, then part of a third
        await run_replay(
            [block],
            endpoints={"rawtx": ep, "sequence": ep},
            rate=5.0,
            loop=True,
            burst=2,
        )
    times = [t for t, _ in published]
    assert [tx for _, tx in published[:3]] == [tx.txid_hex for tx in block.txs[1:]]
    assert times[:9] == [0.0, 0.0, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 0.6000000000000001]
    assert published[3][1] == published[0][1]
