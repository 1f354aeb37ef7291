"""`/metrics` of the running service parses as Prometheus text and its
counters move exactly as good and bad messages arrive over real ZMQ."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from oracle.config import Settings
from oracle.decode import parse_block
from oracle.filter import TxFilter
from oracle.replay import CorePublisher
from oracle.service import run_service

try:
    from .test_app import http_get
except ImportError:
    from test_app import http_get  # type: ignore[no-redef]

BLOCKS = Path(__file__).parent / "data" / "blocks"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, keyed by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await http_get(url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    return samples(body.decode())


async def wait_for(url: str, key: tuple, value: float) -> dict:
    """Scrape until ``key`` reaches ``value`` (the pipeline is asynchronous)."""
    while True:
        got = await scrape(url)
        if got.get(key) == value:
            return got
        await trio.sleep(0.05)


def one(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


async def test_metrics_parse_and_count_good_and_bad_messages() -> None:
    (path,) = BLOCKS.glob("702861-*.bin")
    txs = parse_block(path.read_bytes()).txs[1:201]
    flt = TxFilter()
    outputs = sum(len(flt.offer(tx) or ()) for tx in txs)
    rejected = Counter({r.value: n for r, n in flt.rejected.items()})
    ep = "tcp://127.0.0.1:0"
    with (
        CorePublisher.open({"rawtx": ep, "sequence": ep}, hwm=0) as pub,
        trio.fail_after(60),
    ):
        settings = Settings(
            zmq_rawtx=pub.bound["rawtx"],
            zmq_sequence=pub.bound["sequence"],
            port=0,
            estimate_interval=0.05,
        )
        async with trio.open_nursery() as nursery:
            info = await nursery.start(
                lambda task_status: run_service(settings, task_status=task_status)
            )
            await pub.wait_subscribed()
            before = await scrape(info.url)
            assert before.get(one("fiatprint_zmq_messages_total", topic="rawtx")) in (
                None,
                0.0,
            )

            for seq, tx in enumerate(txs):
                pub.publish_mempool_tx(tx.raw, tx.txid, seq)
            got = await wait_for(
                info.url, one("fiatprint_window_outputs", state="mempool"), outputs
            )
            assert got[one("fiatprint_zmq_messages_total", topic="rawtx")] == 200
            assert got[one("fiatprint_zmq_messages_total", topic="sequence")] == 200
            for reason, n in rejected.items():
                assert got[one("fiatprint_filter_rejections_total", reason=reason)] == n

            # Bad messages: a body that is no transaction, a message of two
            # frames, and a sequence counter that skips 7.
            pub.publish("rawtx", b"\x02\x00\x00\x00\x01")
            sock = pub.sockets["rawtx"]
            sock.send_multipart([b"rawtx", b"\x00"])
            pub.counters["sequence"] += 7
            pub.publish("sequence", txs[0].txid[::-1] + b"R" + struct.pack("<Q", 999))
            got = await wait_for(
                info.url, one("fiatprint_zmq_lost_messages_total", topic="sequence"), 7
            )
            got = await wait_for(
                info.url, one("fiatprint_decode_errors_total", reason="tx_truncated"), 1
            )
            assert got[one("fiatprint_decode_errors_total", reason="frame_count")] == 1
            assert got[one("fiatprint_zmq_messages_total", topic="rawtx")] == 201
            assert got[one("fiatprint_zmq_messages_total", topic="sequence")] == 201
            assert got.get(one("fiatprint_node_restarts_total"), 0.0) == 0.0
            # The R removed the first transaction's outputs from the window.
            removed = len(TxFilter().offer(txs[0]) or ())
            assert removed == 2
            got = await wait_for(
                info.url,
                one("fiatprint_window_outputs", state="mempool"),
                outputs - removed,
            )
            # /health carries the same feed counters.
            status, _, body = await http_get(info.url + "/health")
            zmq_health = json.loads(body)["zmq"]
            assert status in (200, 503)
            assert zmq_health["messages"] == {"rawtx": 201.0, "sequence": 201.0}
            assert zmq_health["lost_messages"] == {"sequence": 7.0}
            assert (zmq_health["restarts"], zmq_health["reconnects"]) == (0.0, 0.0)
            assert 0.0 <= zmq_health["last_message_age"] < 60.0
            nursery.cancel_scope.cancel()
