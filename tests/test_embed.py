"""``docs/examples/embed.py`` runs as documented, against a real replay.

The example is started as its own process (a user's program), the replay
publisher runs here on a 127.0.0.1 ephemeral port, and the example's printed
estimate for block 702861 must be the method's answer, exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from oracle.replay import run_replay

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "embed.py"
(BLOCK_702861,) = (ROOT / "tests" / "data" / "blocks").glob("702861-*.bin")


async def test_embed_example_prints_the_exact_estimate_of_a_replayed_block() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ep = "tcp://127.0.0.1:0"
            bound = await nursery.start(
                lambda task_status: run_replay(
                    [BLOCK_702861],
                    endpoints={"rawtx": ep, "sequence": ep},
                    rate=None,
                    loop=False,
                    hwm=0,  # unlimited: the test is not about ZMQ's drops
                    wait_for_subscriber=True,
                    # run_replay closes its sockets with linger 0 when it
                    # returns, dropping what is still queued; stay open.
                    block_pause=3600.0,
                    task_status=task_status,
                )
            )
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    str(EXAMPLE),
                    "--rawtx",
                    bound["rawtx"],
                    "--sequence",
                    bound["sequence"],
                ],
                cwd=str(ROOT),
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                stdout=subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                buf = b""
                with trio.move_on_after(50):
                    while not any("confirmed=3315" in line for line in lines):
                        chunk = await proc.stdout.receive_some(65536)
                        assert chunk, f"example ended early: {lines}"
                        buf += chunk
                        *done, buf = buf.split(b"\n")
                        lines.extend(d.decode() for d in done)
                assert any("confirmed=3315" in line for line in lines), lines[-5:]
            finally:
                proc.terminate()
                await proc.wait()
                nursery.cancel_scope.cancel()
    eps = {"rawtx": bound["rawtx"], "sequence": bound["sequence"]}
    assert lines[0] == f"subscribed {eps}"
    final = next(line for line in lines if "confirmed=3315" in line)
    assert final == (
        "estimate price=42951.63645734903 rough=42880 outputs=3315 "
        "confirmed=3315 mempool=0 points=2965"
    )
