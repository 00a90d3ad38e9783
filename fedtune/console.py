"""What a person sees of a run: a live display at a terminal, one line per round elsewhere, result tables."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedtune.logs import Verbosity, verbosity

if TYPE_CHECKING:
    from fedtune.records import RoundRecord


class RoundProgress:
    """Live progress of a run.

    At a terminal: a rich display at the bottom (round k/N, ETA, central accuracy, bytes so far,
    epsilon under privacy) with one table row per finished round scrolling above it. Elsewhere
    (CI, pipes, tests): one plain line per round. Under `fedtune -q`: nothing.
    """

    _HEADER = (
        f"{'round':>5}  {'blocks':>6}  {'clients':>7}  {'central acc':>11}  {'fed acc':>7}  "
        f"{'sent':>9}  {'received':>9}  {'time':>7}"
    )

    def __init__(self, total_rounds: int, *, title: str, console: Console | None = None) -> None:
        self.total_rounds = total_rounds
        self.title = title
        # rich's Console resolves sys.stdout when it prints, so redirected or captured output
        # (CI logs, pytest's capsys) is seen as "not a terminal" and gets plain lines.
        self._console = console or Console()
        self._quiet = verbosity() is Verbosity.QUIET
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._bytes_total = 0
        # Seconds of the rounds trained while this display was up: a resumed run's earlier rounds
        # would make the ETA of a slow first round (model delivery) look like every round's.
        self._timed_rounds: list[float] = []

    def __enter__(self) -> RoundProgress:
        if self._quiet:
            return self
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=20),
                TextColumn("round"),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=self._console,
            )
            self._progress.start()
            self._task = self._progress.add_task(escape(self.title), total=self.total_rounds, status="")
            self._print(self._HEADER, style="bold")
        else:
            self._print(f"{self.title}: {self.total_rounds} rounds")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def round_done(self, record: RoundRecord, *, replayed: bool = False) -> None:
        """Show a finished round; `replayed`: one of a resumed run's earlier rounds, not timed here."""
        self._bytes_total += record.bytes_sent + record.bytes_received
        if record.round > 0 and not replayed:
            self._timed_rounds.append(record.seconds)
        if self._quiet:
            return
        if self._progress is not None and self._task is not None:
            self._print(self._table_row(record))
            self._progress.update(self._task, completed=min(record.round, self.total_rounds),
                                  status=self._status(record))
        else:
            self._print(self._log_line(record))

    def message(self, text: str) -> None:
        if not self._quiet:
            self._print(text)

    def _status(self, record: RoundRecord) -> str:
        """The live line's figures after round k/N."""
        parts = []
        remaining = self.total_rounds - record.round
        if remaining > 0 and self._timed_rounds:
            # The first round delivers the backbone to every client and is often several times
            # slower than the rest, which are alike until more blocks unfreeze: it is left out
            # once there are others.
            timed = self._timed_rounds[1:] or self._timed_rounds
            parts.append(f"ETA {_duration(remaining * sum(timed) / len(timed))}")
        parts.append(f"central acc {_accuracy_text(record.central_accuracy)}")
        parts.append(f"{format_bytes(self._bytes_total)} moved")
        parts += [_epsilon_label(name, value) for name, value in _epsilons(record)]
        return "  ".join(parts)

    def _print(self, text: str, *, style: str | None = None) -> None:
        # Printed through the progress's console while it is live, so lines scroll above the bar;
        # soft_wrap keeps a log line on one line whatever width a CI runner reports.
        console = self._progress.console if self._progress is not None else self._console
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def _table_row(self, record: RoundRecord) -> str:
        row = (
            f"{record.round:>5}  {record.trainable_blocks:>6}  "
            f"{f'{record.clients_ok}/{record.clients_sampled}':>7}  "
            f"{_accuracy_text(record.central_accuracy):>11}  {_accuracy_text(record.federated_accuracy):>7}  "
            f"{format_bytes(record.bytes_sent):>9}  {format_bytes(record.bytes_received):>9}  "
            f"{f'{record.seconds:.1f}s':>7}"
        )
        epsilons = [_epsilon_label(name, value) for name, value in _epsilons(record)]
        notes = [text for text in (", ".join(epsilons), _client_problems(record)) if text]
        return "  ".join([row, *notes])

    def _log_line(self, record: RoundRecord) -> str:
        parts = [
            f"round {record.round}/{self.total_rounds}",
            f"blocks={record.trainable_blocks}",
            f"clients={record.clients_ok}/{record.clients_sampled}",
            f"central_acc={_accuracy_text(record.central_accuracy)}",
            f"fed_acc={_accuracy_text(record.federated_accuracy)}",
            *([f"worst10%_clients_acc={_accuracy_text(record.clients_accuracy_worst10)}"]
              if record.clients_accuracy_worst10 is not None else []),
            f"sent={format_bytes(record.bytes_sent)}",
            f"received={format_bytes(record.bytes_received)}",
            f"time={record.seconds:.1f}s",
        ]
        parts += [f"{name}={value:.2f}" for name, value in _epsilons(record)]
        problems = _client_problems(record)
        return "  ".join(parts + [problems] if problems else parts)


def format_bytes(n: int) -> str:
    """Decimal (SI) units, as network traffic is usually quoted: 21_900 -> "21.9 KB"."""
    if abs(n) < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        # Checked against 999.95, not 1000, so 999_960 is "1.0 MB" rather than "1000.0 KB".
        if abs(value) < 999.95 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


def compare_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-markdown table of rows (e.g. pretrained vs scratch), padded to read in a terminal too."""
    cells = [[_cell_text(column, row.get(column)) for column in columns] for row in rows]
    # Numbers are right-aligned so their digits line up, in the terminal and on GitHub.
    numeric = [
        all(_is_number(row.get(column)) for row in rows if row.get(column) is not None) for column in columns
    ]
    widths = [max([len(column), 3, *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    dashes = ("-" * (w - 1) + ":" if right else "-" * w for w, right in zip(widths, numeric, strict=True))
    rule = "| " + " | ".join(dashes) + " |"
    return "\n".join([line(list(columns)), rule, *(line(values) for values in cells)])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _accuracy_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _epsilons(record: RoundRecord) -> list[tuple[str, float]]:
    """The privacy spent so far, in a run with any: the largest client's DP-SGD epsilon, central DP's user-level one."""
    return [(name, record.extra[name]) for name in ("epsilon_max", "epsilon_user") if name in record.extra]


def _epsilon_label(name: str, value: float) -> str:
    return f"{'user-level ε' if name == 'epsilon_user' else 'ε'} {value:.2f}"


def _client_problems(record: RoundRecord) -> str:
    problems = [
        f"{count} {kind}"
        for count, kind in (
            (record.clients_rejected, "rejected"), (record.clients_failed, "failed"),
            (record.updates_rejected_norm, "over the norm bound"), (record.updates_clipped, "clipped"),
            (record.weights_capped, "weight capped"),
        )
        if count
    ]
    return ", ".join(problems)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell_text(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column.startswith("bytes") and _is_number(value):
        return format_bytes(round(value))
    if isinstance(value, float):
        return f"{value:.3f}"
    # A pipe inside a cell would end it early in markdown.
    return str(value).replace("|", "\\|")
