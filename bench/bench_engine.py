"""Engine benchmark: decoder, filter and estimate, against slower references.

Run on demand from the repository root; it prints figures and is not a test::

    python bench/bench_engine.py [--repeat N]

Decoding: every shared mainnet block in ``tests/data`` (complete and
witness-stripped) is decoded with :func:`oracle.decode.parse_block`, alone and
followed by :class:`oracle.filter.TxFilter`; each of their transactions is
decoded on its own with :func:`oracle.decode.parse_tx` (as ``rawtx``
messages arrive); and the blocks are deserialised by python-bitcoinlib's
``CBlock.deserialize`` (which also builds both merkle trees, hashing every
transaction) and each transaction by ``CTransaction.deserialize`` (no
hashing) from the same bytes in the same run. Each figure is the median of
``--repeat`` passes over all blocks; "best" is the fastest pass.

Estimate: :func:`oracle.estimate.estimate` on the one-day vector (median of
``--estimate-runs`` runs) against ``tests/reference_method.run`` on the same
input, run once. The two answers must be identical, and the estimate must take
under 40 ms; otherwise the script exits with status 1.

Timings are wall-clock (``time.perf_counter``) on whatever machine runs it,
with the garbage collector left on; they vary with CPU and load, so compare
figures from the same run only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bitcoin.core import CBlock, CTransaction

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import reference_method  # noqa: E402

from oracle.decode import parse_block, parse_tx  # noqa: E402
from oracle.estimate import estimate  # noqa: E402
from oracle.filter import TxFilter  # noqa: E402

DATA = ROOT / "tests" / "data"
VECTOR = DATA / "vectors" / "oneday_937665-937808.json"
ESTIMATE_BUDGET_S = 0.040


def load_blocks() -> tuple[list[bytes], int]:
    """Every block listed in the index, and their total transaction count."""
    with open(DATA / "blocks_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    blocks = [(DATA / row["file"]).read_bytes() for row in rows]
    return blocks, sum(int(row["tx_count"]) for row in rows)


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and fastest wall-clock seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def decode_only(blocks: list[bytes]) -> None:
    for raw in blocks:
        parse_block(raw)


def decode_and_filter(blocks: list[bytes]) -> None:
    for raw in blocks:
        flt = TxFilter()
        offer = flt.offer
        for tx in parse_block(raw).txs:
            offer(tx)


def each_tx(raws: list[bytes]) -> None:
    for raw in raws:
        parse_tx(raw)


def bitcoinlib_each_tx(raws: list[bytes]) -> None:
    for raw in raws:
        CTransaction.deserialize(raw)


def bitcoinlib_deserialize(blocks: list[bytes]) -> None:
    for raw in blocks:
        CBlock.deserialize(raw)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="decode passes")
    parser.add_argument("--estimate-runs", type=int, default=21)
    args = parser.parse_args(argv)

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{cpu_name()}, {os.cpu_count()} CPUs"
    )
    blocks, n_tx = load_blocks()
    n_bytes = sum(len(b) for b in blocks)
    mb = n_bytes / 1e6
    # As transactions arrive on ZMQ rawtx: one buffer per transaction.
    tx_raws = [tx.raw for raw in blocks for tx in parse_block(raw).txs]
    print(f"\ndecoding {len(blocks)} real blocks: {n_tx} transactions, {mb:.2f} MB")
    print(f"  (median of {args.repeat} passes)")
    rows = [
        (
            "fiatprint parse_block",
            median_time(lambda: decode_only(blocks), args.repeat),
        ),
        (
            "fiatprint parse_block + TxFilter",
            median_time(lambda: decode_and_filter(blocks), args.repeat),
        ),
        (
            "fiatprint parse_tx, one call per tx",
            median_time(lambda: each_tx(tx_raws), args.repeat),
        ),
        (
            "python-bitcoinlib CBlock.deserialize",
            median_time(lambda: bitcoinlib_deserialize(blocks), args.repeat),
        ),
        (
            "python-bitcoinlib CTransaction.deserialize",
            median_time(lambda: bitcoinlib_each_tx(tx_raws), args.repeat),
        ),
    ]
    print(f"  {'':42} {'seconds':>8} {'tx/s':>10} {'MB/s':>7} {'best MB/s':>10}")
    for name, (seconds, best) in rows:
        print(
            f"  {name:42} {seconds:8.3f} {n_tx / seconds:10,.0f} "
            f"{mb / seconds:7.1f} {mb / best:10.1f}"
        )
    by_block = rows[3][1][0] / rows[1][1][0]
    by_tx = rows[4][1][0] / rows[2][1][0]
    print(
        f"  parse_block + TxFilter: {by_block:.1f}x the speed of CBlock.deserialize;"
        f" parse_tx: {by_tx:.1f}x the speed of CTransaction.deserialize"
    )

    with open(VECTOR) as f:
        amounts_list = json.load(f)["filtered_outputs"]
    amounts = np.array(amounts_list, dtype=np.float64)
    print(f"\nestimate on the one-day vector: {len(amounts)} outputs")
    ours = estimate(amounts)  # warm-up, and the answer to compare
    times = []
    for _ in range(args.estimate_runs):
        start = time.perf_counter()
        estimate(amounts)
        times.append(time.perf_counter() - start)
    ours_s = statistics.median(times)
    start = time.perf_counter()
    ref = reference_method.run(amounts_list)
    ref_s = time.perf_counter() - start
    mine = {
        "rough": ours.rough_price,
        "price": ours.price,
        "spread": ours.spread,
        "points": ours.point_count,
    }
    print(
        f"  fiatprint estimate (median of {args.estimate_runs}): "
        f"{ours_s * 1000:8.1f} ms  (min {min(times) * 1000:.1f}, "
        f"max {max(times) * 1000:.1f})"
    )
    print(f"  tests/reference_method.run (once):      {ref_s * 1000:8.1f} ms")
    print(f"  speed-up: {ref_s / ours_s:.0f}x")
    print(f"  answer: {mine}")
    failed = False
    if mine != ref:
        print(f"  MISMATCH: reference gives {ref}")
        failed = True
    else:
        print("  identical to the reference: rough, price, spread, point count")
    budget_ms = ESTIMATE_BUDGET_S * 1000
    if ours_s >= ESTIMATE_BUDGET_S:
        print(f"  OVER BUDGET: estimate must take under {budget_ms:.0f} ms")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
