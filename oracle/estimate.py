"""The price estimate, exactly as the method's sections 2 to 7 define it.

Pure code over NumPy arrays: no I/O, no clock. The method is defined by a
sequence of float operations, and a price truncated with ``int()`` can land on
the other side of an integer if any sum is reassociated, so every reduction
here keeps the method's left-to-right order: sums are sequential
(``np.add.accumulate`` or a Python loop, never ``np.sum``'s pairwise
summation), and the template fit is vectorised across slides, not across
template positions, so each slide's dot product is still added up in template
order. The result is bit-identical to a plain transcription of the method
(``tests/reference_method.py``) at a hundredth of its cost.

Too little data is an answer, not an exception: :func:`estimate` returns an
:class:`Estimate` whose ``price`` is None and whose ``reason`` says why.
"""

from __future__ import annotations

from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "EDGES",
    "Estimate",
    "Histogram",
    "Params",
    "ROUND_SATS",
    "SMOOTH_TEMPLATE",
    "SPIKE_TEMPLATE",
    "USD_AMOUNTS",
    "bin_indices",
    "central_point",
    "estimate",
    "implied_prices",
]

FloatArray = npt.NDArray[np.float64]

N_BINS: Final = 2401


def _edges() -> FloatArray:
    edges = [0.0]
    for e in range(-6, 6):
        for b in range(200):
            edges.append(10 ** (e + b / 200))
    return np.array(edges, dtype=np.float64)


#: Lower edges of the 2401 histogram bins: 0.0, then 200 per decade from 1e-6.
EDGES: Final = _edges()

#: Bins replaced by the mean of their neighbours (round BTC amounts), in order.
ROUND_BTC_BINS: Final = (
    201, 401, 461, 496, 540, 601, 661, 696, 740,
    801, 861, 896, 940, 1001, 1061, 1096, 1140, 1201,
)  # fmt: skip

_E: Final = 2.718281828459045
TEMPLATE_LEN: Final = 803
SMOOTH_TEMPLATE: Final = np.array(
    [
        0.00150 * _E ** (-((x - 411) ** 2) / (2 * 201**2)) + 0.0000005 * x
        for x in range(TEMPLATE_LEN)
    ],
    dtype=np.float64,
)
_SPIKES: Final = {
    40: 0.001300198324984352, 141: 0.001676746949820743,
    201: 0.003468805546942046, 202: 0.001991977522512513,
    236: 0.001905066647961839, 261: 0.003341772718156079,
    262: 0.002588902624584287, 296: 0.002577893841190244,
    297: 0.002733728814200412, 340: 0.003076117748975647,
    341: 0.005613067550103145, 342: 0.003088253178535568,
    400: 0.002918457489366139, 401: 0.006174500465286022,
    402: 0.004417068070043504, 403: 0.002628663628020371,
    436: 0.002858828161543839, 461: 0.004097463611984264,
    462: 0.003345917406120509, 496: 0.002521467726855856,
    497: 0.002784125730361008, 541: 0.003792850444811335,
    601: 0.003688240815848247, 602: 0.002392400117402263,
    636: 0.001280993059008106, 661: 0.001654665137536031,
    662: 0.001395501347054946, 741: 0.001154279140906312,
    801: 0.000832244504868709,
}  # fmt: skip
SPIKE_TEMPLATE: Final = np.zeros(TEMPLATE_LEN, dtype=np.float64)
for _i, _w in _SPIKES.items():
    SPIKE_TEMPLATE[_i] = _w
_SPIKE_IDX: Final = tuple(sorted(_SPIKES))

#: Round dollar amounts whose BTC equivalents give per-output price points.
USD_AMOUNTS: Final = (5, 10, 15, 20, 25, 30, 40, 50, 100, 150, 200, 300, 500, 1000)


