"""Service settings.

This module holds the one :class:`Settings` value that every part of the
service reads. Loading it from a TOML file, environment variables and
command-line flags (in that order of precedence, flags winning) is done by
:func:`load_settings`.
"""

from __future__ import annotations

from pathlib import Path

import attrs

__all__ = ["Settings"]

_HERE = Path(__file__).resolve().parent


@attrs.frozen
class Settings:
    # --- ZMQ feed
    zmq_rawtx: str = "tcp://127.0.0.1:28332"
    zmq_sequence: str = "tcp://127.0.0.1:28333"
    zmq_hashblock: str | None = None
    stale_seconds: float = 300.0
    # --- window and estimate
    window_seconds: float = 3 * 3600.0
    estimate_interval: float = 1.0
    # --- HTTP
    host: str = "127.0.0.1"
    port: int = 8080
    web_dir: Path = _HERE.parent / "web"
    # --- RPC (None means: not configured, run from ZMQ alone)
    network: str = "main"
    rpc_url: str | None = None
    rpc_user: str | None = None
    rpc_password: str | None = None
    rpc_cookie: Path | None = None
    datadir: Path | None = None
    # --- history
    history_path: Path | None = None
    # --- logging
    log_level: str = "INFO"
    log_format: str = "text"
