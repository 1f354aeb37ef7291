"""The files in deploy/ work as shipped.

- ``fiatprint.service`` passes ``systemd-analyze verify`` (with ``ExecStart``
  pointed at this Python, since the documented venv need not exist here);
- the nginx site passes ``nginx -t`` and, run on loopback in front of the real
  service fed by a real-block replay, passes the WebSocket upgrade for
  ``/ws`` and serves the REST routes;
- ``bitcoin.conf`` names the endpoints ``fiatprint.toml`` subscribes to.

The systemd and nginx checks need those programs and are skipped without
them; everything they start listens on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from oracle.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BLOCK = next((ROOT / "tests" / "data" / "blocks").glob("818677-*.bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bitcoin_conf_publishes_what_the_example_settings_subscribe_to() -> None:
    conf = dict(
        line.split("=", 1)
        for line in (DEPLOY / "bitcoin.conf").read_text().splitlines()
        if line and not line.startswith("#")
    )
    s = load_settings(None, {"FIATPRINT_CONFIG": str(DEPLOY / "fiatprint.toml")})
    assert conf["zmqpubrawtx"] == s.zmq_rawtx
    assert conf["zmqpubsequence"] == s.zmq_sequence
    assert conf["zmqpubhashblock"] == s.zmq_hashblock
    assert conf["rpccookieperms"] == "group"
    assert conf["rpcbind"] == "127.0.0.1"


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "fiatprint.service").read_text()
    assert "Type=notify\n" in text
    assert "NotifyAccess=main\n" in text
    assert "WatchdogSec=" in text
    assert "\nPrivateUsers=" not in text  # would hide the bitcoin group
    exec_line = "ExecStart=/opt/fiatprint/venv/bin/fiatprint serve"
    assert exec_line in text
    unit = tmp_path / "fiatprint.service"
    unit.write_text(
        text.replace(exec_line, f"ExecStart={sys.executable} -m oracle.cli serve")
    )
    result = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def _nginx_conf(tmp_path: Path, listen: int, upstream: int) -> Path:
    site = (DEPLOY / "nginx-fiatprint.conf").read_text()
    assert "server 127.0.0.1:8080;" in site
    assert "listen 80;" in site
    site = (
        site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};")
        .replace("listen 80;", f"listen 127.0.0.1:{listen};")
        .replace("listen [::]:80;", "")
    )
    (tmp_path / "site.conf").write_text(site)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
"""
    )
    return conf


def _nginx() -> str:
    tool = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if tool is None:
        pytest.skip("nginx is not installed")
    return tool


def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    conf = _nginx_conf(tmp_path, _free_port(), 8080)
    result = subprocess.run(
        [_nginx(), "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def _get(port: int, path: str) -> tuple[bytes, bytes]:
    """Status code and body of ``GET path``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].split(b" ")[1], body


async def test_websocket_and_rest_through_the_nginx_site(tmp_path: Path) -> None:
    nginx = _nginx()
    from oracle.replay import run_replay
    from oracle.service import run_service

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            eps = await nursery.start(
                functools.partial(
                    run_replay,
                    [BLOCK],
                    endpoints={
                        "rawtx": "tcp://127.0.0.1:0",
                        "sequence": "tcp://127.0.0.1:0",
                    },
                    rate=2000.0,
                    loop=True,
                    hwm=100_000,
                )
            )
            settings = Settings(
                port=0,
                zmq_rawtx=eps["rawtx"],
                zmq_sequence=eps["sequence"],
                window_seconds=3600.0,
            )
            info = await nursery.start(
                lambda task_status: run_service(settings, task_status=task_status)
            )
            upstream = int(info.url.rsplit(":", 1)[1].strip("/"))
            listen = _free_port()
            conf = _nginx_conf(tmp_path, listen, upstream)
            proc = await trio.lowlevel.open_process(
                [nginx, "-p", str(tmp_path), "-c", str(conf)],
                stderr=subprocess.DEVNULL,
            )
            try:
                while True:  # until nginx listens
                    try:
                        status, _ = await _get(listen, "/health")
                        break
                    except OSError:
                        await trio.sleep(0.05)
                assert status in (b"200", b"503")

                url = f"ws://127.0.0.1:{listen}/ws"
                async with open_websocket_url(url) as ws:
                    first = json.loads(await ws.get_message())
                    assert first["type"] == "snapshot"
                    kinds = set()
                    while "estimate" not in kinds:
                        kinds.add(json.loads(await ws.get_message())["type"])

                status, body = await _get(listen, "/api/v1/price")
                assert status == b"200"
                assert json.loads(body)["v"] == 1
                status, body = await _get(listen, "/metrics")
                assert status == b"200"  # from 127.0.0.1: allowed
                assert b"fiatprint_ws_clients" in body
            finally:
                proc.terminate()
                await proc.wait()
            nursery.cancel_scope.cancel()