def _round_sats() -> tuple[float, ...]:
    # Float accumulation, as the method specifies: the drift is part of it
    # (the 0.001..0.01 decade yields 91 values, not 90).
    values: list[float] = []
    for start, step, stop in (
        (0.00005, 0.00001, 0.0001),
        (0.0001, 0.00001, 0.001),
        (0.001, 0.0001, 0.01),
        (0.01, 0.001, 0.1),
        (0.1, 0.01, 1),
    ):
        x = start
        while x < stop:
            values.append(x)
            x += step
    return tuple(values)


#: The 366 "round sats" amounts near which outputs give no price point.
ROUND_SATS: Final = _round_sats()
_MICRO_LO = np.array([r - 0.0001 * r for r in ROUND_SATS])
_MICRO_HI = np.array([r + 0.0001 * r for r in ROUND_SATS])
_order = np.argsort(_MICRO_LO, kind="stable")
_MICRO_LO = _MICRO_LO[_order]
# Running maximum of upper bounds: an amount lies in some open interval iff
# the largest upper bound among intervals starting below it exceeds it, which
# stays right even where drifted values make two intervals overlap.
_MICRO_HI_MAX = np.maximum.accumulate(_MICRO_HI[_order])


@attrs.frozen
class Params:
    """The method's tunable ranges; the defaults are the reference's values.

    Attributes:
      slide_min, slide_max: inclusive slide range of the template fit. Price
        at slide s is ``100 / EDGES[601 + s]``, so these bound the prices the
        fit can see (about $507k down to $10k with the defaults).
      smooth_below: slides below this add ``0.65 *`` the smooth score.
      bin_lo, bin_hi: inclusive range of histogram bins kept by the clean-up.
    """

    slide_min: int = -141
    slide_max: int = 200
    smooth_below: int = 150
    bin_lo: int = 201
    bin_hi: int = 1600

    def __attrs_post_init__(self) -> None:
        if self.slide_min > self.slide_max:
            raise ValueError("slide_min must not exceed slide_max")
        if self.slide_min - 1 + 199 < 0 or 199 + self.slide_max + 1 + 802 >= N_BINS:
            raise ValueError("slide range reaches outside the histogram")
        if not 1 <= self.bin_lo <= self.bin_hi < N_BINS - 1:
            raise ValueError("bin range must lie within 1..2399")


def bin_indices(amounts_btc: FloatArray) -> npt.NDArray[np.intp]:
    """Bin of each amount: the ``i`` with ``EDGES[i] <= x < EDGES[i + 1]``."""
    return np.searchsorted(EDGES, amounts_btc, side="right") - 1


