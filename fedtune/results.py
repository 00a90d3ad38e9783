"""A run's results folder: resolved config, per-round history (JSON, CSV), final model, plots.

What a person sees at the terminal is fedtune/console.py.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from fedtune.atomic import replace_atomically
from fedtune.console import format_bytes

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
SUMMARY_JSON = "summary.json"
MODEL_FILE = "model.safetensors"
ACCURACY_PNG = "accuracy.png"
BYTES_PNG = "bytes.png"
PRIVACY_JSON = "privacy.json"
PRIVACY_PNG = "privacy.png"
# model.safetensors metadata key: the class names, in label order, as a JSON list of strings. (Files
# of earlier fedtune versions joined them with commas under "classes", which a name with a comma broke.)
CLASS_NAMES = "class_names"
_LEGACY_CLASSES = "classes"

# Bytes are drawn on a log axis when the largest bar is this many times the smallest: on a linear
# one, the full-backbone delivery of round 1 flattens every later head-only round to nothing.
_LOG_SCALE_RATIO = 100.0
# Past this many rounds, per-bar byte labels overlap and are left out.
_MAX_LABELLED_ROUNDS = 12


@dataclass
class RoundRecord:
    """What happened in one round; round 0 is the central evaluation before any training."""

    round: int
    trainable_blocks: str  # e.g. "0", "1", "all"
    clients_sampled: int
    clients_ok: int  # replies aggregated
    clients_rejected: int  # malformed replies left out
    clients_failed: int  # replies carrying an error, or missing
    bytes_sent: int  # server -> clients, this round (train + evaluate messages)
    bytes_received: int  # clients -> server
    bytes_sent_backbone: int  # the part of bytes_sent that was full-model deliveries
    train_loss: float | None  # aggregated from clients
    train_accuracy: float | None
    federated_loss: float | None  # clients' local validation splits, aggregated
    federated_accuracy: float | None
    central_loss: float | None  # the server's held-out set
    central_accuracy: float | None
    seconds: float
    # strategy.bound's work on the round's train updates (each also logged with the client's name)
    updates_rejected_norm: int = 0  # left out: norm over the bound
    updates_clipped: int = 0  # scaled down to the norm bound
    weights_capped: int = 0  # num-examples capped
    evaluations_rejected: int = 0  # malformed evaluate replies left out
    evaluations_failed: int = 0  # evaluate replies carrying an error, or missing
    extra: dict[str, float] = field(default_factory=dict)  # anything else, e.g. per-strategy metrics
    # client -> what was wrong with its replies this round and what the server did (history.json only)
    client_problems: dict[str, str] = field(default_factory=dict)


# history.csv's fixed leading columns, in declaration order; extra keys follow, sorted.
RECORD_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(RoundRecord) if f.name not in ("extra", "client_problems")
)
# Per-round counts of replies left out or bounded, totalled in the summary.
_COUNTED = ("clients_rejected", "clients_failed", "updates_rejected_norm", "updates_clipped", "weights_capped",
            "evaluations_rejected", "evaluations_failed")


def summarize_history(records: list[RoundRecord]) -> dict[str, Any]:
    """Totals and best round of a history; the start of a run's summary.json."""
    # Central accuracy is the comparable number across runs; runs without a server-side test set
    # fall back to the clients' validation splits.
    metric = "central_accuracy"
    if all(r.central_accuracy is None for r in records):
        metric = "federated_accuracy"
    scored = [r for r in records if getattr(r, metric) is not None]
    best = max(scored, key=lambda r: getattr(r, metric), default=None)
    last = records[-1] if records else None
    return {
        "rounds_completed": max((r.round for r in records), default=0),
        "best_metric": metric,
        "best_round": best.round if best else None,
        "best_value": getattr(best, metric) if best else None,
        "final_central_accuracy": last.central_accuracy if last else None,
        "final_federated_accuracy": last.federated_accuracy if last else None,
        "bytes_sent_total": sum(r.bytes_sent for r in records),
        "bytes_received_total": sum(r.bytes_received for r in records),
        "bytes_sent_backbone_total": sum(r.bytes_sent_backbone for r in records),
        "seconds_total": sum(r.seconds for r in records),
        **{f"{name}_total": sum(getattr(r, name) for r in records) for name in _COUNTED},
        "problems_by_client": _problems_by_client(records),
    }


