"""``fiatprint serve`` and ``fiatprint demo``.

``serve`` runs the service from the settings (TOML file, ``FIATPRINT_*``
environment, flags; see ``docs/configuration.md``), tells systemd when it is
ready and pings its watchdog while healthy.

``demo`` runs a replay publisher and the service in one process, on loopback
only, so the page can be tried without a node: real mainnet blocks (by
default the bundled block 818677) are announced the way Core announces them,
mempool transactions at ``--rate`` per second, then the block, over and over.

Replaying the same block again re-sends the same txids, and the window counts
a txid once while it is in the window. So the demo's window is shorter than
one replay pass (:data:`DEMO_WINDOW_FRACTION` of it): by the time a
transaction comes round again its previous copy has aged out and been
forgotten, and it counts as new. The price therefore keeps moving as the
window slides through the block, and stays close to that block's price.

The method needs a good part of a block before it settles (block 818677's
first few hundred outputs give half or double its price), and at 20
transactions a second one pass takes minutes. So the demo's window starts
as if one pass had already been replayed: :func:`prefill_window` puts the
previous pass's transactions in it with the arrival times they would have
had, and the page shows the block's price and a full cloud from the start.
Starting the replay fast instead would not do: copies that arrive close
together come round again while their predecessors are still in the window
and are counted once, and that clustering repeats on every pass.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Final

import trio
import zmq

from .config import LOG_LEVELS, ConfigError, Settings, load_settings
from .config import add_arguments as add_setting_arguments
from .decode import Block, DecodeError
from .history import HistoryError
from .logging import kv, setup_logging
from .notify import notify_ready, notify_status, notify_stopping, run_watchdog
from .replay import load_blocks, run_replay
from .service import ServiceInfo, run_service
from .window import Window

__all__ = [
    "DEFAULT_DEMO_BLOCKS",
    "DEMO_WINDOW_FRACTION",
    "add_arguments",
    "add_demo_arguments",
    "demo_window_seconds",
    "prefill_window",
    "run",
    "run_demo",
]

log = logging.getLogger(__name__)

_DATA: Final = Path(__file__).resolve().parent / "data" / "blocks"
#: The block the demo replays when given none: the one bundled with the package.
DEFAULT_DEMO_BLOCKS: Final = tuple(sorted(_DATA.glob("818677-*.bin")))
#: The demo's window, as a fraction of one replay pass.
DEMO_WINDOW_FRACTION: Final = 0.9
#: ZMQ send high-water mark of the demo's publisher: a block announcement is a
#: burst of thousands of messages, which the demo should not lose.
DEMO_HWM: Final = 100_000


# ---------------------------------------------------------------- serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fiatprint serve`` (``--config FILE`` and one per setting) or,
    for the parser of ``fiatprint demo``, those of the demo.

    Both subcommands live in this module; ``oracle.cli`` registers each with
    this function, and the parser's ``prog`` (``fiatprint demo``) tells them
    apart.
    """
    if parser.prog.split()[-1] == "demo":
        add_demo_arguments(parser)
        parser.set_defaults(_fiatprint_demo=True)
    else:
        add_setting_arguments(parser)


