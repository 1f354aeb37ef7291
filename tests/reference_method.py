"""A plain, loop-by-loop Python transcription of docs/method.md sections 2 to 7.

Written from the method's description only, as directly as the text reads, with
no NumPy. It is the oracle that ``oracle.estimate`` must match bit for bit, and
the slow alternative that ``bench/bench_engine.py`` times it against. It
crashes where the method's text would (empty histogram, no central point):
callers only give it inputs where the method is defined.
"""

from __future__ import annotations

import math

E = 2.718281828459045
USDS = [5, 10, 15, 20, 25, 30, 40, 50, 100, 150, 200, 300, 500, 1000]
SPIKES = {
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


def edges() -> list[float]:
    out = [0.0]
    for e in range(-6, 6):
        for b in range(200):
            out.append(10 ** (e + b / 200))
    return out


def histogram(amounts: list[float]) -> list[float]:
    ed = edges()
    bins = [0.0] * len(ed)
    for x in amounts:
        for i in range(len(ed)):
            upper = ed[i + 1] if i + 1 < len(ed) else math.inf
            if ed[i] <= x < upper:
                bins[i] += 1.0
                break
    return bins


def clean(bins: list[float]) -> list[float]:
    bins = list(bins)
    for i in range(0, 201):
        bins[i] = 0.0
    for i in range(1601, 2401):
        bins[i] = 0.0
    for r in [201, 401, 461, 496, 540, 601, 661, 696, 740, 801, 861, 896, 940,
              1001, 1061, 1096, 1140, 1201]:  # fmt: skip
        bins[r] = 0.5 * (bins[r - 1] + bins[r + 1])
    total = 0.0
    for i in range(201, 1601):
        total += bins[i]
    for i in range(201, 1601):
        bins[i] /= total
    for i in range(201, 1601):
        if bins[i] > 0.008:
            bins[i] = 0.008
    return bins


def templates() -> tuple[list[float], list[float]]:
    smooth = []
    for x in range(803):
        smooth.append(0.00150 * E ** (-((x - 411) ** 2) / (2 * 201**2)) + 0.0000005 * x)
    spike = [0.0] * 803
    for k, v in SPIKES.items():
        spike[k] = v
    return smooth, spike


def rough_price(bins: list[float]) -> int:
    ed = edges()
    smooth, spike = templates()

    def dot(template: list[float], s: int) -> float:
        total = 0.0
        for n in range(803):
            total += bins[199 + s + n] * template[n]
        return total

    best_slide, best_score, total_score = 0, 0.0, 0.0
    for s in range(-141, 201):
        sp = dot(spike, s)
        score = sp + 0.65 * dot(smooth, s) if s < 150 else sp
        if score > best_score:
            best_score, best_slide = score, s
        total_score += score
    up = dot(spike, best_slide + 1)
    down = dot(spike, best_slide - 1)
    if up >= down:
        n_slide, n_score = best_slide + 1, up
    else:
        n_slide, n_score = best_slide - 1, down
    p_best = 100 / ed[601 + best_slide]
    p_n = 100 / ed[601 + n_slide]
    avg = total_score / 342
    a1 = best_score - avg
    a2 = abs(n_score - avg)
    w1 = a1 / (a1 + a2)
    w2 = a2 / (a1 + a2)
    return int(w1 * p_best + w2 * p_n)


def round_sats() -> list[float]:
    vals = []
    for start, step, stop in [(0.00005, 0.00001, 0.0001), (0.0001, 0.00001, 0.001),
                              (0.001, 0.0001, 0.01), (0.01, 0.001, 0.1),
                              (0.1, 0.01, 1)]:  # fmt: skip
        x = start
        while x < stop:
            vals.append(x)
            x += step
    return vals


def points(amounts: list[float], rough: int) -> list[float]:
    rs = round_sats()
    out = []
    for n in amounts:
        for usd in USDS:
            a = usd / rough
            if 0.75 * a < n < 1.25 * a:
                if any(r - 0.0001 * r < n < r + 0.0001 * r for r in rs):
                    continue
                out.append(usd / n)
    return out


def central(pts: list[float], lo: float, hi: float) -> tuple[float, float]:
    xs = sorted(p for p in pts if lo < p < hi)
    m = len(xs)
    prefix = []
    run = 0.0
    for x in xs:
        run += x
        prefix.append(run)
    best_i, best_d = 0, None
    for i, x in enumerate(xs):
        left = x * i - (prefix[i - 1] if i else 0.0)
        right = (run - prefix[i]) - x * (m - 1 - i)
        d = left + right
        if best_d is None or d < best_d:
            best_i, best_d = i, d
    best = xs[best_i]
    dev = sorted(abs(x - best) for x in xs)
    mad = dev[m // 2] if m % 2 else (dev[m // 2 - 1] + dev[m // 2]) / 2
    return best, mad


def run(amounts: list[float]) -> dict:
    bins = clean(histogram(amounts))
    rough = rough_price(bins)
    pts = points(amounts, rough)
    price, spread = central(pts, 0.95 * rough, 1.05 * rough)
    return {"rough": rough, "price": price, "spread": spread, "points": len(pts)}