def _problems_by_client(records: list[RoundRecord]) -> dict[str, dict[str, Any]]:
    """Each client whose replies were ever left out, clipped or capped: in how many rounds, and the last reason."""
    by_client: dict[str, dict[str, Any]] = {}
    for record in records:
        for client, problem in record.client_problems.items():
            seen = by_client.setdefault(client, {"rounds": 0})
            seen.update(rounds=seen["rounds"] + 1, last_round=record.round, last_problem=problem)
    return dict(sorted(by_client.items()))


class RunDirectory:
    """Owns one run's output folder.

    Every file is written atomically (temp file + os.replace), so an interrupted run never leaves
    a half-written file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # Reopening a run's folder (a resumed run) continues its history instead of clobbering it.
        history = self.path / HISTORY_JSON
        self._records: list[RoundRecord] = self.load_history(history) if history.exists() else []

    @classmethod
    def create(cls, root: str | Path, name: str) -> RunDirectory:
        """A new folder root/<name>-<YYYYmmdd-HHMMSS>, suffixed -1, -2, ... if that exists."""
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # root, or a folder above it, is a file; or not writable
            raise ValueError(f"cannot make the output folder {root} (output.dir): {error.strerror or error}") from None
        stem = f"{name}-{_timestamp()}"
        suffix = 0
        while True:
            candidate = root / (stem if suffix == 0 else f"{stem}-{suffix}")
            # mkdir itself is the existence test, so two runs started in the same second
            # cannot both claim one folder.
            try:
                candidate.mkdir()
            except FileExistsError:
                suffix += 1
                continue
            return cls(candidate)

    @property
    def records(self) -> list[RoundRecord]:
        return list(self._records)

    def write_config(self, config_json: str) -> Path:
        """config.json (the resolved config) and config.yaml (the same, for people); returns the JSON path."""
        data = json.loads(config_json)
        _write_text_atomically(self.path / CONFIG_YAML, lambda f: _dump_config_yaml(data, f))
        return _write_text_atomically(self.path / CONFIG_JSON, lambda f: _dump_json(data, f))

    def append_round(self, record: RoundRecord) -> None:
        """Add a round to history.json and history.csv, both rewritten whole.

        A round recorded again (a resumed run repeating it) replaces the earlier record and
        any after it.
        """
        shadowed = sorted(set(record.extra) & set(RECORD_COLUMNS))
        if shadowed:
            raise ValueError(f"round {record.round}: extra keys {shadowed} clash with history columns")
        records = [r for r in self._records if r.round < record.round] + [record]
        history = {"rounds": [asdict(r) for r in records], "summary": summarize_history(records)}
        _write_text_atomically(self.path / HISTORY_JSON, lambda f: _dump_json(history, f))
        _write_text_atomically(self.path / HISTORY_CSV, lambda f: _write_csv(records, f))
        # Only now: after a failed write the next append starts from the old history and rewrites
        # both files whole, so they cannot stay out of step.
        self._records = records

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """summary.json: final metrics, best round, stop reason, byte totals, wall time."""
        return _write_text_atomically(self.path / SUMMARY_JSON, lambda f: _dump_json(summary, f))

    def write_privacy(self, report: dict[str, Any]) -> Path:
        """privacy.json: mechanisms, their parameters (noise, clipping, delta) and epsilon by round."""
        return _write_text_atomically(self.path / PRIVACY_JSON, lambda f: _dump_json(report, f))

    def save_model(self, state_dict: dict[str, Tensor], metadata: dict[str, str]) -> Path:
        """model.safetensors; metadata (e.g. the config JSON, backbone name) travels inside the file."""
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"model metadata must map str to str; {key!r} -> {type(value).__name__}")
        # safetensors refuses non-contiguous tensors (transposed views, slices) and writes from CPU memory.
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
        # Serialised in memory and written by Python: safetensors' own save_file creates its
        # file owner-only (0600), unlike every other file of the run.
        data = save(tensors, metadata=metadata)
        return replace_atomically(self.path / MODEL_FILE, lambda tmp: tmp.write_bytes(data))

    def write_plots(self, *, epsilon_budget: float | None = None) -> list[Path]:
        """accuracy.png, bytes.png and (under DP) privacy.png from the history so far.

        A plot with nothing to show is skipped; `epsilon_budget` is drawn as a line on privacy.png.
        """
        written = []
        plots = (
            (ACCURACY_PNG, _draw_accuracy),
            (BYTES_PNG, _draw_bytes),
            (PRIVACY_PNG, partial(_draw_epsilon, budget=epsilon_budget)),
        )
        for name, draw in plots:
            figure = Figure(figsize=(8, 4.8), layout="constrained")
            FigureCanvasAgg(figure)  # Agg directly: no pyplot, no global backend, safe off the main thread
            if not draw(figure.add_subplot(), self._records, self.path.name):
                continue
            written.append(replace_atomically(self.path / name, partial(figure.savefig, format="png", dpi=120)))
        return written

    @staticmethod
    def load_history(path: str | Path) -> list[RoundRecord]:
        """Rounds from a history.json (or the run folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / HISTORY_JSON
        if not path.is_file():
            raise FileNotFoundError(f"history file not found: {path}")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["rounds"]
            return [_record_from_dict(row) for row in rows]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a fedtune history file ({error})") from None


def encode_class_names(classes: list[str]) -> str:
    """The CLASS_NAMES metadata value of a model file."""
    return json.dumps(classes)


def class_names_of(metadata: dict[str, str], *, source: str | Path) -> list[str]:
    """The class names a model file's metadata carries (CLASS_NAMES, or the older comma-joined "classes")."""
    if CLASS_NAMES in metadata:
        try:
            names = json.loads(metadata[CLASS_NAMES])
        except ValueError:
            names = None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{source}: metadata {CLASS_NAMES!r} is not a JSON list of class names")
        return names
    if _LEGACY_CLASSES in metadata:
        return metadata[_LEGACY_CLASSES].split(",")
    raise ValueError(f"{source}: metadata lacks the class names ({CLASS_NAMES!r}); was it saved by fedtune?")


def load_model_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a model.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from None
    return tensors, metadata


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _write_text_atomically(path: Path, write: Callable[[IO[str]], None]) -> Path:
    def fill(tmp: Path) -> None:
        # newline="" lets the csv module write its own line endings; harmless for JSON and YAML.
        with open(tmp, "w", encoding="utf-8", newline="") as file:
            write(file)

    return replace_atomically(path, fill)


def _dump_json(data: Any, file: IO[str]) -> None:
    json.dump(data, file, indent=2)
    file.write("\n")


def _dump_config_yaml(data: Any, file: IO[str]) -> None:
    file.write("# The resolved config of this run (config.json holds the same, for programs).\n")
    yaml.safe_dump(data, file, sort_keys=False, allow_unicode=True)


def _write_csv(records: list[RoundRecord], file: IO[str]) -> None:
    extra_columns = sorted({key for record in records for key in record.extra})
    writer = csv.writer(file)
    writer.writerow([*RECORD_COLUMNS, *extra_columns])
    for record in records:
        values = [getattr(record, column) for column in RECORD_COLUMNS]
        values += [record.extra.get(key) for key in extra_columns]
        # An empty cell is a missing value to pandas, spreadsheets and csv readers alike.
        writer.writerow(["" if value is None else value for value in values])


def _record_from_dict(row: dict[str, Any]) -> RoundRecord:
    known = {f.name for f in fields(RoundRecord)}
    unknown = sorted(set(row) - known)
    if unknown:
        raise TypeError(f"unknown round fields {unknown}")
    return RoundRecord(**row)


def _round_axis(ax: Axes, rounds: list[int]) -> None:
    ax.set_xlabel("round")
    # One tick per round while they fit; MaxNLocator keeps ticks on whole rounds past that.
    if len(rounds) <= 20:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark_unfreezing(ax: Axes, records: list[RoundRecord]) -> None:
    """A dotted line where more blocks start training: jumps in accuracy and bytes often sit there."""
    trained = [r for r in records if r.round > 0]
    for previous, current in zip(trained, trained[1:], strict=False):
        if current.trainable_blocks != previous.trainable_blocks:
            ax.axvline(current.round - 0.5, color="grey", linestyle=":", linewidth=1)
            # Written just above the frame, where no bar, point or label can hide it.
            ax.text(
                current.round - 0.5,
                1.01,
                f"blocks: {current.trainable_blocks}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="dimgrey",
            )


def _draw_accuracy(ax: Axes, records: list[RoundRecord], run_name: str) -> bool:
    # The best value is labelled above the central line and below the federated one, so the two
    # labels do not collide when both peak in the same round.
    series = (
        ("central (server's held-out set)", "central_accuracy", "tab:blue", "o", 8),
        ("federated (clients' validation splits)", "federated_accuracy", "tab:orange", "s", -14),
    )
    drawn = False
    for label, attribute, color, marker, label_offset in series:
        points = [(r.round, getattr(r, attribute)) for r in records if getattr(r, attribute) is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, color=color, label=label)
        best_round, best = max(points, key=lambda point: point[1])
        ax.annotate(
            f"{best:.1%}",
            (best_round, best),
            textcoords="offset points",
            xytext=(0, label_offset),
            ha="center",
            fontsize=8,
            color=color,
        )
        drawn = True
    if not drawn:
        return False
    ax.set_title(f"Accuracy per round (round 0 = before training)\n{run_name}", pad=16)
    ax.set_ylabel("accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    # Headroom above 100% for the best-value labels.
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=1.08)
    ax.grid(alpha=0.3)
    _round_axis(ax, [r.round for r in records])
    _mark_unfreezing(ax, records)
    _legend_below(ax)
    return True


def _legend_below(ax: Axes) -> None:
    # Outside the axes: inside, it would sit on top of some round's bars or points.
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9, frameon=False)