async def _serve(settings: Settings) -> None:
    async with trio.open_nursery() as nursery:
        info: ServiceInfo = await nursery.start(
            lambda task_status: run_service(settings, task_status=task_status)
        )
        for url in info.urls:
            print(f"fiatprint: serving {url}/", file=sys.stderr, flush=True)
        notify_ready(f"serving {info.url}")
        await nursery.start(
            lambda task_status: run_watchdog(
                info.service.healthy, task_status=task_status
            )
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(kv("service_stopping", signal=signal.Signals(signum).name))
                notify_stopping()
                nursery.cancel_scope.cancel()
                break


_STARTUP_ERRORS: Final = (OSError, HistoryError, zmq.ZMQError, DecodeError, ValueError)


def _startup_error(exc: BaseException) -> BaseException | None:
    """The first start-up failure inside ``exc`` (which trio may have wrapped in
    exception groups), or None when it holds something else."""
    if isinstance(exc, _STARTUP_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


def _explain(exc: BaseException, host: str, port: int) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {host}:{port}: the address is in use (another "
            "service, or another Fiatprint, holds it; choose another with --port)"
        )
    return str(exc)


def run(args: argparse.Namespace) -> int:
    """Run ``fiatprint serve`` (or ``demo``); returns the exit status.

    Exit 2 for bad settings (each problem printed), 1 when the service cannot
    start (address in use, unreadable history file), 0 after SIGTERM/SIGINT.
    """
    if getattr(args, "_fiatprint_demo", False):
        return run_demo_command(args)
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"fiatprint serve: {problem}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        trio.run(_serve, settings)
    except BaseException as exc:  # noqa: B036 - re-raised unless a start-up error
        found = _startup_error(exc)
        if found is None:
            raise
        message = _explain(found, settings.host, settings.port)
        notify_status(f"failed: {message}")
        print(f"fiatprint serve: {message}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fiatprint demo``."""
    parser.epilog = (
        "Runs a replay publisher and the service in one process, on loopback "
        "only, and prints the page address. The blocks are announced as Core "
        "announces them (each transaction into the mempool at --rate, then "
        "the block), over and over. A repeated txid counts once while it is "
        "in the window, so the demo's window is 0.9 of one replay pass: when "
        "a transaction comes round again its previous copy has aged out, and "
        "the price keeps moving. The window starts as if one pass had already "
        "been replayed, so the price and the cloud are there from the start."
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address")
    parser.add_argument(
        "--port", type=int, default=8080, help="HTTP port (0: any free port)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="mempool transactions per second (default 20)",
    )
    parser.add_argument(
        "--blocks",
        nargs="+",
        type=Path,
        default=list(DEFAULT_DEMO_BLOCKS),
        metavar="FILE",
        help="raw block files to replay in a loop (default: the bundled block 818677)",
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=None,
        help=f"window length (default: {DEMO_WINDOW_FRACTION:g} of one replay "
        "pass, so a transaction's previous copy has aged out when it comes "
        "round again and the price keeps moving)",
    )
    parser.add_argument("--log-level", default="INFO")


def prefill_window(window: Window, blocks: list[Block], rate: float, now: float) -> int:
    """Put the previous replay pass of ``blocks`` in ``window``, as it would
    stand at ``now`` had the replay been running for one pass at ``rate``.

    Each block's transactions get the arrival times they would have had
    (one every ``1 / rate`` seconds, ending at ``now``), those older than
    the window are left out, and each block is connected after its
    transactions, as the replay does (so they show as confirmed). Returns
    how many transactions were put in.
    """
    duration = sum(b.tx_count - 1 for b in blocks) / rate
    cutoff = now - window.span
    t = now - duration
    added = 0
    for block in blocks:
        for tx in block.txs[1:]:
            t += 1.0 / rate
            if t >= cutoff:
                added += window.offer(tx, t)[0]
        added += window.offer(block.txs[0], t)[0]
        window.connect(block.header.hash, t)
    return added


def demo_window_seconds(transactions: int, rate: float) -> float:
    """The demo's window for a pass of ``transactions`` mempool transactions
    at ``rate`` per second: :data:`DEMO_WINDOW_FRACTION` of the pass."""
    return max(1.0, DEMO_WINDOW_FRACTION * transactions / rate)


async def run_demo(
    blocks: list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    rate: float = 20.0,
    window_seconds: float | None = None,
    task_status: trio.TaskStatus[ServiceInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Replay ``blocks`` in a loop into a service; run until cancelled.

    ``task_status.started`` receives the service's :class:`ServiceInfo` once
    it listens. The publisher and the service talk over ZMQ on 127.0.0.1
    ephemeral ports.

    Raises:
      ValueError: ``rate`` is not positive.
      OSError, oracle.decode.DecodeError: a block file cannot be read.
    """
    if not rate > 0:
        raise ValueError("--rate must be positive")
    loaded = load_blocks(blocks)
    mempool_txs = sum(b.block.tx_count - 1 for b in loaded)
    window = window_seconds or demo_window_seconds(mempool_txs, rate)
    state = Window(window)
    prefilled = prefill_window(state, [b.block for b in loaded], rate, time.time())
    ep = "tcp://127.0.0.1:0"
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: run_replay(
                [b.block for b in loaded],
                endpoints={"rawtx": ep, "sequence": ep},
                rate=rate,
                loop=True,
                hwm=DEMO_HWM,
                wait_for_subscriber=True,
                task_status=task_status,
            )
        )
        settings = Settings(
            zmq_rawtx=bound["rawtx"],
            zmq_sequence=bound["sequence"],
            host=host,
            port=port,
            window_seconds=window,
        )
        log.info(
            kv(
                "demo_started",
                blocks=len(loaded),
                transactions=mempool_txs,
                rate=rate,
                window_seconds=round(window, 1),
                prefilled=prefilled,
            )
        )
        info = await nursery.start(
            lambda task_status: run_service(
                settings, window=state, task_status=task_status
            )
        )
        task_status.started(info)


def _demo_usage_problem(args: argparse.Namespace) -> str | None:
    if not (math.isfinite(args.rate) and args.rate > 0):
        return (
            "--rate must be a positive number of transactions a second, "
            f"not {args.rate}"
        )
    if args.window_seconds is not None and not (
        math.isfinite(args.window_seconds) and args.window_seconds >= 1.0
    ):
        return f"--window-seconds must be at least 1, not {args.window_seconds}"
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} is not a port"
    if args.log_level.upper() not in LOG_LEVELS:
        return f"--log-level must be one of {', '.join(LOG_LEVELS)}"
    return None


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``fiatprint demo``; returns the exit status.

    2 for bad flags, 1 when the demo cannot start (port in use, unreadable
    block file), 0 after SIGINT.
    """
    problem = _demo_usage_problem(args)
    if problem is not None:
        print(f"fiatprint demo: {problem}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info: ServiceInfo = await nursery.start(
                lambda task_status: run_demo(
                    args.blocks,
                    host=args.host,
                    port=args.port,
                    rate=args.rate,
                    window_seconds=args.window_seconds,
                    task_status=task_status,
                )
            )
            print(f"Fiatprint demo: open {info.url}/", flush=True)

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: B036 - re-raised unless a start-up error
        found = _startup_error(exc)
        if found is None:
            raise
        print(
            f"fiatprint demo: {_explain(found, args.host, args.port)}", file=sys.stderr
        )
        return 1
    return 0
