"""Which transactions and outputs count, as the method's section 1 defines.

Pure code: no I/O, no clock. :func:`reject_reason` judges one transaction
against a set of already-seen txids; :class:`TxFilter` keeps that set and the
per-reason counters for a stream of transactions read in order.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from typing import Final

import attrs

from .decode import Tx

__all__ = [
    "MAX_INPUTS",
    "MAX_WITNESS_BYTES",
    "Reject",
    "TxFilter",
    "kept_outputs",
    "reject_reason",
]

MAX_INPUTS: Final = 5
OUTPUTS_REQUIRED: Final = 2
MAX_WITNESS_BYTES: Final = 500
#: Amount bounds in BTC, both strict.
MIN_BTC: Final = 1e-5
MAX_BTC: Final = 1e5
_OP_RETURN: Final = 0x6A


class Reject(enum.Enum):
    """Why a transaction's outputs were not used. Values are metric labels."""

    INPUTS = "inputs"  # more than five inputs
    OUTPUTS = "outputs"  # not exactly two outputs
    COINBASE = "coinbase"
    OP_RETURN = "op_return"  # an output script starting with OP_RETURN
    WITNESS = "witness"  # a witness item, or one input's items, over 500 bytes
    SAME_WINDOW = "same_window"  # spends a transaction already in the window


def reject_reason(tx: Tx, seen: set[bytes] | frozenset[bytes]) -> Reject | None:
    """The first rule (in the method's table order) that ``tx`` breaks, or None.

    ``seen`` must already contain ``tx.txid``'s predecessors in the window; the
    method adds a transaction's own txid before checking its inputs, so a
    transaction spending itself (impossible on chain) would be rejected too.
    """
    inputs = tx.inputs
    if len(inputs) > MAX_INPUTS:
        return Reject.INPUTS
    if len(tx.outputs) != OUTPUTS_REQUIRED:
        return Reject.OUTPUTS
    for txin in inputs:
        if txin.is_coinbase:
            return Reject.COINBASE
    for out in tx.outputs:
        if out.script[:1] == b"\x6a":
            return Reject.OP_RETURN
    for items in tx.witness:
        if sum(items) > MAX_WITNESS_BYTES:
            return Reject.WITNESS
    for txin in inputs:
        if txin.prev_txid in seen:
            return Reject.SAME_WINDOW
    return None


def kept_outputs(tx: Tx) -> list[tuple[int, int]]:
    """``(vout, sats)`` of the outputs whose amount lies strictly in (1e-5, 1e5) BTC.

    Only meaningful for a transaction that passed :func:`reject_reason`.
    """
    kept = []
    for vout, out in enumerate(tx.outputs):
        btc = out.value / 1e8
        if MIN_BTC < btc < MAX_BTC:
            kept.append((vout, out.value))
    return kept


@attrs.define(eq=False)
class TxFilter:
    """Filters a stream of transactions in window order.

    Every transaction offered joins the seen set (before its own inputs are
    checked), whether it passes or not. ``rejected`` counts rejections by
    reason; ``passed`` counts transactions whose outputs were used.
    """

    seen: set[bytes] = attrs.field(factory=set)
    rejected: Counter[Reject] = attrs.field(factory=Counter)
    passed: int = 0

    def offer(self, tx: Tx) -> list[tuple[int, int]] | None:
        """Judge ``tx``; return its kept ``(vout, sats)`` or None if rejected."""
        self.seen.add(tx.txid)
        reason = reject_reason(tx, self.seen)
        if reason is not None:
            self.rejected[reason] += 1
            return None
        self.passed += 1
        return kept_outputs(tx)

    def forget(self, txids: Iterable[bytes]) -> None:
        """Drop txids that left the window, so their children count again."""
        self.seen.difference_update(txids)