def _draw_bytes(ax: Axes, records: list[RoundRecord], run_name: str) -> bool:
    # Round 0 is an evaluation on the server alone: nothing travels.
    trained = [r for r in records if r.round > 0]
    if not trained:
        return False
    rounds = [r.round for r in trained]
    sent = [r.bytes_sent for r in trained]
    received = [r.bytes_received for r in trained]
    backbone = [r.bytes_sent_backbone for r in trained]
    width = 0.4
    sent_x = [x - width / 2 for x in rounds]
    sent_bars = ax.bar(sent_x, sent, width, color="tab:blue", label="sent (server → clients)")
    if any(backbone):
        ax.bar(
            sent_x,
            backbone,
            width,
            facecolor="none",
            edgecolor="navy",
            hatch="//",
            linewidth=0,
            label="of which full-model deliveries",
        )
    received_bars = ax.bar(
        [x + width / 2 for x in rounds], received, width, color="tab:green", label="received (clients → server)"
    )

    nonzero = [v for v in sent + received if v > 0]
    log_scale = bool(nonzero) and max(nonzero) > _LOG_SCALE_RATIO * min(nonzero)
    # Headroom above the tallest bar for the upright value labels.
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(nonzero) / 2, top=max(nonzero) * 12)
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0, top=max(nonzero, default=1) * 1.35)
    # Tick labels carry their own unit (KB, MB, ...), so a log axis spanning several stays readable.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(round(value)).replace(".0 ", " ")))
    if len(trained) <= _MAX_LABELLED_ROUNDS:
        for bars in (sent_bars, received_bars):
            labels = [format_bytes(round(b.get_height())) for b in bars]
            ax.bar_label(bars, labels=labels, rotation=90, fontsize=7, padding=3)

    scale_note = ", log scale" if log_scale else ""
    ax.set_title(f"Bytes per round{scale_note}\n{run_name}", pad=16)
    ax.set_ylabel("bytes per round")
    ax.grid(axis="y", alpha=0.3)
    _round_axis(ax, rounds)
    _mark_unfreezing(ax, records)
    _legend_below(ax)
    return True


