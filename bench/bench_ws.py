"""WebSocket fan-out benchmark: shared frames vs naive per-client JSON.

Usage::

    python bench/bench_ws.py                      # 100, 500, 1000 clients
    python bench/bench_ws.py --clients 100 --seconds 5

For each fan-out and client count, three processes on 127.0.0.1:

* the server: the real web app (``oracle.app``) under hypercorn, fed by a
  driver that publishes one estimate a second and points for 20 tx/s (one
  ``PointsBatch`` per transaction, the implied-price points of real outputs
  from ``tests/data/blocks``), then a 4,000-transaction block burst: a block
  event, then the confirmed points of every output of blocks 702861 and
  818677 (4,711 points from about 5,000 transactions, more than a
  4,000-transaction block yields) in batches of 2,000 as the window actor
  sends them, then an estimate; the burst time is from the burst's start to
  the last client receiving that estimate;
* the clients: N trio-websocket connections in one process, recording for
  every ``estimate`` and ``points`` frame the delay from the server's publish
  time (carried in the frame) to its arrival;
* this orchestrator, which starts both, reads the server's CPU time from
  ``/proc`` over the steady phase and prints a table.

Fan-outs compared:

``shared``
    :class:`oracle.fanout.FanOut` as the service runs it (updates through a
    channel into ``FanOut.run``): each update serialised once, every client's
    bounded queue holds references to the same string, points coalesced into
    one frame per 0.25 s.
``shared-nc``
    the same without coalescing (one ``points`` frame per transaction), to
    show what coalescing and what sharing each contribute.
``naive``
    :class:`NaiveFanOut` below: each client has an unbounded queue of update
    objects and serialises every update itself with ``json.dumps``, which is
    what a straightforward implementation does.

Latency includes the client process's own delay: all N clients share one
Python process and the machine's cores with the server, so at 1,000 clients
much of the p99 is the client side queueing. The comparison between the two
fan-outs in the same run is the meaningful figure.

Measured on the 2-CPU development machine (``python bench/bench_ws.py``,
2026-12-04); latencies in ms, CPU in % of one core over the steady phase,
burst = time for the 4,711-point burst to reach the last client::

    fan-out   clients  est p50  est p99  pts p50  pts p99  srv CPU   burst   gaps
    shared        100     22.0     32.5    216.8    263.8      5.7    363.9      0
    shared-nc     100     19.3     27.4     11.4     34.6     18.8    364.2      0
    naive         100     20.8     33.5     11.1     38.4     18.2   1029.4      0
    shared        500     87.2    226.7    236.0    418.2     34.1   2159.6      0
    shared-nc     500     69.4    187.2     37.4    143.6     83.7   1956.3      0
    naive         500     75.0    140.2     37.6    135.5     85.5   4621.1      0
    shared       1000    220.0    361.2    280.2    504.5     57.9   4713.3      0
    shared-nc    1000   1385.0   1465.4   3871.5   7278.0     99.7  10508.8  23000
    naive        1000   5697.2  12029.1   5468.5  12435.9     99.7  20839.7      0

(``pts`` latency of the coalesced fan-out includes up to 0.25 s of waiting
for the batch, by design.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oracle.app import create_app, serve_http  # noqa: E402
from oracle.config import Settings  # noqa: E402
from oracle.decode import parse_block  # noqa: E402
from oracle.estimate import estimate  # noqa: E402
from oracle.events import (  # noqa: E402
    BlockEvent,
    EstimateUpdate,
    Point,
    PointsBatch,
    StatusChange,
    Update,
)
from oracle.fanout import FanOut, FanOutStatistics, estimate_fields  # noqa: E402
from oracle.filter import TxFilter  # noqa: E402

BLOCKS = ROOT / "tests" / "data" / "blocks"
BLOCK_FILES = (
    "702861-000000000000000000000c835b2adcaedc20fdf6ee440009c249452c726dafae.bin",
    "818677-000000000000000000020750f322f4e72e99c2f0b9738fb4f46607860bd18c13.bin",
)
TX_PER_SECOND = 20
BURST_TX = 4000
BATCH = 2000
#: ``mempool_outputs`` values marking the driver's special estimates.
BURST_MARK = 424242
STOP_MARK = 434343


# ---------------------------------------------------------------- real data


def real_data() -> tuple[Any, list[tuple[Point, ...]]]:
    """The 702861 estimate and, per transaction that gave points, its points
    (blocks 702861 then 818677)."""
    per_tx: list[tuple[Point, ...]] = []
    first_estimate = None
    for name in BLOCK_FILES:
        block = parse_block((BLOCKS / name).read_bytes())
        flt = TxFilter()
        amounts: list[float] = []
        owners: list[tuple[int, str, int]] = []
        for n, tx in enumerate(block.txs):
            for _vout, sats in flt.offer(tx) or ():
                amounts.append(sats / 1e8)
                owners.append((n, tx.txid_hex, sats))
        est = estimate(amounts)
        if first_estimate is None:
            first_estimate = est
        grouped: dict[int, list[Point]] = collections.defaultdict(list)
        for price, i in zip(est.points, est.point_output, strict=True):
            n, txid, sats = owners[int(i)]
            grouped[n].append(Point(float(price), sats, 0.0, txid, False))
        per_tx.extend(tuple(v) for _, v in sorted(grouped.items()))
    return first_estimate, per_tx


# ---------------------------------------------------------------- naive fan-out


def _row(p: Point) -> list[Any]:
    return [p.price, p.sats, p.time, p.txid, p.confirmed]


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


@attrs.define(eq=False)
class NaiveSubscription:
    fanout: NaiveFanOut
    queue: collections.deque[Update] = attrs.field(factory=collections.deque)
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    snapshot_sent: bool = False

    async def receive(self) -> str:
        while True:
            if not self.snapshot_sent:
                self.snapshot_sent = True
                return _dumps(self.fanout.snapshot())
            if self.queue:
                return _dumps(self.fanout.frame(self.queue.popleft()))
            if self.wakeup.is_set():
                self.wakeup = trio.Event()
            await self.wakeup.wait()


@attrs.define(eq=False)
class NaiveFanOut:
    """Per-client serialisation, unbounded per-client queues."""

    subs: set[NaiveSubscription] = attrs.field(factory=set)
    seq: int = 0
    latest_estimate: dict[str, Any] | None = None
    points: collections.deque[Point] = attrs.field(
        factory=lambda: collections.deque(maxlen=20_000)
    )
    status: dict[str, Any] = attrs.field(factory=dict)

    def frame(self, u: Update) -> dict[str, Any]:
        if isinstance(u, EstimateUpdate):
            return {"v": 1, "type": "estimate", **estimate_fields(u)}
        if isinstance(u, PointsBatch):
            return {
                "v": 1,
                "type": "points",
                "points": [
                    [p.price, p.sats, p.time, p.txid, p.confirmed] for p in u.points
                ],
            }
        if isinstance(u, BlockEvent):
            return {"v": 1, "type": "block", **attrs.asdict(u)}
        assert isinstance(u, StatusChange)
        return {"v": 1, "type": "status", **attrs.asdict(u)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "v": 1,
            "type": "snapshot",
            "estimate": self.latest_estimate,
            "points": [
                [p.price, p.sats, p.time, p.txid, p.confirmed] for p in self.points
            ],
            "blocks": [],
            "status": self.status,
        }

    def publish(self, u: Update) -> None:
        self.seq += 1
        if isinstance(u, EstimateUpdate):
            self.latest_estimate = estimate_fields(u)
        elif isinstance(u, PointsBatch):
            self.points.extend(u.points)
        for s in self.subs:
            s.queue.append(u)
            s.wakeup.set()

    @contextmanager
    def subscribe(self) -> Any:
        sub = NaiveSubscription(self)
        self.subs.add(sub)
        try:
            yield sub
        finally:
            self.subs.discard(sub)

    def statistics(self) -> FanOutStatistics:
        pend = [len(s.queue) for s in self.subs]
        return FanOutStatistics(
            len(self.subs), self.seq, self.seq, max(pend, default=0), sum(pend),
            0, 0, 0, len(self.points), 0,
        )  # fmt: skip


# ---------------------------------------------------------------- server


def stamped(est: Any, t: float, mark: int = 0) -> EstimateUpdate:
    return EstimateUpdate(est, t, est.outputs, est.outputs, mark)


async def server_main(mode: str, seconds: float) -> None:
    est, per_tx = real_data()
    if mode == "shared":
        fan: Any = FanOut()
    elif mode == "shared-nc":
        fan = FanOut(points_interval=0.0)
    else:
        fan = NaiveFanOut()
    now = time.time()
    preload = [
        attrs.evolve(p, time=now, confirmed=True) for tx in per_tx[:1500] for p in tx
    ]
    fan.publish(StatusChange("zmq", "ok", "bench", now))
    fan.publish(PointsBatch(tuple(preload)))
    fan.publish(stamped(est, now))
    settings = Settings(host="127.0.0.1", port=0)
    app = create_app(fan, settings=settings, health=lambda: {"status": "ok"})
    async with trio.open_nursery() as nursery:
        publish = fan.publish
        if isinstance(fan, FanOut):
            # As the service runs it: updates through a channel into run().
            send, recv = trio.open_memory_channel[Update](4096)
            await nursery.start(fan.run, recv)
            publish = send.send_nowait
        urls = await nursery.start(serve_http, app, settings)
        print("URL", urls[0], flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        await stdin.receive_some(100)  # "go"
        start = trio.current_time()
        tick = 0
        i = 0
        while trio.current_time() - start < seconds:
            await trio.sleep_until(start + tick / TX_PER_SECOND)
            t = time.time()
            tx = per_tx[i % len(per_tx)]
            publish(PointsBatch(tuple(attrs.evolve(p, time=t) for p in tx)))
            i += 1
            if tick % TX_PER_SECOND == 0:
                publish(stamped(est, t))
            tick += 1
        print("STEADY_DONE", flush=True)
        await stdin.receive_some(100)  # "burst"
        t = time.time()
        burst = [
            attrs.evolve(p, time=t, confirmed=True)
            for tx in per_tx[:BURST_TX]
            for p in tx
        ]
        publish(BlockEvent("00" * 32, 1, t, "connected", BURST_TX))
        for k in range(0, len(burst), BATCH):
            publish(PointsBatch(tuple(burst[k : k + BATCH])))
        publish(stamped(est, t, BURST_MARK))
        print("BURST_POINTS", len(burst), flush=True)
        await stdin.receive_some(100)  # "stop"
        publish(stamped(est, time.time(), STOP_MARK))
        # Let every client drain its backlog (the naive fan-out's can be long).
        with trio.move_on_after(300):
            while fan.statistics().pending_total:
                await trio.sleep(0.1)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- clients


async def clients_main(url: str, n: int) -> None:
    from trio_websocket import (
        ConnectionClosed,
        ConnectionTimeout,
        HandshakeError,
        open_websocket_url,
    )

    ws_url = "ws" + url[4:] + "/ws"
    est_lat: list[float] = []
    pts_lat: list[float] = []
    burst_done: list[float] = []
    burst_start: list[float] = []
    ready = 0
    all_ready = trio.Event()
    done = 0
    lost = 0
    gaps = 0
    all_done = trio.Event()

    async def one() -> None:
        nonlocal ready, done, lost
        try:
            await receive_all()
        except (ConnectionClosed, ConnectionTimeout, HandshakeError, OSError):
            lost += 1
        done += 1
        if done == n:
            all_done.set()

    async def receive_all() -> None:
        nonlocal ready, gaps
        async with open_websocket_url(
            ws_url, max_message_size=2**26, connect_timeout=600
        ) as ws:
            await ws.get_message()  # snapshot
            got_burst = False
            ready += 1
            if ready == n:
                all_ready.set()
            while True:
                text = await ws.get_message()
                now = time.time()
                head = text[:40]
                if '"type":"estimate"' in head:
                    msg = json.loads(text)
                    mark = msg["mempool_outputs"]
                    if mark == STOP_MARK:
                        break
                    if mark == BURST_MARK and not got_burst:
                        got_burst = True
                        burst_done.append(now)
                        burst_start.append(msg["updated"])
                    else:
                        est_lat.append(now - msg["updated"])
                elif '"type":"snapshot"' in head or '"type":"gap"' in head:
                    # Skipped ahead: the snapshot holds the newest estimate.
                    msg = json.loads(text)
                    if msg["type"] == "gap":
                        gaps += 1
                        continue
                    mark = (msg["estimate"] or {}).get("mempool_outputs")
                    if mark == STOP_MARK:
                        break
                    if mark == BURST_MARK and not got_burst:
                        got_burst = True
                        burst_done.append(now)
                        burst_start.append(msg["estimate"]["updated"])
                elif '"type":"points"' in head:
                    # Only the first point is parsed: decoding whole batches
                    # here would make the client process the bottleneck.
                    start = text.index('"points":[[') + 10
                    first = json.loads(text[start : text.index("]", start) + 1])
                    if not first[4]:
                        pts_lat.append(now - first[2])

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
            await trio.sleep(0.002)
        await all_ready.wait()
        print("READY", flush=True)
        await all_done.wait()
    absorb = max(burst_done) - burst_start[0] if burst_done else float("nan")
    print(
        "RESULT",
        json.dumps(
            {
                "estimate": est_lat,
                "points": pts_lat,
                "burst_absorb": absorb,
                "burst_clients": len(burst_done),
                "lost": lost,
                "gaps": gaps,
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- orchestrator


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended before {prefix}")
        if line.startswith(prefix):
            return line


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_one(mode: str, n: int, seconds: float) -> dict[str, Any]:
    me = [sys.executable, __file__]
    server = subprocess.Popen(
        [*me, "server", "--mode", mode, "--seconds", str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = read_line(server, "URL").split()[1]
        clients = subprocess.Popen(
            [*me, "clients", "--url", url, "--n", str(n)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            read_line(clients, "READY")
            assert server.stdin is not None
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            server.stdin.write("go\n")
            server.stdin.flush()
            read_line(server, "STEADY_DONE")
            cpu1, t1 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(1.0)
            server.stdin.write("burst\n")
            server.stdin.flush()
            burst_points = int(read_line(server, "BURST_POINTS").split()[1])
            time.sleep(max(3.0, n / 100))
            server.stdin.write("stop\n")
            server.stdin.flush()
            result = json.loads(read_line(clients, "RESULT").split(" ", 1)[1])
            clients.wait(timeout=60)
        finally:
            if clients.poll() is None:
                clients.kill()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    return {
        "mode": mode,
        "clients": n,
        "est_p50": pct(result["estimate"], 0.5) * 1000,
        "est_p99": pct(result["estimate"], 0.99) * 1000,
        "pts_p50": pct(result["points"], 0.5) * 1000,
        "pts_p99": pct(result["points"], 0.99) * 1000,
        "frames": len(result["estimate"]) + len(result["points"]),
        "cpu": 100 * (cpu1 - cpu0) / (t1 - t0),
        "burst": result["burst_absorb"] * 1000,
        "burst_clients": result["burst_clients"],
        "burst_points": burst_points,
        "lost": result["lost"],
        "gaps": result["gaps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("--clients", default="100,500,1000")
    parser.add_argument("--modes", default="shared,shared-nc,naive")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mode", default="shared")
    parser.add_argument("--url")
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.role == "server":
        trio.run(server_main, args.mode, args.seconds)
        return
    if args.role == "clients":
        trio.run(clients_main, args.url, args.n)
        return
    rows = []
    print(
        f"steady {args.seconds:g} s at 1 estimate/s + {TX_PER_SECOND} tx/s of points;"
        f" burst of {BURST_TX} tx; {os.cpu_count()} CPUs",
        flush=True,
    )
    header = (
        f"{'fan-out':9} {'clients':>7} {'est p50':>8} {'est p99':>8} {'pts p50':>8}"
        f" {'pts p99':>8} {'srv CPU':>8} {'burst':>9} {'gaps':>6}"
    )
    print(header)
    print(" " * 18 + "(ms)     (ms)     (ms)     (ms)     (%)      (ms)")
    for n in (int(x) for x in args.clients.split(",")):
        for mode in args.modes.split(","):
            r = run_one(mode, n, args.seconds)
            rows.append(r)
            print(
                f"{r['mode']:9} {r['clients']:7d} {r['est_p50']:8.1f}"
                f" {r['est_p99']:8.1f} {r['pts_p50']:8.1f} {r['pts_p99']:8.1f}"
                f" {r['cpu']:8.1f}"
                f" {r['burst']:9.1f}"
                + f" {r['gaps']:6d}"
                + (f"  ({r['lost']} clients lost)" if r["lost"] else ""),
                flush=True,
            )
    print("burst points:", rows[0]["burst_points"] if rows else 0)


if __name__ == "__main__":
    main()
