"""A run's folder and its files: resolved config, per-round history (JSON, CSV), summary, privacy, model, plots.

Every file is written atomically (fedtune/atomic.py). What a round produced is fedtune/records.py;
how the plots are drawn, fedtune/plots.py; what a person sees at the terminal, fedtune/console.py.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any

import yaml
from torch import Tensor

from fedtune.atomic import replace_atomically, write_text_atomically
from fedtune.model_file import CONFIG_JSON, MODEL_FILE, save_model_file
from fedtune.plots import draw_accuracy, draw_bytes, draw_clients, draw_epsilon, figure_of
from fedtune.records import RECORD_COLUMNS, RoundRecord, record_from_dict, summarize_history

CONFIG_YAML = "config.yaml"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
SUMMARY_JSON = "summary.json"
ACCURACY_PNG = "accuracy.png"
CLIENTS_PNG = "clients.png"
BYTES_PNG = "bytes.png"
PRIVACY_JSON = "privacy.json"
PRIVACY_PNG = "privacy.png"


class RunDirectory:
    """Owns one run's output folder.

    Every file is written atomically (temp file + rename), so an interrupted run never leaves
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
        write_text_atomically(self.path / CONFIG_YAML, lambda f: _dump_config_yaml(data, f))
        return write_text_atomically(self.path / CONFIG_JSON, lambda f: _dump_json(data, f))

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
        write_text_atomically(self.path / HISTORY_JSON, lambda f: _dump_json(history, f))
        write_text_atomically(self.path / HISTORY_CSV, lambda f: _write_csv(records, f))
        # Only now: after a failed write the next append starts from the old history and rewrites
        # both files whole, so they cannot stay out of step.
        self._records = records

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """summary.json: final metrics, best round, stop reason, byte totals, wall time."""
        return write_text_atomically(self.path / SUMMARY_JSON, lambda f: _dump_json(summary, f))

    def write_privacy(self, report: dict[str, Any]) -> Path:
        """privacy.json: mechanisms, their parameters (noise, clipping, delta) and epsilon by round."""
        return write_text_atomically(self.path / PRIVACY_JSON, lambda f: _dump_json(report, f))

    def save_model(self, state_dict: dict[str, Tensor], metadata: dict[str, str]) -> Path:
        """model.safetensors; metadata (e.g. the config JSON, backbone name) travels inside the file."""
        return save_model_file(self.path / MODEL_FILE, state_dict, metadata)

    def write_plots(
        self, *, epsilon_budget: float | None = None, client_names: Mapping[int, str] | None = None
    ) -> list[Path]:
        """accuracy.png, clients.png (each client's accuracy), bytes.png and (under DP) privacy.png from the
        history so far.

        A plot with nothing to show is skipped; `epsilon_budget` is drawn as a line on privacy.png,
        whose client lines are named after `client_names` (client id -> name).
        """
        written = []
        plots = (
            (ACCURACY_PNG, draw_accuracy),
            (CLIENTS_PNG, draw_clients),
            (BYTES_PNG, draw_bytes),
            (PRIVACY_PNG, partial(draw_epsilon, budget=epsilon_budget, client_names=client_names)),
        )
        for name, draw in plots:
            figure = figure_of(draw, self._records, self.path.name)
            if figure is None:
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
            if not isinstance(rows, list):
                raise ValueError(f"'rounds' is a {type(rows).__name__}, not a list")
            return [record_from_dict(row) for row in rows]
        except (KeyError, TypeError, ValueError) as error:  # ValueError: JSON, UTF-8 or a round's form
            raise ValueError(f"{path}: not a fedtune history file ({error})") from None


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


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
