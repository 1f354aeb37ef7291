"""The transaction and output filter of the method's section 1, on real data.

Each rule is shown on a real mainnet transaction that breaks it, the rules'
order is pinned where one transaction breaks several, and the per-reason
counts of whole real blocks are exact. An independent transcription of the
method's table over python-bitcoinlib's decoding must agree with
:class:`TxFilter` on every transaction of several blocks.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from bitcoin.core import CBlock, CTransaction

from oracle.decode import Block, Tx, TxOut, parse_block
from oracle.filter import (
    MAX_INPUTS,
    MAX_WITNESS_BYTES,
    Reject,
    TxFilter,
    kept_outputs,
    reject_reason,
)

DATA = Path(__file__).parent / "data"
ALL_HEIGHTS = sorted(int(p.name.split("-")[0]) for p in DATA.glob("blocks*/*.bin"))


def block_path(height: int) -> Path:
    (path,) = list(DATA.glob(f"blocks*/{height}-*.bin"))
    return path


@functools.cache
def block(height: int) -> Block:
    return parse_block(block_path(height).read_bytes())


def run_filter(height: int) -> tuple[TxFilter, list[list[tuple[int, int]] | None]]:
    flt = TxFilter()
    return flt, [flt.offer(tx) for tx in block(height).txs]


def first(height: int, pick: Callable[[Tx], bool]) -> Tx:
    return next(tx for tx in block(height).txs if pick(tx))


# ------------------------------------------------------- whole real blocks

EXPECTED_REJECTIONS = {
    702861: {"coinbase": 1, "outputs": 489, "inputs": 72, "same_window": 252,
             "op_return": 6},
    818677: {"outputs": 2140, "op_return": 9, "inputs": 119, "same_window": 102},
    630000: {"outputs": 630, "inputs": 84, "same_window": 561, "op_return": 3},
    951658: {"coinbase": 1, "outputs": 127, "inputs": 1, "op_return": 199},
    100000: {"outputs": 2},
    542213: {"coinbase": 1, "inputs": 1},
}  # fmt: skip
EXPECTED_PASSED = {702861: 1680, 818677: 1093, 630000: 1856, 951658: 46,
                   100000: 2, 542213: 2}  # fmt: skip
EXPECTED_KEPT = {702861: 3315, 818677: 2157, 630000: 3701, 951658: 86,
                 100000: 4, 542213: 4}  # fmt: skip


@pytest.mark.parametrize("height", sorted(EXPECTED_REJECTIONS))
def test_per_reason_counts_of_a_real_block(height: int) -> None:
    flt, kept = run_filter(height)
    assert {r.value: n for r, n in flt.rejected.items()} == EXPECTED_REJECTIONS[height]
    assert flt.passed == EXPECTED_PASSED[height]
    assert flt.passed + sum(flt.rejected.values()) == len(block(height).txs)
    assert sum(len(k) for k in kept if k is not None) == EXPECTED_KEPT[height]
    assert len(flt.seen) == len(block(height).txs)


SUM_702861 = 203_103_673_264  # satoshis kept from block 702861


def test_block_702861_kept_amounts_in_block_order() -> None:
    _, kept = run_filter(702861)
    sats = [s for k in kept if k is not None for _, s in k]
    assert len(sats) == 3315
    assert sum(sats) == SUM_702861
    assert sats[:5] == _first_kept_sats(702861, 5)
    assert all(1000 < s < 10**13 for s in sats)


def _first_kept_sats(height: int, n: int) -> list[int]:
    """The first ``n`` kept amounts, by the method's rules applied directly."""
    seen: set[bytes] = set()
    found: list[int] = []
    for tx in block(height).txs:
        seen.add(tx.txid)
        ok = (
            len(tx.inputs) <= 5
            and len(tx.outputs) == 2
            and not tx.is_coinbase
            and all(o.script[:1] != b"\x6a" for o in tx.outputs)
            and all(sum(w) <= 500 for w in tx.witness)
            and all(i.prev_txid not in seen for i in tx.inputs)
        )
        if ok:
            found += [o.value for o in tx.outputs if 1e-5 < o.value / 1e8 < 1e5]
        if len(found) >= n:
            return found[:n]
    return found


# ------------------------------------------------- one real example per rule


def test_inputs_rule_on_a_real_transaction() -> None:
    tx = first(702861, lambda t: len(t.inputs) == 6 and len(t.outputs) == 2)
    assert reject_reason(tx, set()) is Reject.INPUTS
    five = attrs.evolve(tx, inputs=tx.inputs[:MAX_INPUTS])
    assert reject_reason(five, set()) is None


def test_outputs_rule_on_real_transactions() -> None:
    one = first(702861, lambda t: len(t.outputs) == 1 and len(t.inputs) == 1)
    three = first(702861, lambda t: len(t.outputs) == 3 and len(t.inputs) == 1)
    assert reject_reason(one, set()) is Reject.OUTPUTS
    assert reject_reason(three, set()) is Reject.OUTPUTS
    assert reject_reason(attrs.evolve(three, outputs=three.outputs[:2]), set()) is None


