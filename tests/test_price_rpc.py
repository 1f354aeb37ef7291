"""``fiatprint price --heights/--date`` through RPC against the stand-in node.

The CLI runs its own ``trio.run``, so tests that call it run it in a worker
thread while the stand-in serves from the test's trio loop.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
import trio

from oracle.chain import (
    DayIncomplete,
    NoBlocks,
    day_heights,
    fetch_blocks,
    parse_height_range,
)
from oracle.cli import main
from oracle.decode import parse_block
from oracle.report import price_blocks
from oracle.rpc import RpcClient, RpcEndpoint

try:
    from .standin import StandinNode, block_path, open_standin, real_block
except ImportError:
    from standin import (  # type: ignore[no-redef]
        StandinNode,
        block_path,
        open_standin,
        real_block,
    )

# A chain whose heights 1..3 are the 2017-08-24 (UTC) run: 481824 (01:57:37),
# 413567 (stamped 2016-05-26 23:58:43, before midnight, yet inside the run)
# and 481829 (03:30:37). 478558 (2017-08-01) stands before the day, 482683
# (2017-08-30) is the first block after it, and five more follow, so the
# day's last block (height 3) has six blocks on top.
DAY_CHAIN = {
    0: 478558,
    1: 481824,
    2: 413567,
    3: 481829,
    4: 482683,
    5: 491407,
    6: 542213,
    7: 553724,
    8: 630000,
    9: 757739,
}


def rpc_args(node: StandinNode) -> list[str]:
    return [
        "--rpc-url",
        node.url,
        "--rpc-user",
        node.user,
        "--rpc-password",
        node.password,
    ]


def client_for(node: StandinNode) -> RpcClient:
    return RpcClient(RpcEndpoint(node.url, node.user, node.password, None, "flags"))


async def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    status = await trio.to_thread.run_sync(main, ["price", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def _no_fiatprint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FIATPRINT_"):
            monkeypatch.delenv(name)


async def test_heights_through_rpc_print_exactly_what_file_mode_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(block_path(818677))
    with trio.fail_after(60):
        async with open_standin({818677: 818677}) as node:
            assert await run_cli(capsys, path) == await run_cli(
                capsys, "--heights", "818677..818677", *rpc_args(node)
            )
            file_json = await run_cli(capsys, path, "--json")
            rpc_json = await run_cli(
                capsys, "--heights", "818677..818677", "--json", *rpc_args(node)
            )
    assert rpc_json == file_json
    status, out, err = rpc_json
    assert (status, err) == (0, "")
    doc = json.loads(out)
    assert doc["price"] == 37355.24841240194
    assert doc["rough_price"] == 37378
    assert (doc["first_height"], doc["last_height"], doc["blocks"]) == (
        818677,
        818677,
        1,
    )


async def test_date_selects_the_run_of_blocks_across_midnight() -> None:
    with trio.fail_after(60):
        async with open_standin(DAY_CHAIN) as node:
            rpc = client_for(node)
            assert await day_heights(rpc, dt.date(2017, 8, 24)) == range(1, 4)
            # 2017-08-30 is 482683 (height 4) alone, with five blocks on top.
            day = dt.date(2017, 8, 30)
            assert await day_heights(rpc, day, confirmations=5) == range(4, 5)
            with pytest.raises(NoBlocks) as no:
                await day_heights(rpc, dt.date(2017, 8, 25))
            assert str(no.value) == "no block is stamped on 2017-08-25"
            with pytest.raises(DayIncomplete) as late:
                await day_heights(rpc, dt.date(2017, 10, 24))
            assert str(late.value) == (
                "2017-10-24 is not final yet: its last block 5 has 4 blocks on "
                "top, 6 are needed; try again after block 11"
            )
            with pytest.raises(DayIncomplete) as open_day:
                await day_heights(rpc, dt.date(2022, 10, 8))
            assert str(open_day.value).startswith(
                "2022-10-08 is not over on chain yet: no block after it (the "
                "node's tip 9 is stamped 2022-10-08 17:25:55 UTC)"
            )
            with pytest.raises(DayIncomplete) as future:
                await day_heights(rpc, dt.date(2030, 1, 1))
            assert str(future.value).startswith("2030-01-01 has not started on chain")
            blocks = await fetch_blocks(rpc, [1, 2, 3], concurrency=2)
            assert [b.hash_hex for _, b in blocks] == [
                parse_block(real_block(h)).hash_hex for h in (481824, 413567, 481829)
            ]


async def test_date_needs_six_blocks_on_the_days_last_block(
    capsys: pytest.CaptureFixture[str],
) -> None:
    short = {h: v for h, v in DAY_CHAIN.items() if h <= 8}
    with trio.fail_after(60):
        async with open_standin(short) as node:
            status, out, err = await run_cli(
                capsys, "--date", "2017-08-24", *rpc_args(node)
            )
            assert (status, out) == (3, "")
            assert err == (
                "fiatprint price: 2017-08-24 is not final yet: its last block 3 "
                "has 5 blocks on top, 6 are needed; try again after block 9\n"
            )
            node.connect_block(real_block(757739))
            status, out, err = await run_cli(
                capsys, "--date", "2017-08-24", "--json", *rpc_args(node)
            )
    assert (status, err) == (0, "")
    expected = price_blocks(
        [(h, parse_block(real_block(DAY_CHAIN[h]))) for h in (1, 2, 3)]
    )
    assert out == json.dumps(expected.as_json()) + "\n"
    doc = json.loads(out)
    assert (doc["first_height"], doc["last_height"], doc["blocks"]) == (1, 3, 3)
    assert doc["transactions"] == 1866 + 1557 + 2020


async def test_node_errors_exit_2_with_the_fix(capsys: pytest.CaptureFixture[str]):
    with trio.fail_after(60):
        async with open_standin({818677: 818677}) as node:
            argv = ["--heights", "818677", "--rpc-url", node.url]
            status, out, err = await run_cli(
                capsys, *argv, "--rpc-user", "x", "--rpc-password", "y"
            )
            assert (status, out) == (2, "")
            assert err.startswith(
                f"fiatprint price: the node at {node.url} refused our RPC "
                "credentials (HTTP 401)"
            )
            status, out, err = await run_cli(
                capsys, *argv[:2], *rpc_args(node), "--network", "signet"
            )
            assert status == 2
            assert "is on chain 'main' but the configured network is 'signet'" in err
            status, out, err = await run_cli(
                capsys, "--heights", "818677..818680", *rpc_args(node)
            )
            assert (status, err) == (
                3,
                "fiatprint price: block 818680 is above the node's tip 818677\n",
            )
            await node.stop_rpc()
            status, out, err = await run_cli(
                capsys, "--heights", "818677", *rpc_args(node)
            )
            assert status == 2
            assert "cannot reach the node's RPC at" in err


async def test_bad_heights_and_sources_are_usage_errors(capsys) -> None:
    status, _, err = await run_cli(capsys, "--heights", "9..3")
    assert (status, err) == (
        2,
        "fiatprint price: --heights '9..3': the range ends before it starts\n",
    )
    status, _, err = await run_cli(capsys, "--date", "2017-02-30")
    assert (status, err) == (
        2,
        "fiatprint price: --date '2017-02-30': expected YYYY-MM-DD\n",
    )
    status, _, err = await run_cli(capsys, "x.bin", "--heights", "3")
    assert (status, err) == (
        2,
        "fiatprint price: give either block files or --heights/--date\n",
    )


def test_parse_height_range() -> None:
    assert parse_height_range("818677..818680") == (818677, 818680)
    assert parse_height_range(" 5 ") == (5, 5)
    with pytest.raises(ValueError):
        parse_height_range("5-6")
