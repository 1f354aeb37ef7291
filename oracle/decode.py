"""Decoding of raw Bitcoin transactions and blocks.

Pure functions over ``bytes``: no I/O, no clock. Every malformed input raises
:class:`DecodeError`, which names what was wrong and the byte offset where the
decoder noticed. A count read from the input is checked against the bytes that
remain before anything is allocated for it, so a hostile length prefix costs
nothing but the check.

Hashes are kept in *internal* byte order (the order in which they appear in
serialised data and come out of SHA-256). ``.hash_hex``/``.txid_hex`` give the
byte-reversed display order used by block explorers and Bitcoin Core's RPC.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

import attrs

__all__ = [
    "Block",
    "BlockHeader",
    "DecodeError",
    "MAX_BLOCK_BYTES",
    "Tx",
    "TxIn",
    "TxOut",
    "coinbase_height",
    "double_sha256",
    "merkle_root",
    "parse_block",
    "parse_header",
    "peek_block",
    "parse_tx",
    "witness_commitment",
    "witness_merkle_root",
]

#: A serialised block (witness included) can never exceed the 4,000,000 weight
#: units of BIP141, and its byte size is at most its weight. Every length and
#: count in a transaction or block is bounded by this.
MAX_BLOCK_BYTES: Final = 4_000_000
#: Smallest possible serialised sizes, used to bound claimed counts by the
#: bytes actually left: an input is 32+4+1+4 bytes, an output 8+1, a
#: transaction 4+1+41+1+9+4 (legacy form, one input, one output).
_MIN_TXIN: Final = 41
_MIN_TXOUT: Final = 9
_MIN_TX: Final = 60
_HEADER_LEN: Final = 80
_NULL_TXID: Final = bytes(32)
_COINBASE_INDEX: Final = 0xFFFFFFFF

# Precompiled structs: unpack_from on a bytes object is the fastest way to
# read fixed fields in CPython, much faster than int.from_bytes on slices.
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from
_OUTPOINT = struct.Struct("<32sI").unpack_from
_HEADER = struct.Struct("<i32s32sIII").unpack_from


class DecodeError(ValueError):
    """Raised for any malformed transaction or block.

    Attributes:
      what: a short description of the problem.
      offset: the byte offset, from the start of the decoded buffer, at which
        the problem was detected.
    """

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(f"{what} at byte {offset}")
        self.what = what
        self.offset = offset


def double_sha256(data: bytes) -> bytes:
    """SHA-256 of SHA-256 of ``data``, in internal byte order."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


@attrs.frozen(slots=True)
class TxIn:
    prev_txid: bytes  # internal byte order
    prev_index: int
    script_len: int
    sequence: int
    script: bytes  # the scriptSig; the coinbase script carries the BIP34 height

    @property
    def is_coinbase(self) -> bool:
        return self.prev_index == _COINBASE_INDEX and self.prev_txid == _NULL_TXID


@attrs.frozen(slots=True)
class TxOut:
    value: int  # satoshis
    script: bytes


@attrs.frozen(slots=True)
class Tx:
    """One decoded transaction.

    ``witness`` holds, per input, the length of every witness item; it is empty
    for a transaction serialised without witness data.
    """

    version: int
    inputs: tuple[TxIn, ...]
    outputs: tuple[TxOut, ...]
    witness: tuple[tuple[int, ...], ...]
    locktime: int
    txid: bytes  # internal byte order
    wtxid: bytes  # internal byte order; equals txid without witness data
    raw: bytes  # the exact bytes this transaction was decoded from

    @property
    def txid_hex(self) -> str:
        return self.txid[::-1].hex()

    @property
    def wtxid_hex(self) -> str:
        return self.wtxid[::-1].hex()

    @property
    def has_witness(self) -> bool:
        return bool(self.witness)

    @property
    def is_coinbase(self) -> bool:
        return any(i.is_coinbase for i in self.inputs)


@attrs.frozen(slots=True)
class BlockHeader:
    version: int
    prev_hash: bytes  # internal byte order
    merkle_root: bytes  # internal byte order
    time: int
    bits: int
    nonce: int
    hash: bytes  # internal byte order

    @property
    def hash_hex(self) -> str:
        return self.hash[::-1].hex()

    @property
    def prev_hash_hex(self) -> str:
        return self.prev_hash[::-1].hex()


@attrs.frozen(slots=True)
class Block:
    header: BlockHeader
    txs: tuple[Tx, ...]
    #: Height from the BIP34 push in the coinbase script; None for a
    #: version-1 block. Trustworthy from height 227931, where BIP34 is enforced.
    bip34_height: int | None
    size: int

    @property
    def hash_hex(self) -> str:
        return self.header.hash_hex

    @property
    def tx_count(self) -> int:
        return len(self.txs)


