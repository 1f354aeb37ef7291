"""The price of a window of confirmed blocks, and how it is shown.

:func:`price_blocks` runs the filters and the estimate over blocks in height
order; :func:`price_vector` does the same for a vector of already-filtered
outputs. Both return a :class:`PriceReport`, which renders as one human line
(:meth:`PriceReport.human`) or one JSON object (:meth:`PriceReport.as_json`).
``fiatprint price`` prints these, whether the blocks came from files or from a
node over RPC, so both sources print byte-identical results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np

from .decode import Block
from .estimate import Estimate, FloatArray, estimate
from .filter import Reject, TxFilter

__all__ = ["PriceReport", "price_blocks", "price_vector"]


@attrs.frozen
class PriceReport:
    estimate: Estimate
    #: Every transaction read (None for a vector, which holds outputs only).
    transactions: int | None
    #: Transactions whose outputs the method used (None for a vector).
    transactions_used: int | None
    rejected: dict[str, int] | None
    first_height: int | None
    last_height: int | None
    first_time: int | None
    last_time: int | None
    blocks: int | None
    #: Per kept output, in window order: amount (BTC), height, header time.
    amounts: FloatArray
    heights: np.ndarray
    times: np.ndarray

    @property
    def ok(self) -> bool:
        return self.estimate.price is not None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict. Floats are the exact values (``repr`` round-trips)."""
        e = self.estimate
        return {
            "price": e.price,
            "rough_price": e.rough_price,
            "reason": e.reason,
            "transactions": self.transactions,
            "transactions_used": self.transactions_used,
            "outputs": e.outputs,
            "points": e.point_count,
            "spread": e.spread,
            "band": list(e.band) if e.band else None,
            "first_height": self.first_height,
            "last_height": self.last_height,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "blocks": self.blocks,
            "rejected": self.rejected,
        }

    def human(self) -> str:
        """One line: where, the price, the rough price and the counts."""
        e = self.estimate
        where = _span(self.first_height, self.last_height)
        counts = f"{e.outputs:,} outputs"
        if self.transactions is not None:
            counts = (
                f"{self.transactions:,} transactions, "
                f"{self.transactions_used:,} used, " + counts
            )
        if e.price is None:
            rough = "" if e.rough_price is None else f" (rough ${e.rough_price:,})"
            return f"{where}: no price: not enough data: {e.reason}{rough}; {counts}"
        return (
            f"{where}: ${e.price:,.2f} (rough ${e.rough_price:,}, "
            f"spread ${e.spread:,.2f}) from {e.point_count:,} points; {counts}"
        )


def _span(first: int | None, last: int | None) -> str:
    if first is None:
        return "window of unknown heights"
    if first == last:
        return f"block {first}"
    return f"blocks {first}..{last}"


def price_blocks(blocks: Iterable[tuple[int | None, Block]]) -> PriceReport:
    """Filter and estimate ``(height, block)`` pairs as one window.

    The caller passes them in height order; heights may be None when unknown
    (before BIP34), and then the report's heights are None too. ``blocks`` is
    consumed once and no block is kept, so a generator that decodes one block
    at a time prices a whole day in the memory of one decoded block.
    """
    flt = TxFilter()
    amounts: list[float] = []
    heights: list[int] = []
    times: list[int] = []
    known: list[int] = []
    block_times: list[int] = []
    n_tx = 0
    for height, block in blocks:
        t = block.header.time
        block_times.append(t)
        if height is not None:
            known.append(height)
        h = -1 if height is None else height
        for tx in block.txs:
            n_tx += 1
            kept = flt.offer(tx)
            if kept:
                for _vout, sats in kept:
                    amounts.append(sats / 1e8)
                    heights.append(h)
                    times.append(t)
    arr = np.array(amounts, dtype=np.float64)
    return PriceReport(
        estimate=estimate(arr),
        transactions=n_tx,
        transactions_used=flt.passed,
        rejected={r.value: flt.rejected.get(r, 0) for r in Reject},
        first_height=min(known) if known else None,
        last_height=max(known) if known else None,
        first_time=min(block_times, default=None),
        last_time=max(block_times, default=None),
        blocks=len(block_times),
        amounts=arr,
        heights=np.array(heights, dtype=np.int64),
        times=np.array(times, dtype=np.int64),
    )


def price_vector(
    amounts: Sequence[float], heights: Sequence[int], times: Sequence[int]
) -> PriceReport:
    """Estimate a vector of already-filtered outputs (amounts in BTC)."""
    if not (len(amounts) == len(heights) == len(times)):
        raise ValueError(
            f"vector lengths differ: {len(amounts)} amounts, {len(heights)} "
            f"heights, {len(times)} times"
        )
    arr = np.array(amounts, dtype=np.float64)
    if len(arr) and not np.all(np.isfinite(arr)):
        raise ValueError("vector holds amounts that are not finite numbers")
    h = np.array(heights, dtype=np.int64)
    t = np.array(times, dtype=np.int64)
    known = h[h >= 0]  # a vector without heights marks them -1
    return PriceReport(
        estimate=estimate(arr),
        transactions=None,
        transactions_used=None,
        rejected=None,
        first_height=int(known.min()) if len(known) else None,
        last_height=int(known.max()) if len(known) else None,
        first_time=int(t.min()) if len(t) else None,
        last_time=int(t.max()) if len(t) else None,
        blocks=len(set(known.tolist())) if len(known) else None,
        amounts=arr,
        heights=h,
        times=t,
    )
