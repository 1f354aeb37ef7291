"""A writer killed with SIGKILL mid-writes leaves a sound history.

A subprocess appends rows as fast as it can and prints each row's id after
the commit returns; the test kills it with SIGKILL while it is writing, then
checks that the file passes ``PRAGMA integrity_check`` and holds every row
whose id was printed (at most the one being written when the kill landed is
missing: the rows are 1..n with n the last printed id or one more). Three
rounds on the same file, each resuming after the previous kill.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from oracle.history import History

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys
from pathlib import Path
from oracle.history import History, HistoryRow

h = History(Path(sys.argv[1]))
i = h.count_sync()
while True:
    i += 1
    row = HistoryRow(
        time=1_700_000_000.0 + i, price=42951.63645734903, rough_price=42880,
        spread=None, outputs=i, window_outputs=i, confirmed_outputs=i,
        mempool_outputs=0, height=None, block_hash=None, kind="timed",
    )
    rowid = h.append_sync(row)
    sys.stdout.write(f"{rowid}\\n")
    sys.stdout.flush()
"""


async def _write_then_kill(path: Path, lines_before_kill: int) -> list[int]:
    """Run the writer until it has printed ``lines_before_kill`` ids, SIGKILL
    it, and return every id it printed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    buf = b""
    try:
        while buf.count(b"\n") < lines_before_kill:
            chunk = await proc.stdout.receive_some(65536)
            assert chunk, "writer exited early"
            buf += chunk
        proc.send_signal(signal.SIGKILL)
        # whatever it printed before dying is committed too
        while chunk := await proc.stdout.receive_some(65536):
            buf += chunk
    finally:
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()
    assert proc.returncode == -signal.SIGKILL
    return [int(x) for x in buf.split(b"\n") if x]


async def test_sigkill_mid_writes_loses_at_most_the_last_row(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    printed_total: list[int] = []
    with trio.fail_after(120):
        for round_, kill_after in enumerate((150, 40, 300)):
            printed = await _write_then_kill(path, kill_after)
            assert len(printed) >= kill_after
            printed_total += printed

            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            ids = [r[0] for r in conn.execute("SELECT id FROM estimates ORDER BY id")]
            conn.close()

            last = printed_total[-1]
            assert set(printed_total) <= set(ids), f"round {round_}: lost rows"
            assert ids in (list(range(1, last + 1)), list(range(1, last + 2)))
            # the next round resumes after what is stored, even an unprinted row
            printed_total = ids

    with History(path) as h:
        rows = h.query_sync(limit=10_000)
        assert [r.outputs for r in rows] == list(range(1, len(rows) + 1))
        assert {r.price for r in rows} == {42951.63645734903}
