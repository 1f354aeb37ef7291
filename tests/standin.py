"""A stand-in Bitcoin Core for tests (placeholder, being written)."""

from __future__ import annotations

from pathlib import Path

import trio
import zmq

DATA_DIR = Path(__file__).resolve().parent / "data"
BLOCKS_DIR = DATA_DIR / "blocks"


async def zmq_recv(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one multipart message from ``sock`` under trio.

    Follows the edge-triggered reader rule: try NOBLOCK until ``zmq.Again``,
    then check ``EVENTS``; only when ``POLLIN`` is clear wait on the FD.
    """
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            continue
        await trio.lowlevel.wait_readable(sock.getsockopt(zmq.FD))
