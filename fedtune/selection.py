"""`fedtune select`'s result: candidates scored and ranked, and its files (JSON, CSV, a bar plot, the chosen config).

The scores come from the federation's pooled FeatureStatistics (fedtune/transferability.py):
LogME of the centred features ranks (higher is better); the published LogME (You et al. 2021, on
raw features), the H-score (Bao et al. 2019) and its shrunk form (which does not saturate when
there are fewer examples than feature dimensions) stand beside it.

Why centred: the published LogME regresses each one-hot label column on the raw features with no
intercept. Features after a ReLU or a BatchNorm share a large common mean, and the evidence then
also scores how well that one direction fits the labels' mean, which says nothing about classes.
Centring the pooled features with the federation's mean (`FeatureStatistics.centred`) leaves the
evidence to the class-dependent part. On the two benchmarks in the README (benchmarks/selection.py,
seven candidates, three seeds) the centred score's Kendall tau against head-only fine-tuning was 1.00
on both data sets, the published score's 1.00 on ants/bees and 0.52 on the digits, where it put the
full-depth backbones above the earlier cut points that fine-tuning preferred. This choice was made after
seeing those two benchmarks; the README gives every score's tau so a reader can judge it. The statistics
are collected by fedtune/server/statistics.py; this module only scores and reports.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedtune import strict_yaml
from fedtune.atomic import replace_atomically, write_bytes_atomically, write_text_atomically
from fedtune.candidates import Candidate
from fedtune.config import ConfigError, apply_override, parse_config, read_config_text
from fedtune.console import format_bytes
from fedtune.transferability import FeatureStatistics, h_score, logme, shrunk_h_score

SELECTION_JSON = "selection.json"
SELECTION_CSV = "selection.csv"
SELECTION_PNG = "selection.png"


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's scores on the pooled statistics, and what collecting them cost."""

    candidate: str
    backbone: str
    weights: str
    cut: str | None
    feature_dim: int
    examples: int
    logme_centred: float  # ranks
    logme: float
    h_score: float
    shrunk_h_score: float
    seconds: float
    bytes_sent: int
    bytes_received: int
    # Of `seconds`' work: the clients' own compute for this candidate, summed over clients as they
    # reported it (a forward pass shared by candidates of one model is split evenly); 0 under SecAgg+.
    client_seconds: float = 0.0


def score(candidate: Candidate, stats: FeatureStatistics, *, feature_dim: int, seconds: float, bytes_sent: int,
          bytes_received: int, client_seconds: float = 0.0) -> CandidateScore:
    """The candidate's scores on the pooled `stats`, computed in the span of its features where the
    clients' Gram factors give one (FeatureStatistics.in_span: the same scores, in a fraction of the time)."""
    stats = stats.in_span()
    return CandidateScore(
        candidate=candidate.label, backbone=candidate.backbone, weights=candidate.weights, cut=candidate.cut,
        feature_dim=feature_dim, examples=stats.count, logme_centred=logme(stats.centred()), logme=logme(stats),
        h_score=h_score(stats),
        shrunk_h_score=shrunk_h_score(stats), seconds=seconds, bytes_sent=bytes_sent, bytes_received=bytes_received,
        client_seconds=client_seconds,
    )