@attrs.define(eq=False)
class Histogram:
    """Output counts per bin, supporting removal for a sliding window.

    Counts are integers, so adding and removing in any order gives exactly the
    float histogram the method builds by adding 1.0 per output.
    """

    counts: npt.NDArray[np.int64] = attrs.field(
        factory=lambda: np.zeros(N_BINS, dtype=np.int64)
    )

    def add(self, amounts_btc: FloatArray) -> None:
        """Count each amount once. Raises ValueError for a negative or
        non-finite amount, leaving the counts unchanged."""
        self.counts += np.bincount(self._bins(amounts_btc), minlength=N_BINS)

    def remove(self, amounts_btc: FloatArray) -> None:
        """Uncount each amount once. Raises ValueError, leaving the counts
        unchanged, for an amount that is not counted."""
        delta = np.bincount(self._bins(amounts_btc), minlength=N_BINS)
        if (delta > self.counts).any():
            raise ValueError("removed an amount that was never added")
        self.counts -= delta

    @staticmethod
    def _bins(amounts_btc: FloatArray) -> npt.NDArray[np.intp]:
        amounts = np.asarray(amounts_btc, np.float64)
        if not np.all(np.isfinite(amounts) & (amounts >= 0)):
            raise ValueError("amounts must be finite and not negative")
        return bin_indices(amounts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def of(cls, amounts_btc: FloatArray) -> Histogram:
        hist = cls()
        hist.add(amounts_btc)
        return hist


@attrs.frozen
class Estimate:
    """One run of the method over a window of outputs.

    ``price`` and ``rough_price`` are None when there was not enough data, and
    then ``reason`` says why. ``points`` holds every per-output price point in
    output order and ``point_output`` the index of the output each came from.
    ``spread`` is the median absolute deviation around the final price among
    the points within 5 % of the rough price; ``band`` is the chart band.
    """

    price: float | None
    rough_price: int | None
    reason: str | None
    outputs: int
    points: FloatArray
    point_output: npt.NDArray[np.intp]
    spread: float | None
    band: tuple[float, float] | None
    best_slide: int | None = None

    @property
    def point_count(self) -> int:
        return len(self.points)


def _sequential_sum(values: FloatArray) -> float:
    if len(values) == 0:
        return 0.0
    return float(np.add.accumulate(values)[-1])


def _cleaned(counts: npt.NDArray[np.int64], params: Params) -> FloatArray | None:
    bins = counts.astype(np.float64)
    bins[: params.bin_lo] = 0.0
    bins[params.bin_hi + 1 :] = 0.0
    for r in ROUND_BTC_BINS:
        bins[r] = 0.5 * (bins[r - 1] + bins[r + 1])
    part = bins[params.bin_lo : params.bin_hi + 1]
    total = _sequential_sum(part)
    if total == 0.0:
        return None
    # Division by the total, then the cap: elementwise, hence exact.
    bins[params.bin_lo : params.bin_hi + 1] = np.minimum(part / total, 0.008)
    return bins


def _fit(bins: FloatArray, slides: npt.NDArray[np.intp]) -> tuple[FloatArray, ...]:
    """Spike and smooth dot products for every slide, in template order."""
    spike = np.zeros(len(slides))
    for n in _SPIKE_IDX:
        # Zero template entries add exact zeros in a sequential sum: skip them.
        spike = spike + bins[199 + slides + n] * SPIKE_TEMPLATE[n]
    smooth = np.zeros(len(slides))
    base = 199 + slides
    for n in range(TEMPLATE_LEN):
        smooth = smooth + bins[base + n] * SMOOTH_TEMPLATE[n]
    return spike, smooth


def _spike_at(bins: FloatArray, slide: int) -> float:
    total = 0.0
    for n in _SPIKE_IDX:
        total += float(bins[199 + slide + n]) * float(SPIKE_TEMPLATE[n])
    return total


def _rough(bins: FloatArray, params: Params) -> tuple[int, int] | None:
    """Rough price and best slide, or None where the fit sees no signal."""
    slides = np.arange(params.slide_min, params.slide_max + 1)
    spike, smooth = _fit(bins, slides)
    scores = np.where(slides < params.smooth_below, spike + 0.65 * smooth, spike)
    best_slide, best_score = 0, 0.0
    # First strict maximum, starting from score 0 at slide 0.
    top = int(np.argmax(scores))
    if scores[top] > 0.0:
        best_slide, best_score = int(slides[top]), float(scores[top])
    total = _sequential_sum(scores)
    up, down = _spike_at(bins, best_slide + 1), _spike_at(bins, best_slide - 1)
    neighbour_slide, neighbour_score = (
        (best_slide + 1, up) if up >= down else (best_slide - 1, down)
    )
    p_best = 100 / float(EDGES[601 + best_slide])
    p_neighbour = 100 / float(EDGES[601 + neighbour_slide])
    avg = total / len(slides)
    a1 = best_score - avg
    a2 = abs(neighbour_score - avg)
    if a1 + a2 == 0.0:
        # Every score is zero: the outputs all lie in bins that no slide of
        # the templates reaches (for instance only whole-BTC amounts in 2010).
        return None
    w1 = a1 / (a1 + a2)
    w2 = a2 / (a1 + a2)
    return int(w1 * p_best + w2 * p_neighbour), best_slide


def implied_prices(
    amounts_btc: FloatArray, rough: int
) -> tuple[FloatArray, npt.NDArray[np.intp]]:
    """Per-output price points around ``rough`` (method section 6).

    Returns the points and, for each, the index of its output, in the
    method's order: outputs in order, and for each output the dollar amounts
    in ascending order.
    """
    n = np.asarray(amounts_btc, dtype=np.float64)
    # Amounts within 0.01 % of a round sats value never give a point.
    k = np.searchsorted(_MICRO_LO, n, side="left") - 1
    micro = (k >= 0) & (n < _MICRO_HI_MAX[np.maximum(k, 0)])
    usable = ~micro
    hits_idx = []
    hits_usd = []
    for j, usd in enumerate(USD_AMOUNTS):
        a = usd / rough
        sel = np.flatnonzero(usable & (0.75 * a < n) & (n < 1.25 * a))
        hits_idx.append(sel)
        hits_usd.append(np.full(len(sel), j, dtype=np.intp))
    idx = np.concatenate(hits_idx)
    usd_j = np.concatenate(hits_usd)
    order = np.lexsort((usd_j, idx))
    idx, usd_j = idx[order], usd_j[order]
    usd_values = np.array(USD_AMOUNTS, dtype=np.float64)[usd_j]
    return usd_values / n[idx], idx


def central_point(
    points: FloatArray, lo: float, hi: float
) -> tuple[float, float] | None:
    """The point strictly inside (lo, hi) with the least total absolute
    distance to the others (first on ties), and its median absolute deviation.

    Returns None when no point lies inside. Total distances come from prefix
    sums accumulated in sorted order, as the method computes them.
    """
    inside = np.sort(points[(points > lo) & (points < hi)])
    m = len(inside)
    if m == 0:
        return None
    prefix = np.add.accumulate(inside)
    total = prefix[-1]
    i = np.arange(m, dtype=np.float64)
    left_sums = np.concatenate(([0.0], prefix[:-1]))
    right_sums = total - prefix
    dist = (inside * i - left_sums) + (right_sums - inside * (m - 1 - i))
    best = float(inside[int(np.argmin(dist))])
    dev = np.sort(np.abs(inside - best))
    if m % 2:
        mad = float(dev[m // 2])
    else:
        mad = float((dev[m // 2 - 1] + dev[m // 2]) / 2)
    return best, mad


def _empty(reason: str, outputs: int, rough: int | None = None) -> Estimate:
    return Estimate(
        None,
        rough,
        reason,
        outputs,
        np.empty(0, np.float64),
        np.empty(0, np.intp),
        None,
        None,
    )


def estimate(
    amounts_btc: FloatArray,
    histogram: Histogram | None = None,
    params: Params = Params(),
) -> Estimate:
    """Run the method over the filtered output amounts of one window.

    Args:
      amounts_btc: every kept output's amount in BTC, in window order.
      histogram: the window's histogram, when the caller maintains one
        incrementally; built from ``amounts_btc`` when omitted. It must count
        exactly ``amounts_btc``.
      params: slide and bin ranges (the method's by default).

    Returns an :class:`Estimate`; never raises for lack of data.
    """
    amounts = np.asarray(amounts_btc, dtype=np.float64)
    hist = histogram if histogram is not None else Histogram.of(amounts)
    bins = _cleaned(hist.counts, params)
    if bins is None:
        return _empty("no outputs in the histogram's range", len(amounts))
    fit = _rough(bins, params)
    if fit is None:
        return _empty("no outputs in the range the template fit can see", len(amounts))
    rough, best_slide = fit
    points, point_output = implied_prices(amounts, rough)
    central = central_point(points, 0.95 * rough, 1.05 * rough)
    if central is None:
        return attrs.evolve(
            _empty("no price point within 5% of the rough price", len(amounts), rough),
            points=points,
            point_output=point_output,
            best_slide=best_slide,
        )
    price, spread = central
    band_center = central_point(points, 0.9 * price, 1.1 * price)
    assert band_center is not None  # the final price itself lies inside
    dev = band_center[1] / (0.2 * price)
    ax = min(max(0.05 + (dev - 0.17) * (0.10 / 0.03), 0.05), 0.20)
    return Estimate(
        price,
        rough,
        None,
        len(amounts),
        points,
        point_output,
        spread,
        (price * (1 - ax), price * (1 + ax)),
        best_slide,
    )
