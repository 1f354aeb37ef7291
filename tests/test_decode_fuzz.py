"""Hostile bytes at the decoder: it decodes them or raises DecodeError.

The bulk is a seeded mutation loop over real mainnet transactions and small
real blocks: bit flips, byte inserts and deletes, truncation, splices of two
real inputs, and tampering with the real length prefixes (found by walking
the decoded structure). Hypothesis adds structure-aware cases: transactions
and blocks built field by field, which must decode back to the same fields,
and arbitrary bytes. Every case either decodes to something consistent with
its input or raises :class:`DecodeError`; nothing else may escape, nothing may
hang (a SIGALRM watchdog fails the test), and tracemalloc's peak stays under a
few MB for the whole run.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import struct
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle.decode import (
    Block,
    DecodeError,
    Tx,
    double_sha256,
    merkle_root,
    parse_block,
    parse_tx,
)

DATA = Path(__file__).parent / "data"
SEED = 20261204
MUTATIONS = 100_000
#: Peak traced memory allowed for the whole mutation run, corpus excluded.
PEAK_LIMIT = 4 * 1024 * 1024
#: Wall-clock watchdog: generous, only there so that a hang fails the run
#: instead of stalling CI. Not an assertion about speed.
WATCHDOG_SECONDS = 600

SMALL_BLOCKS = (100000, 150013, 169482, 482683, 542213, 553724, 757739, 774628)
TX_SOURCES = (200000, 481824, 702861, 818677, 630000)


def _block_path(height: int) -> Path:
    (path,) = list(DATA.glob(f"blocks*/{height}-*.bin"))
    return path


def _corpus() -> tuple[list[bytes], list[bytes]]:
    """Real transactions (under 2 kB, a few hundred) and small real blocks."""
    rng = random.Random(SEED)
    txs: list[bytes] = []
    for height in TX_SOURCES:
        block = parse_block(_block_path(height).read_bytes())
        small = [tx.raw for tx in block.txs if len(tx.raw) < 2000]
        txs += rng.sample(small, 60)
    blocks = [_block_path(h).read_bytes() for h in SMALL_BLOCKS]
    return txs, blocks


TXS, BLOCKS = _corpus()


try:
    from .test_decode import _compact
except ImportError:
    from test_decode import _compact  # type: ignore[no-redef]


def _tx_prefix_offsets(tx: Tx, base: int) -> list[int]:
    """Offsets of every CompactSize prefix in ``tx`` (``base`` = its start)."""
    pos = base + (6 if tx.has_witness else 4)
    found = [pos]
    pos += len(_compact(len(tx.inputs)))
    for txin in tx.inputs:
        found.append(pos + 36)
        pos += 36 + len(_compact(txin.script_len)) + txin.script_len + 4
    found.append(pos)
    pos += len(_compact(len(tx.outputs)))
    for out in tx.outputs:
        found.append(pos + 8)
        pos += 8 + len(_compact(len(out.script))) + len(out.script)
    for items in tx.witness:
        found.append(pos)
        pos += len(_compact(len(items)))
        for n in items:
            found.append(pos)
            pos += len(_compact(n)) + n
    assert pos + 4 == base + len(tx.raw)
    return found


def _prefix_offsets(data: bytes, is_block: bool) -> list[int]:
    if not is_block:
        return _tx_prefix_offsets(parse_tx(data), 0)
    block = parse_block(data)
    found = [80]
    pos = 80 + len(_compact(len(block.txs)))
    for tx in block.txs:
        found += _tx_prefix_offsets(tx, pos)
        pos += len(tx.raw)
    return found


TAMPER_VALUES = (
    0, 1, 0xFC, 0xFD, 0xFFFF, 0x10000, 97_560, 97_561, 444_445, 4_000_000,
    4_000_001, 2**32 - 1, 2**32, 2**64 - 1,
)  # fmt: skip


class Mutator:
    """Seeded mutations of real inputs; ``counts`` tallies each kind."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.offsets = {
            (i, kind): _prefix_offsets(data, kind == "block")
            for kind, pool in (("tx", TXS), ("block", BLOCKS))
            for i, data in enumerate(pool)
        }

    def case(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = "block" if rng.random() < 0.15 else "tx"
        pool = BLOCKS if kind == "block" else TXS
        i = rng.randrange(len(pool))
        data = bytearray(pool[i])
        op = rng.choice(
            ("flip", "flip", "insert", "delete", "truncate", "splice", "prefix",
             "prefix", "random")
        )  # fmt: skip
        self.counts[f"{kind}:{op}"] += 1
        n = len(data)
        if op == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "insert":
            at = rng.randrange(n + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 4))
        elif op == "delete":
            at = rng.randrange(n)
            del data[at : at + rng.randint(1, 4)]
        elif op == "truncate":
            del data[rng.randrange(n) :]
        elif op == "splice":
            other = rng.choice(TXS if rng.random() < 0.7 else BLOCKS)
            data = data[: rng.randrange(n + 1)] + other[rng.randrange(len(other)) :]
        elif op == "prefix":
            at = rng.choice(self.offsets[(i, kind)])
            old = len(_compact(_read_compact(data, at)))
            value = rng.choice(TAMPER_VALUES + (rng.randrange(1 << 16),))
            new = _compact(value)
            if rng.random() < 0.2 and len(new) < 9:  # non-canonical form
                new = {1: b"\xfd", 3: b"\xfe", 5: b"\xff"}[len(new)] + value.to_bytes(
                    {1: 2, 3: 4, 5: 8}[len(new)], "little"
                )
            data[at : at + old] = new
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 300)))
            if rng.random() < 0.5 and len(data) > 6:
                data[4:6] = b"\x00\x01"  # look like segwit
        return kind, bytes(data)


