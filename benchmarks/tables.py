"""Where a benchmark leaves its figures: table.md (the table, a note on the conditions, the command
that made it) and table.json (the same rows, note and command, and any raw figures), both written
atomically so that an interrupted run never leaves half a table behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedtune.atomic import write_text_atomically
from fedtune.console import compare_table

REPO = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """How this benchmark was started, as a reader would type it from the repository's root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", shown.as_posix(), *sys.argv[1:]])


def write_results(out: Path, rows: list[dict[str, Any]], note: str, *, raw: dict[str, Any] | None = None) -> str:
    """Write table.md and table.json into `out`; returns the table (every column any row has, in order)."""
    table = compare_table(rows, list(dict.fromkeys(column for row in rows for column in row)))
    command = command_line()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "table.md", f"{table}\n\n{note}\n\nCommand: `{command}`\n")
    record = {"rows": rows, "note": note, "command": command, **(raw or {})}
    write_text_atomically(out / "table.json", json.dumps(record, indent=2, default=str) + "\n")
    return table
