"""Embed Fiatprint's live pipeline in your own trio program, without the web.

Runs the intake (ZMQ from a Bitcoin Core node), the decoder and the window
actors, and prints every estimate the window makes, one line each::

    python docs/examples/embed.py --rawtx tcp://127.0.0.1:28332 \\
        --sequence tcp://127.0.0.1:28333

Try it without a node: ``fiatprint replay --blocks oracle/data/blocks/*.bin``
publishes a real block on the default endpoints. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools

import trio

from oracle.config import Settings
from oracle.events import EstimateUpdate, FeedMessage, Update, WindowEvent
from oracle.intake import run_intake
from oracle.pipeline import run_decoder
from oracle.window import run_window


def describe(update: EstimateUpdate) -> str:
    """One line per estimate; ``repr`` keeps the float exact."""
    est = update.estimate
    price = "none" if est.price is None else repr(est.price)
    return (
        f"estimate price={price} rough={est.rough_price} "
        f"outputs={update.window_outputs} confirmed={update.confirmed_outputs} "
        f"mempool={update.mempool_outputs} points={est.point_count}"
        + (f" reason={est.reason!r}" if est.reason else "")
    )


async def main(settings: Settings) -> None:
    # Each channel is bounded. intake -> decoder and decoder -> window block
    # their sender when full (back-pressure down to ZMQ, whose counters then
    # reveal any loss); the window never waits on its output, so this program
    # must keep reading updates (it drops what does not fit).
    feed_send, feed_recv = trio.open_memory_channel[FeedMessage](8192)
    events_send, events_recv = trio.open_memory_channel[WindowEvent](2048)
    updates_send, updates_recv = trio.open_memory_channel[Update](512)
    async with trio.open_nursery() as nursery:
        # Start downstream first, so that nothing waits on an actor that is
        # not running yet; each reports readiness through nursery.start.
        await nursery.start(
            functools.partial(run_window, events_recv, updates_send, settings=settings)
        )
        await nursery.start(run_decoder, feed_recv, events_send)
        endpoints = await nursery.start(run_intake, settings, feed_send)
        print(f"subscribed {endpoints}", flush=True)
        async for update in updates_recv:
            if isinstance(update, EstimateUpdate):
                print(describe(update), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rawtx", default="tcp://127.0.0.1:28332")
    parser.add_argument("--sequence", default="tcp://127.0.0.1:28333")
    parser.add_argument("--window-seconds", type=float, default=3 * 3600.0)
    args = parser.parse_args()
    try:
        trio.run(
            main,
            Settings(
                zmq_rawtx=args.rawtx,
                zmq_sequence=args.sequence,
                window_seconds=args.window_seconds,
            ),
        )
    except KeyboardInterrupt:
        pass
