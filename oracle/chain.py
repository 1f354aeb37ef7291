"""Choosing blocks by height range or UTC day, and fetching them from a node.

``fiatprint price --heights A..B`` and ``--date YYYY-MM-DD`` use this module;
it only talks to the node through :class:`oracle.rpc.RpcClient`.

A UTC day's blocks (:func:`day_heights`) are a contiguous run of heights, as
the method reads them: from the first block stamped at or after the day's
midnight up to, not including, the first later block stamped at or after the
next midnight. Header times are not monotonic in height (a miner's clock may
lag by up to about two hours), so a block inside the run stamped just before
midnight still belongs to it, and the search for each end is a binary search
on header times followed by a look back over the :data:`LOOK_BACK` blocks
before the point it lands on, taking the earliest block there stamped at or
after the boundary. A day is complete when its last block has
``confirmations`` blocks on top of it (six by default, so a one- or
two-block reorganisation cannot change the answer); an incomplete day is
refused with :class:`DayIncomplete`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TextIO

import attrs
import trio

from .config import flag_name, load_settings
from .decode import Block, DecodeError, parse_block, peek_block
from .report import PriceReport, price_blocks
from .rpc import RpcClient, RpcError

__all__ = [
    "LOOK_BACK",
    "ChainError",
    "DayIncomplete",
    "HeaderCache",
    "NoBlocks",
    "add_node_arguments",
    "day_heights",
    "decode_in_order",
    "fetch_blocks",
    "fetch_raw_blocks",
    "height_range",
    "node_report",
    "parse_day",
    "parse_height_range",
    "progress_printer",
    "report_from_args",
    "wants_node",
]

#: Blocks looked at before the binary search's landing point (about two
#: hours of blocks, the most a timestamp may run behind its successors').
LOOK_BACK: Final = 12
_RANGE = re.compile(r"^\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?$")


class ChainError(Exception):
    """The blocks asked for cannot be priced (yet). The message says why."""


class DayIncomplete(ChainError):
    """The day has not ended on chain, or its last block lacks confirmations."""


class NoBlocks(ChainError):
    """No block stands in the requested range or day."""


def parse_height_range(text: str) -> tuple[int, int]:
    """``"A..B"`` (inclusive) or ``"A"`` -> ``(A, B)``.

    Raises:
      ValueError: not that form, or B < A.
    """
    m = _RANGE.match(text)
    if not m:
        raise ValueError(f"--heights {text!r}: expected A..B, e.g. 818677..818680")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ValueError(f"--heights {text!r}: the range ends before it starts")
    return a, b


def parse_day(text: str) -> dt.date:
    """``"YYYY-MM-DD"`` -> a date.

    Raises:
      ValueError: not a valid ISO date.
    """
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--date {text!r}: expected YYYY-MM-DD") from None


def _midnight(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


@attrs.define(eq=False)
class HeaderCache:
    """Block hashes and header times by height, fetched once each."""

    rpc: RpcClient
    hashes: dict[int, str] = attrs.field(factory=dict)
    times: dict[int, int] = attrs.field(factory=dict)

    async def hash(self, height: int) -> str:
        if height not in self.hashes:
            self.hashes[height] = str(await self.rpc.call("getblockhash", height))
        return self.hashes[height]

    async def time(self, height: int) -> int:
        if height not in self.times:
            header = await self.rpc.call("getblockheader", await self.hash(height))
            self.times[height] = int(header["time"])
        return self.times[height]


async def _first_at_or_after(cache: HeaderCache, t: int, lo: int, end: int) -> int:
    """The run's boundary for time ``t`` in heights ``[lo, end)``; ``end`` if
    no block there is stamped at or after ``t``."""
    a, b = lo, end
    while a < b:
        mid = (a + b) // 2
        if await cache.time(mid) >= t:
            b = mid
        else:
            a = mid + 1
    if a == end:
        return end
    for h in range(max(lo, a - LOOK_BACK), a):
        if await cache.time(h) >= t:
            return h
    return a


async def day_heights(
    rpc: RpcClient,
    day: dt.date,
    *,
    confirmations: int = 6,
    cache: HeaderCache | None = None,
) -> range:
    """The heights of ``day``'s blocks (UTC), as the module describes.

    Raises:
      DayIncomplete: the chain has no block after the day yet, or the day's
        last block has fewer than ``confirmations`` blocks on top of it.
      NoBlocks: no block is stamped within the day (before the chain began).
      RpcError: from the node.
    """
    cache = cache or HeaderCache(rpc)
    tip = int(await rpc.call("getblockcount"))
    start_t = _midnight(day)
    end_t = _midnight(day + dt.timedelta(days=1))
    first = await _first_at_or_after(cache, start_t, 0, tip + 1)
    if first > tip:
        raise DayIncomplete(
            f"{day} has not started on chain yet: the node's tip {tip} is stamped "
            f"{_stamp(await cache.time(tip))}"
        )
    end = await _first_at_or_after(cache, end_t, first, tip + 1)
    if end > tip:
        raise DayIncomplete(
            f"{day} is not over on chain yet: no block after it (the node's tip "
            f"{tip} is stamped {_stamp(await cache.time(tip))}); try again once "
            f"the day has ended and its last block has {confirmations} "
            "confirmations"
        )
    if end == first:
        raise NoBlocks(f"no block is stamped on {day}")
    last = end - 1
    if tip - last < confirmations:
        raise DayIncomplete(
            f"{day} is not final yet: its last block {last} has "
            f"{tip - last} blocks on top, {confirmations} are needed; try again "
            f"after block {last + confirmations}"
        )
    return range(first, end)


async def height_range(rpc: RpcClient, first: int, last: int) -> range:
    """``first..last`` (inclusive), checked against the node's tip.

    Raises:
      NoBlocks: ``last`` is above the tip.
      RpcError: from the node.
    """
    tip = int(await rpc.call("getblockcount"))
    if last > tip:
        raise NoBlocks(f"block {last} is above the node's tip {tip}")
    return range(first, last + 1)


def _stamp(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def fetch_raw_blocks(
    rpc: RpcClient,
    heights: Sequence[int],
    *,
    concurrency: int = 8,
    cache: HeaderCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[int, bytes]]:
    """Fetch the raw blocks at ``heights``; return them in that order.

    At most ``concurrency`` blocks are in flight. ``progress(done, total)`` is
    called after each block. Each block's header and coinbase are checked
    here (its hash must be the one asked for); the rest is decoded by the
    caller, one block at a time, so a day of blocks costs its raw bytes
    (about 1.5 MB a block) rather than its decoded objects (about 6 MB).

    Raises:
      RpcError: from the node, including a block whose header does not decode
        or whose hash is not the one asked for (both mean a broken node or
        proxy). The first error cancels the other fetches.
    """
    cache = cache or HeaderCache(rpc)
    limiter = trio.CapacityLimiter(max(1, concurrency))
    out: dict[int, bytes] = {}

    async def one(height: int) -> None:
        async with limiter:
            block_hash = await cache.hash(height)
            raw = await rpc.raw_block(block_hash)
        try:
            header, _ = peek_block(raw)
        except DecodeError as exc:
            msg = f"block {height} from the node does not decode: {exc}"
            raise RpcError(msg) from None
        if header.hash_hex != block_hash:
            raise RpcError(f"the node returned another block for height {height}")
        out[height] = raw
        if progress is not None:
            progress(len(out), len(heights))

    try:
        async with trio.open_nursery() as nursery:
            for h in heights:
                nursery.start_soon(one, h)
    except BaseExceptionGroup as group:
        # Report the first node error as itself, not wrapped in a group.
        rpc_errors = group.subgroup(RpcError)
        if rpc_errors is not None and len(rpc_errors.exceptions) > 0:
            first = rpc_errors.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
    return [(h, out[h]) for h in heights]


def decode_in_order(
    raw_blocks: Sequence[tuple[int, bytes]],
) -> Iterator[tuple[int, Block]]:
    """Decode fetched blocks one at a time, in order.

    Raises:
      RpcError: a block from the node does not decode.
    """
    for height, raw in raw_blocks:
        try:
            yield height, parse_block(raw)
        except DecodeError as exc:
            msg = f"block {height} from the node does not decode: {exc}"
            raise RpcError(msg) from None


async def fetch_blocks(
    rpc: RpcClient,
    heights: Sequence[int],
    *,
    concurrency: int = 8,
    cache: HeaderCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[int, Block]]:
    """:func:`fetch_raw_blocks`, decoded: every block held at once.

    Raises:
      RpcError: as :func:`fetch_raw_blocks`, or a block that does not decode.
    """
    raw = await fetch_raw_blocks(
        rpc, heights, concurrency=concurrency, cache=cache, progress=progress
    )
    return list(decode_in_order(raw))


def progress_printer(stream: TextIO = sys.stderr) -> Callable[[int, int], None] | None:
    """A progress bar on ``stream`` if it is a terminal, else None."""
    if not stream.isatty():
        return None
    width = 30

    def show(done: int, total: int) -> None:
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if done == total else ""
        stream.write(f"\rfetching blocks [{bar}] {done}/{total}{end}")
        stream.flush()

    return show


# ---------------------------------------------------------------- CLI support


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fiatprint price`` flags that take blocks from a node over RPC.

    The RPC flags store under the settings' field names only when given, so
    :func:`oracle.config.load_settings` also reads them from
    ``FIATPRINT_*`` variables and ``FIATPRINT_CONFIG``.
    """
    group = parser.add_argument_group(
        "from a node over RPC",
        "Instead of files: blocks fetched from Bitcoin Core. Credentials come "
        "from --rpc-user/--rpc-password, <datadir>/bitcoin.conf or the cookie "
        "file (see docs/bitcoin-node.md).",
    )
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--heights", metavar="A..B", help="the blocks at heights A to B inclusive"
    )
    choice.add_argument(
        "--date",
        metavar="YYYY-MM-DD",
        help="the blocks of one UTC day (refused until its last block has six "
        "blocks on top)",
    )
    group.add_argument(
        "--concurrency",
        type=int,
        default=8,
        metavar="N",
        help="blocks fetched at once (default: 8)",
    )
    for name, metavar, text in (
        ("network", "NAME", "main, test, testnet4, signet or regtest"),
        ("rpc_url", "URL", "default http://127.0.0.1:<the network's port>"),
        ("rpc_user", "USER", "RPC user name"),
        ("rpc_password", "PASSWORD", "RPC password"),
        ("rpc_cookie", "FILE", "RPC cookie file"),
        ("datadir", "DIR", "the node's data directory (default ~/.bitcoin)"),
    ):
        group.add_argument(
            flag_name(name),
            dest=name,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=text,
        )


