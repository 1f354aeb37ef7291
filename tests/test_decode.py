"""The decoder against real mainnet blocks, python-bitcoinlib, and bad input.

Every block file shipped in ``tests/data`` must decode and prove itself: the
header hash is the one in the file name, the merkle root of the decoded txids
is the header's, the BIP141 witness commitment matches where the block carries
its witnesses, and the counts agree with ``blocks_index.csv``. For a few blocks
every field of every transaction is compared with python-bitcoinlib, an
independent decoder. Malformed input must raise :class:`DecodeError` with the
exact message and byte offset, and must never cost memory in proportion to a
count it claims.
"""

from __future__ import annotations

import csv
import functools
import struct
import tracemalloc
from pathlib import Path

import attrs
import pytest
from bitcoin.core import CBlock, CTransaction

from oracle.decode import (
    MAX_BLOCK_BYTES,
    Block,
    DecodeError,
    Tx,
    TxOut,
    double_sha256,
    merkle_root,
    parse_block,
    parse_header,
    parse_tx,
    witness_commitment,
    witness_merkle_root,
)

DATA = Path(__file__).parent / "data"
BIP34_FROM = 227_931


def _index() -> dict[str, dict[str, str]]:
    with open(DATA / "blocks_index.csv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


INDEX = _index()
BLOCK_FILES = sorted(INDEX)


@functools.cache
def block_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


@functools.cache
def block(name: str) -> Block:
    return parse_block(block_bytes(name))


def block_file(height: int) -> str:
    (name,) = [n for n in BLOCK_FILES if INDEX[n]["height"] == str(height)]
    return name


def test_index_lists_every_block_file_on_disk() -> None:
    on_disk = sorted(
        str(p.relative_to(DATA))
        for d in ("blocks", "blocks_witness_stripped")
        for p in (DATA / d).glob("*.bin")
    )
    assert on_disk == BLOCK_FILES
    assert len(BLOCK_FILES) == 30


# ------------------------------------------------------------- every real block


@pytest.mark.parametrize("name", BLOCK_FILES)
def test_real_block_decodes_and_proves_itself(name: str) -> None:
    row = INDEX[name]
    raw = block_bytes(name)
    b = block(name)
    height = int(row["height"])
    assert b.hash_hex == row["block_hash"] == Path(name).stem.split("-")[1]
    assert b.header.hash == parse_header(raw).hash == double_sha256(raw[:80])
    assert b.header.time == int(row["time_unix"])
    assert b.size == len(raw) == int(row["size_bytes"])
    assert b.tx_count == int(row["tx_count"])
    assert sum(len(tx.outputs) for tx in b.txs) == int(row["output_count"])
    assert merkle_root([tx.txid for tx in b.txs]) == b.header.merkle_root
    assert b.txs[0].is_coinbase
    assert not any(tx.is_coinbase for tx in b.txs[1:])
    # Header, count and the transactions' raw bytes tile the block exactly.
    assert raw[:80] + _compact(b.tx_count) + b"".join(t.raw for t in b.txs) == raw
    if height >= BIP34_FROM:
        assert b.bip34_height == height
    if row["witness"] == "full":
        commitment = witness_commitment(b)
        assert commitment is not None
        reserved = b.txs[0].witness
        assert reserved == ((32,),)  # the coinbase's witness reserved value
        nonce = b.txs[0].raw[-4 - 32 : -4]
        assert double_sha256(witness_merkle_root(b) + nonce) == commitment
    if row["witness"] == "stripped" or row["witness"].startswith("n/a"):
        assert not any(tx.has_witness for tx in b.txs)
        assert all(tx.wtxid == tx.txid for tx in b.txs)


@pytest.mark.parametrize(
    ("height", "found"),
    [
        (100000, None),  # version 1: the first push is the header's bits
        (150013, None),  # version 1
        (169482, None),  # version 1, the script starts with OP_0
        (200000, 200000),  # version 2 blocks pushed the height before BIP34
        (227835, None),  # version 1: the first push is the block's timestamp
        (227836, 227836),
    ],
)
def test_before_bip34_only_version_2_blocks_report_a_height(
    height: int, found: int | None
) -> None:
    # Before height 227931 the coinbase script is free-form; a version-1
    # block's leading push is not a height and is not reported as one.
    assert block(block_file(height)).bip34_height == found


def test_block_hash_and_txid_of_a_known_block_in_display_order() -> None:
    b = block(block_file(100000))
    assert b.header.prev_hash_hex == (
        "000000000002d01c1fccc21636b607dfd930d31d01c3a62104612a1719011250"
    )
    assert [tx.txid_hex for tx in b.txs] == [
        "8c14f0db3df150123e6f3dbbf30f8b955a8249b62ac1d1ff16284aefa3d06d87",
        "fff2525b8931402dd09222c50775608f75787bd2b87e56995a7bdd30f79702c4",
        "6359f0868171b1d194cbee1af2f16ea598ae8fad666d9b012c8ed2b79a236ec4",
        "e9a66845e05d5abc0ad04ec80f774a7e585c6e8db975962d069a522137b80c1d",
    ]
    assert b.header.nonce == 274148111
    assert b.header.bits == 0x1B04864C


def test_merkle_root_edge_cases() -> None:
    with pytest.raises(ValueError):
        merkle_root([])
    one = double_sha256(b"x")
    assert merkle_root([one]) == one
    a, b, c = (double_sha256(bytes([i])) for i in range(3))
    # An odd level repeats its last hash.
    ab, cc = double_sha256(a + b), double_sha256(c + c)
    assert merkle_root([a, b, c]) == double_sha256(ab + cc)
    assert merkle_root([a, b, c, c]) == merkle_root([a, b, c])


def test_witness_commitment_absent_before_segwit_and_last_one_wins() -> None:
    assert witness_commitment(block(block_file(200000))) is None
    # A witness-stripped block keeps the commitment output in its coinbase
    # but lost the data to check it against.
    stripped = block(block_file(630000))
    assert witness_commitment(stripped) is not None
    assert stripped.txs[0].witness == ()
    b = block(block_file(702861))
    coinbase = b.txs[0]
    real = witness_commitment(b)
    assert real is not None
    decoy = TxOut(0, bytes.fromhex("6a24aa21a9ed") + b"\x07" * 32)
    for outputs, expected in (
        ((*coinbase.outputs, decoy), b"\x07" * 32),
        ((decoy, *coinbase.outputs), real),
        ((TxOut(0, decoy.script[:37]), *coinbase.outputs[:1]), None),
    ):
        changed = attrs.evolve(b, txs=(attrs.evolve(coinbase, outputs=outputs),))
        assert witness_commitment(changed) == expected


# ------------------------------------------------ field by field, vs bitcoinlib

CROSS_CHECKED = (200000, 481824, 630000, 702861, 951658)


@pytest.mark.parametrize("height", CROSS_CHECKED)
def test_every_transaction_matches_python_bitcoinlib(height: int) -> None:
    name = block_file(height)
    ours = block(name)
    theirs = CBlock.deserialize(block_bytes(name))
    assert theirs.GetHash() == ours.header.hash
    assert len(theirs.vtx) == len(ours.txs)
    for mine, ref in zip(ours.txs, theirs.vtx, strict=True):
        assert_same_tx(mine, ref)


def assert_same_tx(mine: Tx, ref: CTransaction) -> None:
    assert mine.txid == ref.GetTxid()
    assert mine.wtxid == ref.GetHash()
    assert mine.version == ref.nVersion
    assert mine.locktime == ref.nLockTime
    assert mine.raw == ref.serialize()
    assert [
        (i.prev_txid, i.prev_index, i.script_len, i.sequence, i.script)
        for i in mine.inputs
    ] == [
        (i.prevout.hash, i.prevout.n, len(s), i.nSequence, bytes(s))
        for i in ref.vin
        for s in [i.scriptSig]
    ]
    assert [(o.value, o.script) for o in mine.outputs] == [
        (o.nValue, bytes(o.scriptPubKey)) for o in ref.vout
    ]
    if ref.wit.is_null():
        assert mine.witness == ()
    else:
        assert mine.witness == tuple(
            tuple(len(x) for x in w.scriptWitness.stack) for w in ref.wit.vtxinwit
        )


def test_parse_tx_on_each_transactions_own_bytes_gives_the_same_tx() -> None:
    for height in (481824, 702861):
        for tx in block(block_file(height)).txs:
            assert parse_tx(tx.raw) == tx


# ------------------------------------------------------------ malformed input


def _compact(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


def truncation_checks(ref: CTransaction) -> list[tuple[int, str, int, int]]:
    """Every check the decoder makes, in its order, built from bitcoinlib's
    view of the transaction: ``(bytes needed, message, offset, after)``.

    A transaction cut to ``k`` bytes must fail the first check needing more
    than ``k`` bytes. ``{left}`` in a message stands for ``k - after``, the
    bytes left after the length prefix just read.
    """
    checks = [(10, "truncated: transaction shorter than 10 bytes", 0, 0)]
    segwit = not ref.wit.is_null()
    pos = 6 if segwit else 4

    def prefix(n: int, what: str, min_size: int) -> int:
        nonlocal pos
        width = len(_compact(n))
        checks.append((pos + 1, "truncated: expected a length prefix", pos, 0))
        if width > 1:
            label = {3: "2-byte", 5: "4-byte", 9: "8-byte"}[width]
            checks.append((pos + width, f"truncated: {label} length prefix", pos, 0))
        kind = "count" if min_size else "length"
        need = pos + width + n * max(min_size, 1)
        message = f"{what} {kind} {n} larger than the {{left}} bytes left"
        checks.append((need, message, pos, pos + width))
        pos += width
        return n

    prefix(len(ref.vin), "input", 41)
    for txin in ref.vin:
        checks.append((pos + 36, "truncated: input outpoint", pos, 0))
        pos += 36
        n = prefix(len(txin.scriptSig), "input script", 0)
        pos += n
        checks.append((pos + 4, "truncated: input sequence", pos, 0))
        pos += 4
    prefix(len(ref.vout), "output", 9)
    for out in ref.vout:
        checks.append((pos + 8, "truncated: output value", pos, 0))
        pos += 8
        n = prefix(len(out.scriptPubKey), "output script", 0)
        pos += n
    if segwit:
        for w in ref.wit.vtxinwit:
            stack = w.scriptWitness.stack
            prefix(len(stack), "witness item", 1)
            for item in stack:
                n = prefix(len(item), "witness item", 0)
                pos += n
    checks.append((pos + 4, "truncated: locktime", pos, 0))
    assert pos + 4 == len(ref.serialize())
    return checks


def _real_tx(height: int, pick) -> Tx:
    return next(tx for tx in block(block_file(height)).txs if pick(tx))


def _sample_txs() -> list[Tx]:
    return [
        # legacy, two inputs with long scriptSigs, two outputs
        _real_tx(200000, lambda t: len(t.inputs) == 2 and len(t.outputs) == 2),
        # segwit, several witness items per input
        _real_tx(702861, lambda t: t.has_witness and len(t.witness[0]) > 2),
        # segwit with a scriptSig and a witness (nested P2SH)
        _real_tx(481824, lambda t: t.has_witness and t.inputs[0].script_len > 0),
        # a coinbase with its witness reserved value
        block(block_file(702861)).txs[0],
        # a script of 253 bytes or more: a 3-byte length prefix
        _real_tx(481824, lambda t: len(t.raw) < 1000 and _long_prefix(t)),
        # 337 outputs: a 3-byte count prefix
        _real_tx(481824, lambda t: len(t.outputs) >= 253),
    ]


def _long_prefix(tx: Tx) -> bool:
    lengths = [i.script_len for i in tx.inputs] + [n for w in tx.witness for n in w]
    return max(lengths) >= 253


@pytest.mark.parametrize("index", range(6))
def test_truncated_at_every_byte_gives_exact_message_and_offset(index: int) -> None:
    tx = _sample_txs()[index]
    checks = truncation_checks(CTransaction.deserialize(tx.raw))
    for k in range(len(tx.raw)):
        with pytest.raises(DecodeError) as info:
            parse_tx(tx.raw[:k])
        need, message, offset, after = next(c for c in checks if c[0] > k)
        message = message.replace("{left}", str(k - after))
        assert (info.value.what, info.value.offset) == (message, offset), k
        assert str(info.value) == f"{message} at byte {offset}"


def test_truncated_block_at_every_byte_raises_decode_error() -> None:
    raw = block_bytes(block_file(100000))
    for k in range(len(raw)):
        with pytest.raises(DecodeError):
            parse_block(raw[:k])
    with pytest.raises(DecodeError, match=r"^truncated: block header"):
        parse_block(raw[:79])
    with pytest.raises(
        DecodeError,
        match=r"^transaction count 4 larger than the 130 bytes left at byte 80$",
    ):
        parse_block(raw[:211])


LEGACY = bytes.fromhex(
    "01000000"  # version
    "01" + "11" * 32 + "00000000" + "00" + "ffffffff"  # one input, empty script
    "01" + "e803000000000000" + "0151"  # one output: 1000 sats, OP_1
    "00000000"  # locktime
)


def test_hand_built_legacy_tx_decodes() -> None:
    tx = parse_tx(LEGACY)
    assert tx.version == 1 and tx.locktime == 0
    assert tx.inputs[0].prev_txid == b"\x11" * 32
    assert tx.outputs[0].value == 1000 and tx.outputs[0].script == b"\x51"
    assert tx.witness == () and tx.txid == tx.wtxid == double_sha256(LEGACY)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (LEGACY + b"\x00", "1 trailing bytes after the transaction at byte 61"),
        (LEGACY + b"abc", "3 trailing bytes after the transaction at byte 61"),
        (
            LEGACY[:4] + b"\x02" + LEGACY[5:],
            "input count 2 larger than the 56 bytes left at byte 4",
        ),
        (
            LEGACY[:41] + b"\x40" + LEGACY[42:],
            "input script length 64 larger than the 19 bytes left at byte 41",
        ),
        (
            LEGACY[:46] + b"\x07" + LEGACY[47:],
            "output count 7 larger than the 14 bytes left at byte 46",
        ),
        (
            LEGACY[:55] + b"\x06" + LEGACY[56:],
            "output script length 6 larger than the 5 bytes left at byte 55",
        ),
        (
            LEGACY[:4] + b"\xfe\xff\xff\xff\xff" + LEGACY[5:],
            "input count 4294967295 beyond consensus limits at byte 4",
        ),
        (
            LEGACY[:4] + b"\xfd\xf9\x7c" + LEGACY[5:],  # 31993 inputs fit a block
            "input count 31993 larger than the 56 bytes left at byte 4",
        ),
        (
            LEGACY[:4] + b"\xfe\x19\x7d\x01\x00" + LEGACY[5:],  # 97561 > 4e6 / 41
            "input count 97561 beyond consensus limits at byte 4",
        ),
        (
            LEGACY[:46] + _compact(444_445) + LEGACY[47:],  # 444445 > 4e6 / 9
            "output count 444445 beyond consensus limits at byte 46",
        ),
        (
            LEGACY[:55] + b"\xfe\x01\x09\x3d\x00" + LEGACY[56:],
            "output script length 4000001 beyond consensus limits at byte 55",
        ),
        (
            LEGACY[:4] + b"\xfd\x01\x00" + LEGACY[5:],
            "non-canonical length prefix at byte 4",
        ),
        (
            LEGACY[:4] + b"\xfe\xff\xff\x00\x00" + LEGACY[5:],
            "non-canonical length prefix at byte 4",
        ),
        (
            LEGACY[:4] + b"\xff\xff\xff\xff\xff\x00\x00\x00\x00" + LEGACY[5:],
            "non-canonical length prefix at byte 4",
        ),
        (
            LEGACY[:41] + b"\xfd\xfc\x00" + LEGACY[42:],
            "non-canonical length prefix at byte 41",
        ),
        (
            LEGACY[:47] + struct.pack("<q", -1) + LEGACY[55:],
            "output value -1 outside 0..21M BTC at byte 47",
        ),
        (
            LEGACY[:47] + struct.pack("<q", 21_000_000 * 10**8 + 1) + LEGACY[55:],
            "output value 2100000000000001 outside 0..21M BTC at byte 47",
        ),
    ],
)
def test_malformed_transaction_message_and_offset(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_tx(data)
    assert str(info.value) == message


def test_count_of_two_to_the_32_is_beyond_consensus_limits() -> None:
    data = LEGACY[:4] + _compact(2**32) + LEGACY[5:]
    with pytest.raises(DecodeError) as info:
        parse_tx(data)
    message = "input count 4294967296 beyond consensus limits at byte 4"
    assert str(info.value) == message
    assert info.value.what == "input count 4294967296 beyond consensus limits"
    assert info.value.offset == 4


def test_maximum_output_value_is_accepted() -> None:
    data = LEGACY[:47] + struct.pack("<q", 21_000_000 * 10**8) + LEGACY[55:]
    assert parse_tx(data).outputs[0].value == 2_100_000_000_000_000


SEGWIT_TX = next(
    t for t in block(block_file(702861)).txs if t.has_witness and len(t.inputs) == 1
)


def test_unknown_segwit_flag() -> None:
    raw = SEGWIT_TX.raw
    assert raw[4:6] == b"\x00\x01"
    for flag in (0, 2, 0xFF):
        with pytest.raises(DecodeError) as info:
            parse_tx(raw[:5] + bytes([flag]) + raw[6:])
        assert str(info.value) == "unknown transaction flag (expected 0x01) at byte 5"


def test_superfluous_witness_is_rejected() -> None:
    # The real transaction's body with its witness replaced by an empty stack.
    tx = SEGWIT_TX
    body_len = len(tx.raw) - 6 - 4 - _witness_len(tx)
    body = tx.raw[6 : 6 + body_len]
    data = tx.raw[:6] + body + b"\x00" + tx.raw[-4:]
    with pytest.raises(DecodeError) as info:
        parse_tx(data)
    assert str(info.value) == (
        f"superfluous witness record (all empty) at byte {6 + body_len}"
    )
    # Without marker and flag the same body is a valid legacy transaction
    # with the same txid.
    legacy = parse_tx(tx.raw[:4] + body + tx.raw[-4:])
    assert legacy.txid == tx.txid and legacy.witness == ()


def _witness_len(tx: Tx) -> int:
    return sum(
        len(_compact(len(items))) + sum(len(_compact(n)) + n for n in items)
        for items in tx.witness
    )


def test_segwit_marker_with_no_inputs_is_rejected() -> None:
    data = b"\x02\x00\x00\x00" + b"\x00\x01" + b"\x00" + b"\x00" * 8
    with pytest.raises(DecodeError) as info:
        parse_tx(data)
    assert str(info.value) == "segwit transaction with no inputs at byte 6"


def test_witness_item_count_larger_than_bytes_left() -> None:
    tx = SEGWIT_TX
    start = len(tx.raw) - 4 - _witness_len(tx)
    data = tx.raw[:start] + b"\x60" + tx.raw[start + 1 :]
    left = len(data) - start - 1
    with pytest.raises(DecodeError) as info:
        parse_tx(data)
    assert str(info.value) == (
        f"witness item count 96 larger than the {left} bytes left at byte {start}"
    )


def test_block_errors() -> None:
    raw = block_bytes(block_file(100000))
    with pytest.raises(DecodeError) as info:
        parse_block(raw + b"\x00\x00")
    assert str(info.value) == (
        "2 trailing bytes after the last transaction at byte 957"
    )
    with pytest.raises(DecodeError) as info:
        parse_block(raw[:80] + b"\x00" + raw[81:])
    assert str(info.value) == "block with no transactions at byte 80"
    with pytest.raises(DecodeError) as info:
        parse_block(raw[:80] + b"\xfe\x6b\x04\x01\x00" + raw[81:])
    assert (
        str(info.value) == "transaction count 66667 beyond consensus limits at byte 80"
    )
    with pytest.raises(DecodeError) as info:
        parse_block(bytes(MAX_BLOCK_BYTES + 1))
    message = "block of 4000001 bytes beyond consensus limits at byte 0"
    assert str(info.value) == message


def test_decode_error_is_a_value_error_with_fields() -> None:
    err = DecodeError("truncated: locktime", 12)
    assert isinstance(err, ValueError)
    assert (err.what, err.offset, str(err)) == (
        "truncated: locktime",
        12,
        "truncated: locktime at byte 12",
    )


# ----------------------------------------------------- no allocation by claim


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            fn()
        except DecodeError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "data",
    [
        # ten bytes claiming 2**32 - 1 inputs
        b"\x01\x00\x00\x00" + b"\xfe\xff\xff\xff\xff" + b"\x00",
        # thirteen bytes claiming 2**32 inputs
        b"\x01\x00\x00\x00" + _compact(2**32),
        # ten bytes claiming the most inputs a block could hold
        b"\x01\x00\x00\x00" + _compact(97_560) + b"\x00",
        # a real input, then a script length of 4,000,000
        LEGACY[:41] + _compact(4_000_000) + b"\x00" * 8,
    ],
)
def test_a_claimed_count_allocates_nothing(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_tx(data)
    assert _peak_bytes(lambda: parse_tx(data)) < 64 * 1024
    block_data = block_bytes(block_file(100000))[:80] + data[4:]
    assert _peak_bytes(lambda: parse_block(block_data)) < 64 * 1024


def test_real_block_decode_peak_memory_is_bounded_by_its_size() -> None:
    raw = block_bytes(block_file(702861))
    peak = _peak_bytes(lambda: parse_block(raw))
    # Decoded objects for 2500 transactions; nothing quadratic.
    assert peak < 20 * len(raw)