def test_outputs_rule_counts_outputs_that_the_amount_rule_drops() -> None:
    tx = first(702861, lambda t: reject_reason(t, set()) is None)
    dust = attrs.evolve(tx, outputs=(*tx.outputs, TxOut(0, b"\x51")))
    assert reject_reason(dust, set()) is Reject.OUTPUTS


def test_coinbase_rule_on_a_real_coinbase() -> None:
    coinbase = block(702861).txs[0]
    assert len(coinbase.outputs) == 2 and len(coinbase.inputs) == 1
    assert reject_reason(coinbase, set()) is Reject.COINBASE
    # A null previous txid alone, or the index alone, is not a coinbase.
    cb_in = coinbase.inputs[0]
    for changed in (
        attrs.evolve(cb_in, prev_txid=b"\x01" + bytes(31)),
        attrs.evolve(cb_in, prev_index=0xFFFFFFFE),
    ):
        assert not changed.is_coinbase
        # ...so the next rule decides: its witness commitment is an OP_RETURN.
        not_coinbase = attrs.evolve(coinbase, inputs=(changed,))
        assert reject_reason(not_coinbase, set()) is Reject.OP_RETURN


def test_coinbase_with_other_than_two_outputs_is_counted_under_outputs() -> None:
    coinbase = block(818677).txs[0]
    assert coinbase.is_coinbase and len(coinbase.outputs) != 2
    assert reject_reason(coinbase, set()) is Reject.OUTPUTS


def test_op_return_rule_on_a_real_transaction() -> None:
    tx = first(
        702861,
        lambda t: (
            len(t.outputs) == 2
            and len(t.inputs) <= 5
            and not t.is_coinbase
            and any(o.script[:1] == b"\x6a" for o in t.outputs)
        ),
    )
    assert reject_reason(tx, set()) is Reject.OP_RETURN
    # Only the first byte counts: 0x6a later in a script is no OP_RETURN.
    outputs = tuple(
        attrs.evolve(o, script=b"\x51" + o.script) if o.script[:1] == b"\x6a" else o
        for o in tx.outputs
    )
    assert reject_reason(attrs.evolve(tx, outputs=outputs), set()) is None


#: The one transaction in the shared blocks whose witness breaks the rule
#: (a 2157-byte inscription); it also has an OP_RETURN output, which the
#: method checks first, so no real block here counts a witness rejection.
BIG_WITNESS_TXID = "a6990ad46f5f0c99"


def test_witness_rule_on_the_real_inscription_transaction() -> None:
    tx = first(818677, lambda t: t.txid_hex.startswith(BIG_WITNESS_TXID))
    assert [sum(w) for w in tx.witness] == [2157]
    assert reject_reason(tx, set()) is Reject.OP_RETURN
    # With the OP_RETURN output replaced, the real witness is what rejects it.
    outputs = tuple(
        TxOut(o.value, b"\x51") if o.script[:1] == b"\x6a" else o for o in tx.outputs
    )
    no_op_return = attrs.evolve(tx, outputs=outputs)
    assert reject_reason(no_op_return, set()) is Reject.WITNESS
    assert reject_reason(attrs.evolve(no_op_return, witness=((500,),)), set()) is None


def test_witness_rule_is_a_running_total_per_input() -> None:
    tx = first(702861, lambda t: t.has_witness and reject_reason(t, set()) is None)
    n = len(tx.inputs)

    def with_witness(per_input: tuple[int, ...]) -> Reject | None:
        witness = (per_input,) + tuple(() for _ in range(n - 1))
        return reject_reason(attrs.evolve(tx, witness=witness), set())

    assert with_witness((MAX_WITNESS_BYTES,)) is None
    assert with_witness((MAX_WITNESS_BYTES + 1,)) is Reject.WITNESS
    assert with_witness((250, 250)) is None
    assert with_witness((250, 251)) is Reject.WITNESS
    assert with_witness((72, 33, 396)) is Reject.WITNESS
    # The limit is per input, not per transaction.
    if n >= 2:
        split = ((300,), (300,)) + tuple(() for _ in range(n - 2))
        assert reject_reason(attrs.evolve(tx, witness=split), set()) is None


def test_same_window_rule_on_a_real_child_in_the_same_block() -> None:
    txs = block(702861).txs
    index = {tx.txid: i for i, tx in enumerate(txs)}
    child = next(
        tx
        for tx in txs
        if any(i.prev_txid in index for i in tx.inputs)
        and reject_reason(tx, set()) is None
    )
    parents = {i.prev_txid for i in child.inputs} & set(index)
    assert reject_reason(child, parents) is Reject.SAME_WINDOW
    assert reject_reason(child, set()) is None
    # Its parent came earlier in the block, so the filter sees it in order.
    assert all(index[p] < index[child.txid] for p in parents)


