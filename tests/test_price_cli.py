"""`fiatprint price` on real blocks and the one-day vector: output, exit status."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from oracle.cli import main

DATA = Path(__file__).parent / "data"
VECTOR = DATA / "vectors" / "oneday_937665-937808.json"


def block(height: int) -> Path:
    (path,) = DATA.glob(f"blocks*/{height}-*.bin")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["price", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_block_702861_human_line(capsys):
    status, out, err = run_cli(capsys, str(block(702861)))
    assert status == 0
    assert err == ""
    assert out == (
        "block 702861: $42,951.64 (rough $42,880, spread $199.24) from 2,965 points; "
        "2,500 transactions, 1,680 used, 3,315 outputs\n"
    )


@pytest.mark.parametrize(
    ("height", "rough", "price"),
    [
        (702861, 42880, 42951.63645734903),
        (818677, 37378, 37355.24841240194),
        (630000, 42424, 42322.90087934292),
    ],
)
def test_known_answers_as_json(capsys, height, rough, price):
    status, out, _ = run_cli(capsys, "--json", str(block(height)))
    doc = json.loads(out)
    assert status == 0
    assert doc["rough_price"] == rough
    assert doc["price"] == price
    assert doc["reason"] is None
    assert doc["first_height"] == doc["last_height"] == height


def test_json_has_every_documented_key_and_counts(capsys):
    _, out, _ = run_cli(capsys, "--json", str(block(818677)))
    doc = json.loads(out)
    assert doc == {
        "price": 37355.24841240194,
        "rough_price": 37378,
        "reason": None,
        "transactions": 3463,
        "transactions_used": 1093,
        "outputs": 2157,
        "points": 1746,
        "spread": doc["spread"],
        "band": doc["band"],
        "first_height": 818677,
        "last_height": 818677,
        "first_time": 1701075201,
        "last_time": 1701075201,
        "blocks": 1,
        "rejected": {
            "inputs": 119,
            "outputs": 2140,
            "coinbase": 0,
            "op_return": 9,
            "witness": 0,
            "same_window": 102,
        },
    }
    # Rejected plus used accounts for every transaction.
    assert sum(doc["rejected"].values()) + doc["transactions_used"] == 3463
    assert doc["band"][0] < doc["price"] < doc["band"][1]


def test_vector_known_answer(capsys):
    status, out, _ = run_cli(capsys, "--json", "--vector", str(VECTOR))
    doc = json.loads(out)
    assert status == 0
    assert (doc["rough_price"], doc["price"], doc["points"]) == (
        67981,
        68150.84052703316,
        59274,
    )
    assert (doc["first_height"], doc["last_height"], doc["outputs"]) == (
        937665,
        937808,
        66647,
    )
    assert doc["transactions"] is None


def test_files_are_one_window_in_height_order(capsys):
    # Same day, given out of order: the window is read 757739 then 757753, so
    # a transaction of the later block spending one of the earlier is dropped.
    a, b = str(block(757753)), str(block(757739))
    _, out1, _ = run_cli(capsys, "--json", a, b)
    _, out2, _ = run_cli(capsys, "--json", b, a)
    assert out1 == out2
    doc = json.loads(out1)
    assert (doc["first_height"], doc["last_height"], doc["blocks"]) == (
        757739,
        757753,
        2,
    )
    assert doc["transactions"] == 63 + 81


@pytest.mark.parametrize(
    ("height", "reason"),
    [
        (100000, "no outputs in the range the template fit can see"),
        (542213, "no price point within 5% of the rough price"),
    ],
)
def test_not_enough_data_exits_3_with_reason(capsys, height, reason):
    status, out, err = run_cli(capsys, "--json", str(block(height)))
    doc = json.loads(out)
    assert status == 3
    assert doc["price"] is None
    assert doc["reason"] == reason
    status, out, _ = run_cli(capsys, str(block(height)))
    assert status == 3
    assert f"no price: not enough data: {reason}" in out


def test_malformed_block_exits_2_naming_file_and_offset(capsys, tmp_path):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(block(818677).read_bytes()[:5000])
    status, out, err = run_cli(capsys, str(bad))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"fiatprint price: {bad}: not a valid block: ")
    assert re.search(r"at byte \d+\n$", err)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not JSON"),
        (b'{"x": 1}', "no 'filtered_outputs' list in the vector"),
        (b'{"filtered_outputs": ["a"]}', "'filtered_outputs' is not a list of numbers"),
        (
            b'{"filtered_outputs": [0.1], "block_heights": [], "block_times": [1]}',
            "vector lengths differ: 1 amounts, 0 heights, 1 times",
        ),
    ],
)
def test_malformed_vector_exits_2(capsys, tmp_path, content, problem):
    path = tmp_path / "v.json"
    path.write_bytes(content)
    status, _, err = run_cli(capsys, "--vector", str(path))
    assert status == 2
    assert err.startswith(f"fiatprint price: {path}: {problem}")


def test_usage_errors_exit_2(capsys, tmp_path):
    status, _, err = run_cli(capsys)
    assert (status, err) == (
        2,
        "fiatprint price: nothing to price: give block files or --vector FILE\n",
    )
    status, _, err = run_cli(capsys, str(tmp_path / "missing.bin"))
    assert status == 2
    assert err.startswith(f"fiatprint price: {tmp_path / 'missing.bin'}: cannot read")


def test_chart_is_self_contained_and_holds_every_point(capsys, tmp_path):
    out_file = tmp_path / "chart.html"
    status, _, _ = run_cli(capsys, str(block(702861)), "--chart", str(out_file))
    assert status == 0
    page = out_file.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    data = json.loads(
        re.search(r'<script id="data" type="application/json">(.*?)</script>', page)
        .group(1)
        .replace("<\\/", "</")
    )
    assert data["price"] == 42951.63645734903
    assert len(data["p"]) == len(data["x"]) == len(data["h"]) == 2965
    assert set(data["h"]) == {702861}


def test_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "oracle.cli", "price", "--json", str(block(702861))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["price"] == 42951.63645734903


def test_a_block_given_twice_is_refused(capsys):
    path = str(block(818677))
    status, out, err = run_cli(capsys, path, path)
    assert (status, out) == (2, "")
    assert err == (
        f"fiatprint price: {path}: block "
        "000000000000000000020750f322f4e72e99c2f0b9738fb4f46607860bd18c13 was "
        f"already given as {path}; a window holds each block once\n"
    )


def test_a_file_larger_than_any_block_is_refused_after_reading_4_mb(capsys):
    # /dev/zero never ends: reading stops one byte past the largest block.
    status, _, err = run_cli(capsys, "/dev/zero")
    assert status == 2
    assert err == (
        "fiatprint price: /dev/zero: not a valid block: larger than 4,000,000 "
        "bytes, the most a block can be\n"
    )


def test_a_block_read_from_a_pipe_is_read_once():
    data = block(818677).read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "oracle.cli", "price", "--json", "/dev/stdin"],
        input=data,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["price"] == 37355.24841240194


def test_vector_without_heights_and_deeply_nested_vectors(capsys, tmp_path):
    doc = json.loads(VECTOR.read_text())
    path = tmp_path / "amounts-only.json"
    path.write_text(json.dumps({"filtered_outputs": doc["filtered_outputs"]}))
    status, out, _ = run_cli(capsys, "--json", "--vector", str(path))
    got = json.loads(out)
    assert status == 0
    assert (got["price"], got["first_height"], got["blocks"]) == (
        68150.84052703316,
        None,
        None,
    )
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    status, _, err = run_cli(capsys, "--vector", str(nested))
    assert (status, err) == (
        2,
        f"fiatprint price: {nested}: not a vector: JSON nested too deeply\n",
    )
    floats = tmp_path / "float-heights.json"
    floats.write_text('{"filtered_outputs": [0.1], "block_heights": [1.5]}')
    status, _, err = run_cli(capsys, "--vector", str(floats))
    assert status == 2
    assert err.endswith("'block_heights' is not a list of whole numbers\n")
