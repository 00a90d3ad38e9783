"""What a person sees of the domain-gap report (fedtune/domain_gap.py): a table at the console, heatmaps in
gap.png, and the report's two files written."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from rich.console import Console
from rich.table import Table

from fedtune.atomic import replace_atomically, write_text_atomically
from fedtune.domain_gap import GAP_JSON, GAP_PNG, KERNEL, LABEL_SKEW_THRESHOLD, GapReport


def write_gap_report(report: GapReport, folder: str | Path) -> list[Path]:
    """gap.json and gap.png in `folder`, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figure = gap_figure(report)
    return [write_text_atomically(folder / GAP_JSON, report.to_json()),
            replace_atomically(folder / GAP_PNG, partial(figure.savefig, format="png", dpi=120))]



def print_gap_report(report: GapReport, *, console: Console | None = None) -> None:
    """The report as a table (one row per client) and its flags' reasons, at the console."""
    console = console or Console(width=max(140, Console().width))
    has_reference = any(c.vs_reference is not None for c in report.clients)
    table = Table(title=f"Domain gap: {len(report.clients)} clients, {len(report.classes)} classes, "
                        f"{report.dimensions} feature dimensions", title_justify="left")
    for column in ("client", "examples", "lacks", "Hellinger", "JS", "shift vs rest", "Fréchet", "CORAL",
                   "MMD² (linear)", *(["shift vs reference"] if has_reference else []), "flags"):
        table.add_column(column, justify="left" if column in ("client", "lacks", "flags") else "right")
    for client in report.clients:
        lacks = ", ".join(report.classes[k] for k in client.missing_classes)
        kinds = ", ".join(f.kind.replace("_", " ") for f in client.flags)
        reference_cell = [_number(client.vs_reference.class_shift.shift if client.vs_reference else None)]
        table.add_row(client.name, str(client.examples), lacks if len(lacks) <= 40 else lacks[:39] + "…",
                      f"{client.hellinger:.2f}", f"{client.jensen_shannon:.2f}",
                      _number(client.vs_rest.class_shift.shift), f"{client.vs_rest.frechet:.3g}",
                      f"{client.vs_rest.coral:.3g}", f"{client.vs_rest.mmd2_linear:.3g}",
                      *(reference_cell if has_reference else []), kinds,
                      style="bold red" if any(f.kind == "feature_shift" for f in client.flags) else None)
    console.print(table, markup=False)
    for client in report.clients:
        for flag in client.flags:
            console.print(flag.reason, markup=False, highlight=False, soft_wrap=True)
    console.print(f"label skew: Hellinger >= {LABEL_SKEW_THRESHOLD}; feature shift (class-conditional, in "
                  f"within-class SDs): above {report.shift_threshold:.2f}; MMD kernel {KERNEL}",
                  markup=False, highlight=False, soft_wrap=True)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# Past this many rows or columns, tick labels are thinned to about this many.
_MAX_TICK_LABELS = 30


def gap_figure(report: GapReport) -> Figure:
    """Three heatmaps: client x client class-conditional shift and Fréchet distance, and client x class
    label distribution; flagged clients outlined (feature shift) and marked (label skew)."""
    count = len(report.clients)
    side = min(max(4.5, 0.28 * count), 9.0)
    label_width = min(max(3.0, 0.35 * len(report.classes)), 9.0)
    figure = Figure(figsize=(2 * side + label_width + 3, side + 1.6), layout="constrained")
    FigureCanvasAgg(figure)  # Agg directly: no pyplot, no global backend
    shift_ax, frechet_ax, label_ax = figure.subplots(
        1, 3, gridspec_kw={"width_ratios": [side, side, label_width]})
    names = [c.name for c in report.clients]
    feature_flagged = {i for i, c in enumerate(report.clients) if any(f.kind == "feature_shift" for f in c.flags)}
    label_flagged = {i for i, c in enumerate(report.clients) if any(f.kind == "label_skew" for f in c.flags)}

    panels = (
        (shift_ax, "class_conditional_shift", "class-conditional shift\n(within-class SDs; grey: no shared class)"),
        (frechet_ax, "frechet", "Fréchet distance on features\n(marginal: moves with the labels too)"),
    )
    for ax, key, title in panels:
        matrix = np.ma.masked_invalid(report.pairwise[key])
        image = ax.imshow(matrix, cmap=colormaps["viridis"].with_extremes(bad="lightgrey"), interpolation="nearest")
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=10)
        _client_ticks(ax, names, axis="both", feature_flagged=feature_flagged, label_flagged=label_flagged)
        for i in feature_flagged:  # the flagged client's row and column
            for xy, width, height in (((-0.5, i - 0.5), count, 1), ((i - 0.5, -0.5), 1, count)):
                ax.add_patch(Rectangle(xy, width, height, fill=False, edgecolor="red", linewidth=1.5))

    image = label_ax.imshow(np.array([c.label_distribution for c in report.clients]), cmap="Blues", vmin=0, vmax=1,
                            aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=label_ax, shrink=0.8)
    label_ax.set_title("label distribution\n(share of each client's examples)", fontsize=10)
    _client_ticks(label_ax, names, axis="y", feature_flagged=feature_flagged, label_flagged=label_flagged)
    steps = _tick_positions(len(report.classes), set())
    label_ax.set_xticks(steps, [report.classes[k] for k in steps], rotation=90, fontsize=_font_size(len(steps)))
    for i in label_flagged:
        label_ax.plot(len(report.classes) - 0.5, i, marker="<", color="darkorange", markersize=6, clip_on=False)
    for i in feature_flagged:
        label_ax.plot(-0.5, i, marker=">", color="red", markersize=6, clip_on=False)

    figure.suptitle(f"Domain gap of {count} clients ({report.dimensions} feature dimensions)")
    figure.supxlabel(f"red: feature shift flagged (above {report.shift_threshold:.2f}); orange: label skew flagged "
                     f"(Hellinger >= {LABEL_SKEW_THRESHOLD})", fontsize=9)
    return figure


def _tick_positions(count: int, always: set[int]) -> list[int]:
    """Every position while they fit; past that about _MAX_TICK_LABELS evenly spaced, plus `always`."""
    if count <= _MAX_TICK_LABELS:
        return list(range(count))
    step = math.ceil(count / _MAX_TICK_LABELS)
    return sorted(set(range(0, count, step)) | always)


def _font_size(labels: int) -> float:
    return 8 if labels <= 20 else 6


def _client_ticks(ax: Axes, names: list[str], *, axis: str, feature_flagged: set[int], label_flagged: set[int]) -> None:
    # Clients flagged for feature shift keep their labels however many clients there are: they are
    # the ones looked for (label skew is the rule under Dirichlet splits, so it does not keep one).
    positions = _tick_positions(len(names), feature_flagged)
    labels = [names[i] for i in positions]
    size = _font_size(len(positions))
    ax.set_yticks(positions, labels, fontsize=size)
    if axis == "both":
        ax.set_xticks(positions, labels, rotation=90, fontsize=size)
    for tick, position in zip(ax.get_yticklabels(), positions, strict=True):
        if position in feature_flagged:
            tick.set_color("red")
        elif position in label_flagged:
            tick.set_color("darkorange")