def test_seen_set_holds_rejected_transactions_and_forget_releases_children() -> None:
    txs = block(702861).txs
    flt = TxFilter()
    for tx in txs:
        flt.offer(tx)
    assert len(flt.seen) == 2500 and flt.rejected[Reject.SAME_WINDOW] == 252
    # Replaying the block with every txid forgotten: nothing spends the window.
    flt.forget(tx.txid for tx in txs)
    assert flt.seen == set()
    again = TxFilter()
    for tx in txs:
        again.seen.clear()
        again.offer(tx)
    assert Reject.SAME_WINDOW not in again.rejected
    assert again.passed == 1680 + 252


def test_own_txid_joins_the_seen_set_before_the_inputs_are_checked() -> None:
    tx = first(702861, lambda t: reject_reason(t, set()) is None)
    spends_itself = attrs.evolve(
        tx, inputs=(attrs.evolve(tx.inputs[0], prev_txid=tx.txid), *tx.inputs[1:])
    )
    flt = TxFilter()
    assert flt.offer(spends_itself) is None
    assert flt.rejected == Counter({Reject.SAME_WINDOW: 1})


def test_rule_order_follows_the_methods_table() -> None:
    # The real coinbase of 702861 has two outputs: a coinbase with an
    # OP_RETURN output (its witness commitment) is rejected as a coinbase.
    coinbase = block(702861).txs[0]
    assert any(o.script[:1] == b"\x6a" for o in coinbase.outputs)
    assert reject_reason(coinbase, set()) is Reject.COINBASE
    many = first(702861, lambda t: len(t.inputs) > 5 and len(t.outputs) != 2)
    assert reject_reason(many, set()) is Reject.INPUTS


# ----------------------------------------------------------- amounts


@pytest.mark.parametrize(
    ("sats", "kept"),
    [
        (1000, False),  # exactly 1e-5 BTC: the bound is strict
        (1001, True),
        (10**13 - 1, True),
        (10**13, False),  # exactly 1e5 BTC
        (0, False),
        (546, False),
    ],
)
def test_amount_bounds_are_strict(sats: int, kept: bool) -> None:
    tx = first(702861, lambda t: reject_reason(t, set()) is None)
    other = tx.outputs[1]
    changed = attrs.evolve(tx, outputs=(TxOut(sats, tx.outputs[0].script), other))
    expected = [(0, sats)] if kept else []
    if 1000 < other.value < 10**13:
        expected.append((1, other.value))
    assert kept_outputs(changed) == expected


def test_a_passing_transaction_may_contribute_no_output() -> None:
    tx = first(702861, lambda t: reject_reason(t, set()) is None)
    dust = attrs.evolve(tx, outputs=(TxOut(1000, b"\x51"), TxOut(10**13, b"\x51")))
    flt = TxFilter()
    assert flt.offer(dust) == []
    assert flt.passed == 1


def test_witness_stripped_blocks_cannot_apply_the_witness_rule() -> None:
    for height in (630000, 840000):
        assert not any(tx.witness for tx in block(height).txs)


# --------------------------------- independent transcription over bitcoinlib


def method_rule(tx: CTransaction, seen: set[bytes]) -> str | None:
    """Section 1's table read literally, on python-bitcoinlib's objects."""
    if len(tx.vin) > 5:
        return "inputs"
    if len(tx.vout) != 2:
        return "outputs"
    null = b"\x00" * 32
    if any(i.prevout.hash == null and i.prevout.n == 0xFFFFFFFF for i in tx.vin):
        return "coinbase"
    if any(len(o.scriptPubKey) > 0 and o.scriptPubKey[0] == 0x6A for o in tx.vout):
        return "op_return"
    if not tx.wit.is_null():
        for w in tx.wit.vtxinwit:
            running = 0
            for item in w.scriptWitness.stack:
                if len(item) > 500:
                    return "witness"
                running += len(item)
                if running > 500:
                    return "witness"
    if any(i.prevout.hash in seen for i in tx.vin):
        return "same_window"
    return None


@pytest.mark.parametrize("height", ALL_HEIGHTS)
def test_filter_agrees_with_a_literal_transcription(height: int) -> None:
    ref = CBlock.deserialize(block_path(height).read_bytes())
    seen: set[bytes] = set()
    expected: list[object] = []
    for ctx in ref.vtx:
        seen.add(ctx.GetTxid())
        reason = method_rule(ctx, seen)
        if reason is None:
            expected.append(
                [(n, o.nValue) for n, o in enumerate(ctx.vout)
                 if 1e-5 < o.nValue / 1e8 < 1e5]
            )  # fmt: skip
        else:
            expected.append(reason)
    flt = TxFilter()
    got: list[object] = []
    for tx in block(height).txs:
        kept = flt.offer(tx)
        why = reject_reason(tx, flt.seen)
        got.append(kept if why is None else why.value)
    assert got == expected
