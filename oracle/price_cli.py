"""``fiatprint price``: the price of a window of blocks, or of a vector file.

Exit status: 0 with a price, 3 when there is not enough data, 2 for bad usage
or malformed input (with a one-line message naming the file and the problem).

With ``--heights A..B`` or ``--date YYYY-MM-DD`` the blocks come from a node
over RPC (:mod:`oracle.chain`) and print exactly as the same blocks read from
files would. A node that cannot answer (down, wrong credentials, another
network) exits 2 with a message naming the fix; a day that is not complete
yet, or a range above the tip, exits 3.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import attrs

from . import chain
from .chart import write_chart
from .cli import EXIT_NO_DATA, EXIT_OK, EXIT_USAGE
from .decode import (
    MAX_BLOCK_BYTES,
    Block,
    BlockHeader,
    DecodeError,
    parse_block,
    peek_block,
)
from .report import PriceReport, price_blocks, price_vector
from .rpc import RpcError

__all__ = ["add_arguments", "blocks_report", "run"]

_HEIGHT_IN_NAME = re.compile(r"^(\d+)-[0-9a-f]{64}\.bin$")


class UsageError(Exception):
    """Bad input or usage; the message is one line naming the file and problem."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="raw block files (consensus serialisation), read as one window",
    )
    parser.add_argument(
        "--vector",
        metavar="FILE",
        help="a JSON vector of filtered outputs (filtered_outputs, block_heights, "
        "block_times) instead of block files",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a line"
    )
    parser.add_argument(
        "--chart",
        metavar="FILE.html",
        help="also write a self-contained page plotting every price point",
    )
    chain.add_node_arguments(parser)


def _read(path: Path) -> bytes:
    """The file's bytes, reading at most one byte more than a block can hold."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BLOCK_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_BLOCK_BYTES:
        raise UsageError(
            f"{path}: not a valid block: larger than {MAX_BLOCK_BYTES:,} bytes, "
            "the most a block can be"
        )
    return data


def _height(path: Path, header: BlockHeader, bip34: int | None) -> int | None:
    """BIP34 height, or before BIP34 (height 227931, where the coinbase holds
    no height) the one in a file named ``<height>-<hash>.bin`` whose hash
    matches the header."""
    named = _HEIGHT_IN_NAME.match(path.name)
    if named and (bip34 is None or bip34 != int(named.group(1))):
        if path.name[len(named.group(1)) + 1 : -4] == header.hash_hex:
            return int(named.group(1))
    return bip34


def _decode(path: Path, data: bytes) -> tuple[int | None, Block]:
    """Decode one block file's bytes; its height from BIP34 or the name.

    Raises:
      UsageError: a malformed block, naming the file.
    """
    try:
        block = parse_block(data)
    except DecodeError as exc:
        raise UsageError(f"{path}: not a valid block: {exc}") from exc
    return _height(path, block.header, block.bip34_height), block


@attrs.frozen
class _BlockFile:
    path: Path
    data: bytes
    height: int | None
    header: BlockHeader


def _peek(path: Path) -> _BlockFile:
    data = _read(path)
    try:
        header, bip34 = peek_block(data)
    except DecodeError as exc:
        raise UsageError(f"{path}: not a valid block: {exc}") from exc
    return _BlockFile(path, data, _height(path, header, bip34), header)


def _load_vector(path: Path) -> PriceReport:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not JSON: {exc}") from exc
    except RecursionError:
        raise UsageError(f"{path}: not a vector: JSON nested too deeply") from None
    if not isinstance(doc, dict) or "filtered_outputs" not in doc:
        raise UsageError(f"{path}: no 'filtered_outputs' list in the vector")
    amounts = doc["filtered_outputs"]
    heights = doc.get("block_heights", [-1] * len(amounts))
    times = doc.get("block_times", [0] * len(amounts))
    if not isinstance(amounts, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in amounts
    ):
        raise UsageError(f"{path}: 'filtered_outputs' is not a list of numbers")
    for name, values in (("block_heights", heights), ("block_times", times)):
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise UsageError(f"{path}: '{name}' is not a list of whole numbers")
    try:
        return price_vector(amounts, heights, times)
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"{path}: {exc}") from exc


def blocks_report(paths: list[Path]) -> PriceReport:
    """Price block files as one window in height order (a block of unknown
    height sorts first, by time).

    Each file is read once (so pipes work) and kept as raw bytes; only one
    block is held decoded at a time.

    Raises:
      UsageError: a file cannot be read, is not a block, or holds a block
        that another file already gave.
    """
    files = [_peek(p) for p in paths]
    seen: dict[bytes, Path] = {}
    for f in files:
        if f.header.hash in seen:
            raise UsageError(
                f"{f.path}: block {f.header.hash_hex} was already given as "
                f"{seen[f.header.hash]}; a window holds each block once"
            )
        seen[f.header.hash] = f.path
    files.sort(key=lambda f: (-1 if f.height is None else f.height, f.header.time))
    return price_blocks(_decode(f.path, f.data) for f in files)


def emit(report: PriceReport, args: argparse.Namespace) -> int:
    """Print the report as the flags ask; write the chart; return the status."""
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        print(report.human())
    if args.chart:
        try:
            write_chart(report, Path(args.chart))
        except OSError as exc:
            print(
                f"fiatprint price: {args.chart}: cannot write chart: {exc}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    return EXIT_OK if report.ok else EXIT_NO_DATA


def run(args: argparse.Namespace) -> int:
    try:
        if args.vector:
            if args.files:
                raise UsageError("give either block files or --vector, not both")
            if chain.wants_node(args):
                raise UsageError("give either --vector or --heights/--date")
            report = _load_vector(Path(args.vector))
        elif chain.wants_node(args):
            if args.files:
                raise UsageError("give either block files or --heights/--date")
            report = chain.report_from_args(args)
        elif args.files:
            report = blocks_report([Path(f) for f in args.files])
        else:
            raise UsageError("nothing to price: give block files or --vector FILE")
    except (UsageError, ValueError, RpcError) as exc:
        # ValueError: bad --heights/--date or settings (ConfigError);
        # RpcError: the node could not answer (the message names the fix).
        print(f"fiatprint price: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except chain.ChainError as exc:
        print(f"fiatprint price: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    return emit(report, args)