def _compact_size(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a canonical CompactSize at ``pos``; return (value, new position)."""
    if pos >= end:
        raise DecodeError("truncated: expected a length prefix", pos)
    first = data[pos]
    if first < 0xFD:
        return first, pos + 1
    if first == 0xFD:
        if pos + 3 > end:
            raise DecodeError("truncated: 2-byte length prefix", pos)
        value = _U16(data, pos + 1)[0]
        if value < 0xFD:
            raise DecodeError("non-canonical length prefix", pos)
        return value, pos + 3
    if first == 0xFE:
        if pos + 5 > end:
            raise DecodeError("truncated: 4-byte length prefix", pos)
        value = _U32(data, pos + 1)[0]
        if value < 0x10000:
            raise DecodeError("non-canonical length prefix", pos)
        return value, pos + 5
    if pos + 9 > end:
        raise DecodeError("truncated: 8-byte length prefix", pos)
    value = _U64(data, pos + 1)[0]
    if value < 0x100000000:
        raise DecodeError("non-canonical length prefix", pos)
    return value, pos + 9


def _count(
    data: bytes, pos: int, end: int, what: str, min_size: int
) -> tuple[int, int]:
    """Read a count of items that are each at least ``min_size`` bytes long."""
    count, after = _compact_size(data, pos, end)
    if count > MAX_BLOCK_BYTES // min_size:
        raise DecodeError(f"{what} count {count} beyond consensus limits", pos)
    if count * min_size > end - after:
        raise DecodeError(
            f"{what} count {count} larger than the {end - after} bytes left", pos
        )
    return count, after


def _length(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    length, after = _compact_size(data, pos, end)
    if length > MAX_BLOCK_BYTES:
        raise DecodeError(f"{what} length {length} beyond consensus limits", pos)
    if length > end - after:
        raise DecodeError(
            f"{what} length {length} larger than the {end - after} bytes left", pos
        )
    return length, after


def _tx_at(data: bytes, start: int, end: int) -> tuple[Tx, int]:
    """Decode one transaction starting at ``start``; return it and its end."""
    if end - start < 10:
        raise DecodeError("truncated: transaction shorter than 10 bytes", start)
    version = _I32(data, start)[0]
    pos = start + 4
    segwit = data[pos] == 0
    if segwit:
        if data[pos + 1] != 1:
            raise DecodeError("unknown transaction flag (expected 0x01)", pos + 1)
        pos += 2
    body_start = pos
    n_in, pos = _count(data, pos, end, "input", _MIN_TXIN)
    if n_in == 0 and segwit:
        raise DecodeError("segwit transaction with no inputs", body_start)
    inputs: list[TxIn] = []
    append_in = inputs.append
    for _ in range(n_in):
        if pos + 36 > end:
            raise DecodeError("truncated: input outpoint", pos)
        prev_txid, prev_index = _OUTPOINT(data, pos)
        slen, pos = _length(data, pos + 36, end, "input script")
        script = data[pos : pos + slen]
        pos += slen
        if pos + 4 > end:
            raise DecodeError("truncated: input sequence", pos)
        append_in(TxIn(prev_txid, prev_index, slen, _U32(data, pos)[0], script))
        pos += 4
    n_out, pos = _count(data, pos, end, "output", _MIN_TXOUT)
    outputs: list[TxOut] = []
    append_out = outputs.append
    for _ in range(n_out):
        if pos + 8 > end:
            raise DecodeError("truncated: output value", pos)
        value = _I64(data, pos)[0]
        if value < 0 or value > 21_000_000 * 100_000_000:
            raise DecodeError(f"output value {value} outside 0..21M BTC", pos)
        slen, pos = _length(data, pos + 8, end, "output script")
        append_out(TxOut(value, data[pos : pos + slen]))
        pos += slen
    body_end = pos
    witness: tuple[tuple[int, ...], ...] = ()
    if segwit:
        per_input = []
        any_item = False
        for _ in range(n_in):
            n_items, pos = _count(data, pos, end, "witness item", 1)
            lengths = []
            for _ in range(n_items):
                ilen, pos = _length(data, pos, end, "witness item")
                lengths.append(ilen)
                pos += ilen
            if n_items:
                any_item = True
            per_input.append(tuple(lengths))
        if not any_item:
            raise DecodeError("superfluous witness record (all empty)", body_end)
        witness = tuple(per_input)
    if pos + 4 > end:
        raise DecodeError("truncated: locktime", pos)
    locktime = _U32(data, pos)[0]
    pos += 4
    raw = data[start:pos]
    if segwit:
        stripped = data[start : start + 4] + data[body_start:body_end] + raw[-4:]
        txid = double_sha256(stripped)
        wtxid = double_sha256(raw)
    else:
        txid = wtxid = double_sha256(raw)
    return (
        Tx(
            version,
            tuple(inputs),
            tuple(outputs),
            witness,
            locktime,
            txid,
            wtxid,
            raw,
        ),
        pos,
    )


def parse_tx(data: bytes) -> Tx:
    """Decode one serialised transaction (with or without witness data).

    Raises:
      DecodeError: the bytes are not exactly one well-formed transaction,
        including the case of bytes left over after it.
    """
    data = bytes(data)
    tx, end = _tx_at(data, 0, len(data))
    if end != len(data):
        raise DecodeError(
            f"{len(data) - end} trailing bytes after the transaction", end
        )
    return tx


def parse_header(data: bytes, offset: int = 0) -> BlockHeader:
    """Decode the 80-byte block header at ``offset``."""
    if len(data) - offset < _HEADER_LEN:
        raise DecodeError("truncated: block header shorter than 80 bytes", offset)
    raw = bytes(data[offset : offset + _HEADER_LEN])
    version, prev, merkle, time, bits, nonce = _HEADER(raw, 0)
    return BlockHeader(version, prev, merkle, time, bits, nonce, double_sha256(raw))


def _bip34_height(coinbase: Tx, version: int) -> int | None:
    # BIP34 blocks have version 2 or more; a version-1 coinbase's first push
    # is arbitrary (block 100000's is the header's bits), so it gives None.
    # Between the first version-2 blocks and BIP34's enforcement at height
    # 227931 a push is a height only by convention.
    if version < 2:
        return None
    script = coinbase.inputs[0].script if coinbase.inputs else b""
    if not script:
        return None
    n = script[0]
    if 1 <= n <= 8 and len(script) > n:
        return int.from_bytes(script[1 : 1 + n], "little")
    if 0x51 <= n <= 0x60:  # OP_1..OP_16 encode heights 1..16
        return n - 0x50
    return None


def coinbase_height(coinbase: Tx) -> int | None:
    """The BIP34 height pushed by a coinbase transaction seen on its own (as
    from a node's ``rawtx`` feed, without its block's header): assumes a
    BIP34 block (height 227931 or later); None if it is not a coinbase or
    pushes no height."""
    if not coinbase.is_coinbase:
        return None
    return _bip34_height(coinbase, 2)


def parse_block(data: bytes) -> Block:
    """Decode a serialised block: header, transaction count, transactions.

    Raises:
      DecodeError: malformed or truncated block, a transaction count beyond
        what the bytes or consensus allow, or bytes left after the last
        transaction.
    """
    data = bytes(data)
    end = len(data)
    if end > MAX_BLOCK_BYTES:
        raise DecodeError(f"block of {end} bytes beyond consensus limits", 0)
    header = parse_header(data)
    n_tx, pos = _count(data, _HEADER_LEN, end, "transaction", _MIN_TX)
    if n_tx == 0:
        raise DecodeError("block with no transactions", _HEADER_LEN)
    txs = []
    for _ in range(n_tx):
        tx, pos = _tx_at(data, pos, end)
        txs.append(tx)
    if pos != end:
        raise DecodeError(f"{end - pos} trailing bytes after the last transaction", pos)
    height = _bip34_height(txs[0], header.version) if txs[0].is_coinbase else None
    return Block(header, tuple(txs), height, end)


def peek_block(data: bytes) -> tuple[BlockHeader, int | None]:
    """The header and BIP34 height of a block, decoding only its coinbase.

    Lets a caller order many block files by height before decoding them one
    at a time. Raises :class:`DecodeError` where :func:`parse_block` would for
    the header, the count or the coinbase; the rest is not checked.
    """
    data = bytes(data)
    header = parse_header(data)
    _n, pos = _count(data, _HEADER_LEN, len(data), "transaction", _MIN_TX)
    coinbase, _ = _tx_at(data, pos, len(data))
    return header, _bip34_height(
        coinbase, header.version
    ) if coinbase.is_coinbase else None


def merkle_root(hashes: list[bytes]) -> bytes:
    """Bitcoin's merkle root of ``hashes`` (internal order), duplicating odd tails."""
    if not hashes:
        raise ValueError("merkle root of an empty list")
    level = list(hashes)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [
            double_sha256(level[i] + level[i + 1]) for i in range(0, len(level), 2)
        ]
    return level[0]


def witness_merkle_root(block: Block) -> bytes:
    """BIP141 witness root: the coinbase's wtxid counts as 32 zero bytes."""
    return merkle_root([_NULL_TXID] + [tx.wtxid for tx in block.txs[1:]])


_COMMITMENT_PREFIX: Final = bytes.fromhex("6a24aa21a9ed")


def witness_commitment(block: Block) -> bytes | None:
    """The BIP141 commitment in the coinbase outputs (the last one wins), if any."""
    found = None
    for out in block.txs[0].outputs:
        script = out.script
        if len(script) >= 38 and script.startswith(_COMMITMENT_PREFIX):
            found = script[6:38]
    return found