def _read_compact(data: bytes | bytearray, pos: int) -> int:
    first = data[pos]
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}.get(first)
    if width is None:
        return first
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "little")


@contextlib.contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError if the body runs longer than ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"decoder fuzz still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _kind(err: DecodeError) -> str:
    """The error's message with its numbers replaced by N."""
    return re.sub(r"\d+", "N", err.what)


def check_tx(data: bytes) -> str:
    """Decode ``data`` as a transaction; return "ok" or the error kind."""
    try:
        tx = parse_tx(data)
    except DecodeError as err:
        assert 0 <= err.offset <= len(data), err
        return _kind(err)
    assert tx.raw == data
    if not tx.has_witness:
        assert tx.txid == tx.wtxid == double_sha256(data)
    return "ok"


def check_block(data: bytes) -> str:
    try:
        block = parse_block(data)
    except DecodeError as err:
        assert 0 <= err.offset <= len(data), err
        return _kind(err)
    assert block.size == len(data)
    assert block.header.hash == double_sha256(data[:80])
    assert sum(len(tx.raw) for tx in block.txs) <= len(data) - 81
    merkle_root([tx.txid for tx in block.txs])
    return "ok"


def test_a_hundred_thousand_mutations_decode_or_raise_decode_error() -> None:
    mutator = Mutator(SEED)
    outcomes: Counter[str] = Counter()
    executed = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with watchdog(WATCHDOG_SECONDS):
            for _ in range(MUTATIONS):
                kind, data = mutator.case()
                check: Callable[[bytes], str] = (
                    check_block if kind == "block" else check_tx
                )
                outcomes[check(data)] += 1
                # The same bytes thrown at the other parser, too.
                outcomes[(check_tx if kind == "block" else check_block)(data)] += 1
                executed += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(
        f"decoder fuzz: seed={SEED} executed={executed} cases "
        f"({2 * executed} parses) peak={peak} bytes"
    )
    print("mutations:", dict(sorted(mutator.counts.items())))
    print("outcomes:", dict(outcomes.most_common()))
    assert executed == MUTATIONS
    assert sum(mutator.counts.values()) == MUTATIONS
    assert peak < PEAK_LIMIT
    # The mutations reach deep: some still decode, many kinds of error occur.
    assert outcomes["ok"] > 1000
    assert {
        "truncated: expected a length prefix",
        "non-canonical length prefix",
        "input count N larger than the N bytes left",
        "input count N beyond consensus limits",
        "output count N larger than the N bytes left",
        "output script length N beyond consensus limits",
        "witness item length N larger than the N bytes left",
        "unknown transaction flag (expected NxN)",
        "superfluous witness record (all empty)",
        "N trailing bytes after the transaction",
        "N trailing bytes after the last transaction",
        "transaction count N larger than the N bytes left",
    } <= set(outcomes)


