"""The README's "How it works" names a file for each step of a round, and each named file exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_file_named_in_how_it_works_exists() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it works", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\d+\. (.*?)(?=^\d+\. |\Z)", section, flags=re.M | re.S)
    assert len(steps) >= 8
    for step in steps:
        named = re.findall(r"`((?:server|client|strategies|fedtune)/[\w/.]*)`", step)
        assert named, f"a step names no file: {step[:80]!r}"
        missing = [path for path in named if not (REPO / path).exists()]
        assert not missing, f"named in README 'How it works' but not in the repository: {missing}"