def _draw_epsilon(ax: Axes, records: list[RoundRecord], run_name: str, *, budget: float | None) -> bool:
    trained = [r for r in records if r.round > 0]
    clients = sorted({k for r in trained for k in r.extra if k.startswith("epsilon_client_")},
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    user = [(r.round, r.extra["epsilon_user"]) for r in trained if "epsilon_user" in r.extra]
    if not clients and not user:
        return False
    for index, key in enumerate(clients):
        points = [(r.round, r.extra[key]) for r in trained if key in r.extra]
        xs, ys = zip(*points, strict=True)
        label = "each client's sample-level epsilon (DP-SGD)" if index == 0 else None
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1, marker=".", label=label)
    if clients:
        points = [(r.round, r.extra["epsilon_max"]) for r in trained if "epsilon_max" in r.extra]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color="tab:blue", linewidth=2, marker="o", label="largest client epsilon")
    if user:
        xs, ys = zip(*user, strict=True)
        ax.plot(xs, ys, color="tab:purple", linewidth=2, marker="s", label="user-level epsilon (central DP)")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget epsilon = {budget:g}")
    ax.set_title(f"Privacy spent by round (cumulative epsilon)\n{run_name}", pad=16)
    ax.set_ylabel("epsilon")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _round_axis(ax, [r.round for r in trained])
    _legend_below(ax)
    return True
