"""Plots of the benchmark tables (`--plot FILE.png`): grouped bars, lines against an x axis, and a
horizontal reference line (a measured ceiling or a target), one or more panels per figure.

A script's table stays what it reports; the plot draws the same numbers so a run reads at a
glance. matplotlib is imported only when a figure is drawn, so the benchmarks run without it when
no plot is asked for. Figures are built as `matplotlib.figure.Figure` objects, not through pyplot:
saving one to PNG renders with Agg, with no display and no global backend state.

Every figure's title ends with the machine header (numbers from different CPUs do not compare).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine_info import header

DPI = 110
PANEL_HEIGHT = 4.2  # inches
INSTALL_HINT = "pip install matplotlib"


@dataclass(frozen=True)
class Ceiling:
    """A horizontal reference line across a panel: a measured limit or a target."""

    value: float
    label: str


@dataclass(frozen=True)
class Lines:
    """Series against one x axis (e.g. tok/s against concurrency), a point per x value.
    `styles` holds extra `Axes.plot` keyword arguments per series name (color, linestyle)."""

    x: Sequence[float]
    series: Mapping[str, Sequence[float]]
    xlabel: str
    ylabel: str
    title: str = ""
    logx: bool = False
    logy: bool = False
    ceiling: Ceiling | None = None
    styles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Bars:
    """Grouped bars: a group per label along the x axis, in each a bar per series.
    nan values draw no bar (a table cell the run did not have)."""

    groups: Sequence[str]
    series: Mapping[str, Sequence[float]]
    ylabel: str
    title: str = ""
    logy: bool = False
    ceiling: Ceiling | None = None


Panel = Lines | Bars


def add_plot_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help=f"also draw the table(s) to this image (needs matplotlib: {INSTALL_HINT})",
    )


def check_plot_path(path: str | None) -> None:
    """Fails at once, not after a long run, when a plot is asked for and cannot be saved."""
    if path is None:
        return
    _matplotlib(path)
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise SystemExit(f"--plot {path}: the directory {parent} does not exist")


def _matplotlib(path: str | Path) -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            f"--plot {path}: matplotlib is not installed; run `{INSTALL_HINT}`"
        ) from None
    return matplotlib


def save(path: str | Path, title: str, panels: Sequence[Panel], ncols: int = 2) -> Path:
    """Draws the panels left to right, top to bottom, under `title` and the machine header."""
    _matplotlib(path)
    from matplotlib.figure import Figure

    assert panels, "nothing to plot: no panels"
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = max(_panel_width(p) for p in panels)
    fig = Figure(figsize=(width * ncols, PANEL_HEIGHT * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        if isinstance(panel, Lines):
            draw_lines(ax, panel)
        else:
            draw_bars(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n{header()}", fontsize=11)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return Path(path)


def _panel_width(panel: Panel) -> float:
    """Inches: wide enough that a bar chart's group labels do not collide."""
    if isinstance(panel, Bars):
        return max(6.4, 1.5 + 1.3 * len(panel.groups))
    return 6.4


def draw_lines(ax: Any, panel: Lines) -> None:
    for name, ys in panel.series.items():
        _check_length(name, ys, panel.x)
        ax.plot(panel.x, ys, label=name, **{"marker": "o", **panel.styles.get(name, {})})
    if panel.logx:
        # Log x for levels like 1, 16, 64; the ticks say the measured levels, not powers of 10.
        ax.set_xscale("log")
        ax.set_xticks(list(panel.x), [f"{x:g}" for x in panel.x])
        ax.minorticks_off()
    _finish(ax, panel.title, panel.xlabel, panel.ylabel, panel.logy, panel.ceiling)
    _legend(ax, len(panel.series) + (panel.ceiling is not None))


def draw_bars(ax: Any, panel: Bars) -> None:
    n = len(panel.series)
    width = 0.8 / n
    for i, (name, ys) in enumerate(panel.series.items()):
        _check_length(name, ys, panel.groups)
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(panel.groups))]
        bars = ax.bar(xs, ys, width, label=name)
        if n * len(panel.groups) <= 16:  # values on the bars while they still fit
            ax.bar_label(bars, labels=[_value_text(y) for y in ys], fontsize=7, padding=1)
    wrapped = [textwrap.fill(g, 14, break_long_words=False) for g in panel.groups]
    ax.set_xticks(range(len(panel.groups)), wrapped, fontsize=8)
    _finish(ax, panel.title, "", panel.ylabel, panel.logy, panel.ceiling)
    if n > 1 or panel.ceiling is not None:
        _legend(ax, n + (panel.ceiling is not None))


def draw_ceiling(ax: Any, ceiling: Ceiling) -> None:
    ax.axhline(ceiling.value, color="black", linestyle="--", linewidth=1, label=ceiling.label)


def _finish(
    ax: Any, title: str, xlabel: str, ylabel: str, logy: bool, ceiling: Ceiling | None
) -> None:
    if ceiling is not None:
        draw_ceiling(ax, ceiling)
    ax.margins(y=0.12)  # headroom: the legend and bar labels sit above the tallest bar
    if logy:
        _log_y(ax)
    else:
        ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _log_y(ax: Any) -> None:
    """Log y with ticks as plain numbers (50, 200), not powers of ten (5 x 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _legend(ax: Any, entries: int) -> None:
    """Beside the panel when long; when short, inside it, in a band added above the data so that
    it covers no bar or line."""
    if entries > 4:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return
    share = 0.06 * entries + 0.06  # of the axis height, about what the legend box takes
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log":
        lo_exp, hi_exp = math.log10(lo), math.log10(hi)
        ax.set_ylim(lo, 10 ** (lo_exp + (hi_exp - lo_exp) / (1 - share)))
    else:
        ax.set_ylim(lo, lo + (hi - lo) / (1 - share))
    ax.legend(fontsize=8, loc="upper left")


def _value_text(y: float) -> str:
    """A bar's value as the table would round it: 1834, 83.2, 0.758; none for nan."""
    if not math.isfinite(y):
        return ""
    return f"{y:.0f}" if abs(y) >= 100 else f"{y:.3g}"


def _check_length(name: str, ys: Sequence[float], xs: Sequence[Any]) -> None:
    assert len(ys) == len(xs), f"series {name!r} has {len(ys)} values for {len(xs)} x positions"
