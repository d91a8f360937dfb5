"""benchmarks/plotting.py (the benchmarks' `--plot`): each chart kind renders a PNG from a small
made-up table, bad input fails with a message, and a script's plot draws the structure it builds."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import plotting
from plotting import Bars, Ceiling, Lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a PNG must have first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    assert data[12:16] == b"IHDR", f"{path}: the first chunk is {data[12:16]!r}, not IHDR"
    return struct.unpack(">II", data[16:24])


def assert_readable_png(path: Path) -> None:
    width, height = png_size(path)
    assert width > 200 and height > 200, f"{path} is only {width} x {height} px"
    assert path.stat().st_size > 5_000, f"{path} has {path.stat().st_size} bytes: a blank image?"


def test_lines_against_log_concurrency(tmp_path: Path) -> None:
    panel = Lines(
        [1, 16, 64],
        {"lmprog": [55.0, 310.0, 420.0], "llama-server": [60.0, 280.0, 350.0]},
        "concurrent requests",
        "output tok/s",
        title="throughput",
        logx=True,
        styles={"lmprog": {"linestyle": "--"}},
    )
    path = plotting.save(tmp_path / "lines.png", "made-up serving table", [panel])
    assert_readable_png(path)


def test_bars_with_a_ceiling_a_log_axis_and_a_missing_cell(tmp_path: Path) -> None:
    bandwidth = Bars(
        ["qkv 576x960", "gate_up 576x3072", "lm_head 576x49152"],
        {"fp32": [6.1, 9.0, 10.8], "int8": [4.4, math.nan, 26.5]},  # nan: no bar, no label
        "GB/s",
        title="M = 1",
        ceiling=Ceiling(11.8, "copy 11.8 GB/s"),
    )
    latency = Bars(
        ["1 x 1024", "512 x 1024"],
        {"gloo": [1800.0, 4000.0], "shared memory": [30.0, 900.0]},
        "microseconds",
        logy=True,
    )
    path = plotting.save(tmp_path / "bars.png", "made-up kernel table", [bandwidth, latency])
    assert_readable_png(path)


def test_a_series_of_the_wrong_length_says_which(tmp_path: Path) -> None:
    panel = Bars(["a", "b", "c"], {"torch": [1.0, 2.0]}, "ms")
    with pytest.raises(AssertionError, match="series 'torch' has 2 values for 3 x positions"):
        plotting.save(tmp_path / "bad.png", "t", [panel])


def test_a_plot_that_cannot_be_saved_fails_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plotting.check_plot_path(None)  # no --plot: nothing to check, matplotlib or not
    with pytest.raises(SystemExit, match="does not exist"):
        plotting.check_plot_path(str(tmp_path / "missing" / "out.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plotting.check_plot_path(str(tmp_path / "out.png"))


def test_bench_vs_llama_server_plots_the_rows_it_builds(tmp_path: Path) -> None:
    """Its real run needs a llama.cpp build; its plot takes {server: {level: summarize()}}."""
    from bench_serving import Result, summarize
    from bench_vs_llama_server import LLAMA, plot

    def level(concurrency: int, ms_per_token: float) -> dict:
        results = [
            Result(ok=True, ttft=0.05 * concurrency, e2e=1.0, itl=[ms_per_token / 1e3] * 15,
                   output_tokens=16, prompt_tokens=80)
            for _ in range(4 * concurrency)
        ]  # fmt: skip
        results[0] = Result(error="Server disconnected without sending a response")
        return summarize(results, 0.2 * concurrency, 64)

    levels = [1, 16, 64]
    rows = {name: {c: level(c, ms) for c in levels} for name, ms in ((LLAMA, 18), ("bf16", 25))}
    path = tmp_path / "vs_llama.png"
    plot(str(path), rows, levels, "llama-server vs lmprog (made up)")
    assert_readable_png(path)