def test_mutator_is_deterministic_for_a_seed() -> None:
    a, b = Mutator(7), Mutator(7)
    assert [a.case() for _ in range(200)] == [b.case() for _ in range(200)]


# ------------------------------------------------------- Hypothesis: structure

txins = st.tuples(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.integers(0, 2**32 - 1),
)
txouts = st.tuples(st.integers(0, 21_000_000 * 10**8), st.binary(max_size=300))
witness_stacks = st.lists(st.binary(max_size=600), max_size=4)


@st.composite
def transactions(draw: st.DrawFn, min_outputs: int = 0) -> tuple[bytes, dict]:
    """A well-formed serialised transaction and the fields it was built from.

    With no outputs it decodes alone but cannot be in a block: the decoder
    bounds a block's transaction count by the smallest transaction that
    consensus allows (one input, one output: 60 bytes).
    """
    ins = draw(st.lists(txins, min_size=1, max_size=6))
    outs = draw(st.lists(txouts, min_size=min_outputs, max_size=6))
    segwit = draw(st.booleans())
    witness = (
        draw(st.lists(witness_stacks, min_size=len(ins), max_size=len(ins)))
        if segwit
        else []
    )
    if segwit and not any(witness):
        witness[0] = [b"\x01"]
    version = draw(st.integers(-(2**31), 2**31 - 1))
    locktime = draw(st.integers(0, 2**32 - 1))
    body = _compact(len(ins)) + b"".join(
        h + struct.pack("<I", i) + _compact(len(s)) + s + struct.pack("<I", q)
        for h, i, s, q in ins
    )
    body += _compact(len(outs)) + b"".join(
        struct.pack("<q", v) + _compact(len(s)) + s for v, s in outs
    )
    wit = b"".join(
        _compact(len(stack)) + b"".join(_compact(len(x)) + x for x in stack)
        for stack in witness
    )
    v, lt = struct.pack("<i", version), struct.pack("<I", locktime)
    raw = v + (b"\x00\x01" + body + wit if segwit else body) + lt
    fields = {
        "version": version,
        "inputs": ins,
        "outputs": outs,
        "witness": tuple(tuple(len(x) for x in s) for s in witness),
        "locktime": locktime,
        "txid": double_sha256(v + body + lt),
        "wtxid": double_sha256(raw),
    }
    return raw, fields


@settings(max_examples=400, deadline=None)
@given(transactions())
def test_built_transactions_decode_to_their_fields(case: tuple[bytes, dict]) -> None:
    raw, fields = case
    tx = parse_tx(raw)
    assert tx.version == fields["version"]
    assert [
        (i.prev_txid, i.prev_index, i.script, i.sequence) for i in tx.inputs
    ] == fields["inputs"]
    assert [(o.value, o.script) for o in tx.outputs] == fields["outputs"]
    assert tx.witness == fields["witness"]
    assert tx.locktime == fields["locktime"]
    assert (tx.txid, tx.wtxid, tx.raw) == (fields["txid"], fields["wtxid"], raw)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(transactions(min_outputs=1), min_size=1, max_size=8),
    st.binary(min_size=80, max_size=80),
)
def test_built_blocks_decode_to_their_transactions(
    txs: list[tuple[bytes, dict]], header: bytes
) -> None:
    raw = header + _compact(len(txs)) + b"".join(t for t, _ in txs)
    block: Block = parse_block(raw)
    assert [tx.txid for tx in block.txs] == [f["txid"] for _, f in txs]
    assert block.header.hash == double_sha256(header)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    check_tx(data)
    check_block(data)
    check_tx(b"\x01\x00\x00\x00\x00\x01" + data)


@settings(max_examples=400, deadline=None)
@given(transactions(), st.data())
def test_mutated_built_transactions_decode_or_raise(
    case: tuple[bytes, dict], data: st.DataObject
) -> None:
    raw = bytearray(case[0])
    at = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["set", "insert", "delete", "cut"]))
    if how == "set":
        raw[at] = data.draw(st.integers(0, 255))
    elif how == "insert":
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=9))
    elif how == "delete":
        del raw[at]
    else:
        del raw[at:]
    check_tx(bytes(raw))
    check_block(bytes(80) + b"\x01" + bytes(raw))


@pytest.mark.parametrize("height", SMALL_BLOCKS)
def test_corpus_blocks_decode_unchanged(height: int) -> None:
    assert check_block(_block_path(height).read_bytes()) == "ok"
