"""Prometheus metrics for one running service.

Each service owns one :class:`Metrics` with its own registry (not the
process-global one), so several services, or tests, can share a process.
Actors receive it as an optional argument and update it directly; ``/metrics``
serves :meth:`Metrics.render`.
"""

from __future__ import annotations

import time

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@attrs.define(eq=False, slots=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=_registry)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        p = "fiatprint_"
        self.messages = Counter(
            p + "zmq_messages", "ZMQ messages received", ["topic"], registry=r
        )
        self.lost_messages = Counter(
            p + "zmq_lost_messages",
            "Messages the publisher dropped, from counter gaps",
            ["topic"],
            registry=r,
        )
        self.restarts = Counter(
            p + "node_restarts", "Node restarts seen as counter resets", registry=r
        )
        self.reconnects = Counter(
            p + "zmq_reconnects", "Reconnects after a silent feed", registry=r
        )
        self.last_message = Gauge(
            p + "zmq_last_message_timestamp_seconds",
            "Unix time of the last well-formed ZMQ message",
            registry=r,
        )
        self.decode_errors = Counter(
            p + "decode_errors", "Malformed messages dropped", ["reason"], registry=r
        )
        self.filter_rejections = Counter(
            p + "filter_rejections",
            "Transactions whose outputs the method does not use",
            ["reason"],
            registry=r,
        )
        self.clients = Gauge(
            p + "ws_clients", "Connected WebSocket clients", registry=r
        )
        self.dropped_frames = Counter(
            p + "ws_dropped_frames",
            "Updates skipped for clients that fell behind",
            registry=r,
        )
        self.bad_client_messages = Counter(
            p + "ws_bad_client_messages",
            "Client messages rejected (too large or not understood)",
            registry=r,
        )
        self.window_outputs = Gauge(
            p + "window_outputs", "Outputs in the window", ["state"], registry=r
        )
        self.price = Gauge(
            p + "price_usd",
            "Latest price estimate (NaN until the first one with a price)",
            registry=r,
        )
        self.price.set(float("nan"))
        self.price_updated = Gauge(
            p + "price_updated_timestamp_seconds",
            "Unix time of the latest estimate",
            registry=r,
        )
        self.price_age = Gauge(
            p + "price_age_seconds", "Seconds since the latest estimate", registry=r
        )
        self.price_age.set_function(self._price_age)
        self.last_block_height = Gauge(
            p + "last_block_height", "Height of the last connected block", registry=r
        )

    def _price_age(self) -> float:
        updated = self.price_updated._value.get()
        return time.time() - updated if updated else float("nan")

    def feed_summary(self) -> dict[str, object]:
        """The ZMQ feed's counters for ``/health``: seconds since the last
        well-formed message (None before the first), and messages, lost
        messages, restarts, reconnects and WebSocket clients so far."""
        per_topic: dict[str, dict[str, float]] = {"messages": {}, "lost_messages": {}}
        names = {
            "fiatprint_zmq_messages_total": "messages",
            "fiatprint_zmq_lost_messages_total": "lost_messages",
        }
        for family in self.registry.collect():
            for sample in family.samples:
                key = names.get(sample.name)
                if key is not None:
                    per_topic[key][sample.labels["topic"]] = sample.value
        get = self.registry.get_sample_value
        last = get("fiatprint_zmq_last_message_timestamp_seconds")
        return {
            "last_message_age": time.time() - last if last else None,
            **per_topic,
            "restarts": get("fiatprint_node_restarts_total") or 0.0,
            "reconnects": get("fiatprint_zmq_reconnects_total") or 0.0,
            "clients": get("fiatprint_ws_clients") or 0.0,
        }

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