@dataclass(frozen=True)
class Selection:
    """The ranking (best centred LogME first) and how it was reached."""

    name: str
    scores: list[CandidateScore]
    clients: int  # asked
    clients_used: list[int]
    clients_refused: dict[int, str]  # client -> why its statistics were refused
    clients_failed: dict[int, str]  # client -> the error it sent, or the timeout
    seconds: float
    bytes_sent: int
    bytes_received: int
    secure_aggregation: bool = False
    # Under SecAgg+: how the sums were made public-range integers, and how far they may be off.
    secure: dict[str, Any] = field(default_factory=dict)
    # Of `seconds`: the server's scoring of the sums.
    scoring_seconds: float = 0.0
    # Before `seconds`, in a simulation: the workers starting and every model put in their machine's
    # shared cache (a run's round 1 does not count its warm-up either).
    warm_up_seconds: float = 0.0
    # The share of each client's training split its statistics came from (`fedtune select --sample`).
    sample: float = 1.0

    def __post_init__(self) -> None:
        # Best first; a score that is not a number (degenerate statistics) last.
        self.scores.sort(key=lambda s: (math.isnan(s.logme_centred),
                                        0.0 if math.isnan(s.logme_centred) else -s.logme_centred))

    @property
    def chosen(self) -> CandidateScore:
        return self.scores[0]

    @property
    def negative_transfer(self) -> list[str]:
        """Warnings for each backbone whose random initialisation outscores its ImageNet weights (same cut):
        the pretrained features fit this data worse than random ones, the sign of negative transfer."""
        by_model = {(s.backbone, s.cut, s.weights): s for s in self.scores}
        warnings = []
        for (backbone, cut, weights), random in by_model.items():
            pretrained = by_model.get((backbone, cut, "imagenet"))
            if weights == "none" and pretrained is not None and random.logme_centred > pretrained.logme_centred:
                warnings.append(f"negative transfer: {random.candidate} (random init) scores "
                                f"{random.logme_centred:.4f}, above {pretrained.candidate} with ImageNet weights "
                                f"({pretrained.logme_centred:.4f})")
        return warnings

    def to_json(self) -> str:
        data = asdict(self)
        data["clients_refused"] = {str(k): v for k, v in sorted(self.clients_refused.items())}
        data["clients_failed"] = {str(k): v for k, v in sorted(self.clients_failed.items())}
        data["chosen"] = self.chosen.candidate
        data["negative_transfer"] = self.negative_transfer
        return json.dumps(data, indent=2) + "\n"

    def write(self, folder: Path) -> list[Path]:
        """selection.json, selection.csv and selection.png in `folder`, each written atomically."""
        written = [write_text_atomically(folder / SELECTION_JSON, self.to_json()),
                   write_text_atomically(folder / SELECTION_CSV, self._write_csv)]
        figure = self.figure()
        written.append(replace_atomically(folder / SELECTION_PNG, partial(figure.savefig, format="png", dpi=120)))
        return written

    def _write_csv(self, file: IO[str]) -> None:
        columns = list(CandidateScore.__dataclass_fields__)
        writer = csv.writer(file)
        writer.writerow(["rank", *columns])
        for rank, row in enumerate(self.scores, start=1):
            writer.writerow([rank, *("" if getattr(row, c) is None else getattr(row, c) for c in columns)])

    def figure(self) -> Figure:
        """Bars of the centred LogME (the ranking) and of the published LogME, one per candidate, best first."""
        figure = Figure(figsize=(9, 1.6 + 0.55 * len(self.scores)), layout="constrained")
        FigureCanvasAgg(figure)  # Agg directly, as fedtune/plots.py: no pyplot, no global backend
        names = [s.candidate for s in self.scores][::-1]
        for position, (title, values) in enumerate((
            ("LogME of centred features (ranks; higher is better)", [s.logme_centred for s in self.scores][::-1]),
            ("LogME as published, raw features", [s.logme for s in self.scores][::-1]),
        ), start=1):
            ax = figure.add_subplot(1, 2, position)
            colours = ["tab:green" if name == self.chosen.candidate else "tab:blue" for name in names]
            ax.barh(names, values, color=colours)
            ax.set_title(title, fontsize=10)
            ax.axvline(0, color="grey", linewidth=0.8)
            for y, value in enumerate(values):
                ax.text(value, y, f" {value:.3f}", va="center", ha="left" if value >= 0 else "right", fontsize=8)
            if position == 2:
                ax.set_yticklabels([])
        figure.suptitle(f"{self.name}: backbone selection over {len(self.clients_used)} clients"
                        + (" (SecAgg+)" if self.secure_aggregation else ""), fontsize=11)
        return figure

    def summary(self) -> str:
        """The closing line: who was used, and the seconds and bytes spent."""
        left_out = len(self.clients_refused) + len(self.clients_failed)
        warm = f" (after {self.warm_up_seconds:.1f} s warming the simulation's workers up)" \
            if self.warm_up_seconds else ""
        sample = f" ({self.sample:.0%} of each one's training split)" if self.sample < 1 else ""
        return (f"chosen: {self.chosen.candidate} (centred LogME {self.chosen.logme_centred:.4f}); statistics from "
                f"{len(self.clients_used)} of {self.clients} clients{sample} ({len(self.clients_refused)} refused, "
                f"{len(self.clients_failed)} failed{', left out' if left_out else ''}); spent "
                f"{self.seconds:.1f} s{warm}, sent {format_bytes(self.bytes_sent)}, received "
                f"{format_bytes(self.bytes_received)}")


def print_table(selection: Selection, *, file: IO[str] | None = None) -> None:
    """The ranking as a rich table, then the summary line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{selection.name}: candidates ranked by the LogME of centred features")
    for column, justify in (("rank", "right"), ("candidate", "left"), ("features", "right"),
                            ("LogME centred", "right"), ("LogME", "right"),
                            ("H-score", "right"), ("shrunk H-score", "right"), ("seconds", "right"),
                            ("sent", "right"), ("received", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for rank, row in enumerate(selection.scores, start=1):
        table.add_row(str(rank), row.candidate, str(row.feature_dim), f"{row.logme_centred:.4f}", f"{row.logme:.4f}",
                      f"{row.h_score:.4f}",
                      f"{row.shrunk_h_score:.4f}", f"{row.seconds:.1f}", format_bytes(row.bytes_sent),
                      format_bytes(row.bytes_received))
    console = Console(file=file, width=max(120, Console(file=file).width))
    console.print(table)
    for warning in selection.negative_transfer:
        console.print(warning, style="bold yellow", highlight=False, soft_wrap=True)
    console.print(selection.summary(), highlight=False, soft_wrap=True)


def chosen_config_text(config: Path, overrides: Sequence[str], candidate: Candidate, *, note: str = "") -> str:
    """The experiment file `config` (with `overrides`) with the candidate's model.backbone, weights and
    cut: YAML, validated as a whole. Comments of the original are not kept."""
    raw = strict_yaml.load(read_config_text(config))
    if not isinstance(raw, dict):
        raise ConfigError(f"{config}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"{config}: model is a value, not a section")
    model.update({"backbone": candidate.backbone, "weights": candidate.weights, "cut": candidate.cut})
    parse_config(raw, source=f"{config} with {candidate.label}")  # refuses what `fedtune check` would
    header = f"# Written by fedtune select from {config}: model chosen {candidate.label}{note}.\n"
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def write_chosen_config(path: Path, text: str, *, force: bool) -> Path:
    """Write the chosen config atomically; an existing file is kept (FileExistsError) unless `force`."""
    return write_bytes_atomically(path, text.encode("utf-8"), exclusive=not force)