def wants_node(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for blocks from a node."""
    return bool(getattr(args, "heights", None) or getattr(args, "date", None))


async def node_report(
    rpc: RpcClient,
    *,
    network: str,
    heights: tuple[int, int] | None = None,
    day: dt.date | None = None,
    concurrency: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PriceReport:
    """The price report of a height range or a UTC day, fetched from ``rpc``.

    Exactly one of ``heights`` and ``day`` is given. The report is the one
    file mode makes for the same blocks (:func:`oracle.report.price_blocks`).

    Raises:
      ChainError: the range or day cannot be priced (yet).
      RpcError: the node is unreachable, refuses us, is on another network,
        or fails a call.
    """
    await rpc.check(network=network, allow_ibd=True)
    cache = HeaderCache(rpc)
    if day is not None:
        rng = await day_heights(rpc, day, cache=cache)
    elif heights is not None:
        rng = await height_range(rpc, *heights)
    else:
        raise ValueError("node_report needs heights or day")
    raw = await fetch_raw_blocks(
        rpc, list(rng), concurrency=concurrency, cache=cache, progress=progress
    )
    return price_blocks(decode_in_order(raw))


def report_from_args(args: argparse.Namespace) -> PriceReport:
    """Run :func:`node_report` for ``fiatprint price --heights/--date``.

    Raises:
      ValueError: bad ``--heights``/``--date``/``--concurrency`` or settings
        (``oracle.config.ConfigError`` is a ValueError).
      ChainError, RpcError: as :func:`node_report`.
    """
    heights = parse_height_range(args.heights) if args.heights else None
    day = parse_day(args.date) if args.date else None
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    settings = load_settings(args)
    rpc = RpcClient.from_settings(settings)
    return trio.run(
        functools.partial(
            node_report,
            rpc,
            network=settings.network,
            heights=heights,
            day=day,
            concurrency=args.concurrency,
            progress=progress_printer(),
        )
    )
