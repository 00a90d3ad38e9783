"""What a person sees: each log line once, Flower's and Ray's routine lines only with -v, progress, a fast --help."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from round_records import make_record
from typer.testing import CliRunner

from fedtune import logs
from fedtune.cli import cli
from fedtune.console import RoundProgress, compare_table, format_bytes
from fedtune.logs import Verbosity
from fedtune.records import RoundRecord

REPO = Path(__file__).resolve().parents[1]
# What logging.basicConfig's format in opacus/utils/module_utils.py prints: "11/30/2026 23:40:02:INFO:..."
OPACUS_FORMAT = re.compile(r"^(\(\S+ pid=\d+\) )?\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")
# fedtune's format, "23:40:02 INFO fedtune.server: ...", and Ray's prefix of a worker's line.
PREFIX = re.compile(r"^(\x1b\[\d+m)?(\((\S+ )?pid=\d+\)(\x1b\[0m)? )?(\d\d:\d\d:\d\d )?")


@pytest.fixture(autouse=True)
def normal_verbosity() -> Iterator[None]:
    """Each test starts, and leaves the process, at the default verbosity."""
    logs.setup_logging(Verbosity.NORMAL)
    yield
    logs.setup_logging(Verbosity.NORMAL)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_importing_the_cli_loads_neither_torch_nor_flower() -> None:
    """`fedtune --help` stays fast while the CLI module leaves the heavy imports to its commands."""
    done = _python("""
        import sys
        import fedtune.cli
        print(sorted(m for m in ("torch", "torchvision", "timm", "flwr", "ray", "opacus") if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_worker_without_dp_sgd_never_imports_opacus() -> None:
    """Opacus costs a process 0.9 s to import: a simulation's worker answers and trains without it."""
    done = _python("""
        import sys
        import fedtune.client.app
        import fedtune.accounting
        print("opacus" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _logged_after_opacus(level: str) -> list[str]:
    """stderr lines of a process that imports Opacus (its logging.basicConfig) and Flower, then logs."""
    done = _python(f"""
        import logging
        import opacus.utils.module_utils  # adds a handler to the root logger (logging.basicConfig)
        from flwr.common.logger import log
        from fedtune.logs import Verbosity, setup_logging

        setup_logging(Verbosity.{level})
        logging.getLogger("fedtune.server").debug("fedtune debug line")
        logging.getLogger("fedtune.server").info("fedtune info line")
        logging.getLogger("fedtune.server").warning("fedtune warning line")
        log(logging.DEBUG, "flower debug line")
        log(logging.INFO, "configure_train: Sampled 3 nodes (out of 3)")
        log(logging.WARNING, "Manually terminating ClientAppActor")
        log(logging.WARNING, "flower warning line")
        log(logging.ERROR, "flower error line")
        logging.getLogger("some.library").info("library info line")
        logging.getLogger("some.library").warning("library warning line")
    """)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def _messages(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines]


def test_each_line_once_and_no_flower_routine_by_default() -> None:
    lines = _logged_after_opacus("NORMAL")

    assert not [line for line in lines if OPACUS_FORMAT.match(line)]
    assert _messages(lines) == [
        "fedtune info line", "fedtune warning line", "flower warning line", "flower error line",
        "library warning line",
    ]
    assert lines[0].endswith(" INFO fedtune.server: fedtune info line")
    assert lines[2].endswith(" WARNING flwr: flower warning line")


def test_verbose_shows_debug_and_flower_routine_lines_once() -> None:
    lines = _logged_after_opacus("VERBOSE")

    # Another library's logger keeps its own level (here the root's WARNING): -v does not open it.
    assert _messages(lines) == [
        "fedtune debug line", "fedtune info line", "fedtune warning line", "flower debug line",
        "configure_train: Sampled 3 nodes (out of 3)", "Manually terminating ClientAppActor", "flower warning line",
        "flower error line", "library warning line",
    ]


def test_quiet_shows_only_errors() -> None:
    assert _messages(_logged_after_opacus("QUIET")) == ["flower error line"]


def test_a_child_process_inherits_the_verbosity_and_a_client_s_info_lines_need_it() -> None:
    """Ray's workers (virtual clients) call setup_logging() with no level: the parent's -v reaches them."""
    code = """
        import logging
        from fedtune.logs import setup_logging

        setup_logging()
        logging.getLogger("fedtune.client").info("client info line")
        logging.getLogger("fedtune.client").warning("client warning line")
    """
    for chosen, expected in ((Verbosity.NORMAL, ["client warning line"]),
                             (Verbosity.VERBOSE, ["client info line", "client warning line"])):
        logs.setup_logging(chosen)
        done = _python(code)
        assert _messages(done.stderr.splitlines()) == expected, done.stderr


def test_an_unknown_inherited_verbosity_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.VERBOSITY_ENV, "loud\x1b[31m")
    done = _python("""
        from fedtune.logs import setup_logging

        setup_logging()
        setup_logging()
    """)
    assert _messages(done.stderr.splitlines()) == [
        "FEDTUNE_VERBOSITY='loud\\x1b[31m' is not one of quiet, normal, verbose; kept normal"
    ]


def _record(round_: int, **extra: float) -> RoundRecord:
    return RoundRecord(
        round=round_, trainable_blocks="0", clients_sampled=5, clients_ok=5, clients_rejected=0, clients_failed=0,
        bytes_sent=2_000_000 if round_ == 1 else 1_000_000, bytes_received=500_000, bytes_sent_backbone=0,
        train_loss=1.0, train_accuracy=0.5, federated_loss=1.0, federated_accuracy=0.5, central_loss=1.0,
        central_accuracy=0.25 * round_, seconds=60.0 if round_ == 1 else 10.0, extra=dict(extra),
    )


def test_live_display_shows_round_eta_accuracy_bytes_and_epsilon() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=200)

    with RoundProgress(4, title="exp", console=console) as progress:
        progress.round_done(_record(1, epsilon_max=1.234))
        progress.round_done(_record(2, epsilon_max=2.5))
        status = progress._status(_record(2, epsilon_max=2.5))

    # Two rounds left at the 10 s of round 2 (round 1's model delivery is left out of the estimate).
    assert status == "ETA 0:20  central acc 0.500  4.0 MB moved  ε 2.50"
    text = output.getvalue()
    assert "2/4" in text and "ε 2.50" in text


def test_a_resumed_run_does_not_time_its_earlier_rounds() -> None:
    with RoundProgress(4, title="exp", console=Console(file=io.StringIO())) as progress:
        progress.round_done(_record(1), replayed=True)
        progress.round_done(_record(2), replayed=True)
        assert progress._status(_record(2)).startswith("central acc")  # no ETA before a round is timed here
        progress.round_done(_record(3))
        assert progress._status(_record(3)).startswith("ETA 0:10  ")


def test_plain_lines_carry_epsilon_under_privacy(capsys: pytest.CaptureFixture[str]) -> None:
    with RoundProgress(1, title="exp") as progress:
        progress.round_done(_record(1, epsilon_max=1.234, epsilon_user=0.5))

    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        "round 1/1  blocks=0  clients=5/5  central_acc=0.250  fed_acc=0.500  sent=2.0 MB  received=500.0 KB  "
        "time=60.0s  epsilon_max=1.23  epsilon_user=0.50"
    )


def test_quiet_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging(Verbosity.QUIET)
    with RoundProgress(2, title="exp") as progress:
        progress.round_done(_record(1))
        progress.message("early stopping: no gain in 3 rounds")

    assert capsys.readouterr().out == ""


def test_verbose_and_quiet_together_is_one_error_line() -> None:
    result = CliRunner().invoke(cli, ["-v", "-q", "check", str(REPO / "configs/quickstart.yaml")])

    assert result.exit_code == 2
    assert result.output == "error: --verbose and --quiet cannot be given together\n"


def test_a_simulation_prints_each_line_once_and_no_debug_line(tmp_path: Path) -> None:
    """`fedtune simulate` end to end, with Ray's virtual-client workers: Opacus is imported in each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "fedtune", "simulate", str(REPO / "configs/quickstart.yaml"),
         "--set", "federation.num_clients=3", "--set", "federation.rounds=2", "--set", "data.image_size=32",
         "--set", "train.unfreeze=[]", "--set", "train.local_epochs=1", "--set", f"output.dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert [line for line in done.stdout.splitlines() if line.startswith("round ")][-1].startswith("round 2/2  ")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "DEBUG" in line or OPACUS_FORMAT.match(line)], done.stderr
    assert not [line for line in lines if "configure_train" in line or "aggregate_" in line], done.stderr
    repeated = {line: n for line, n in Counter(PREFIX.sub("", line) for line in lines).items() if n > 1}
    assert repeated == {}, done.stderr
    assert sum("run directory: " in line for line in lines) == 1


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (21_900, "21.9 KB"),
        (44_700_000, "44.7 MB"),
        (999_960, "1.0 MB"),
        (3_200_000_000, "3.2 GB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_compare_table() -> None:
    rows = [
        {"weights": "imagenet", "central_accuracy": 0.91234, "rounds": 5, "bytes_sent": 21_900},
        {"weights": "none", "central_accuracy": 0.5, "rounds": 5, "bytes_sent": 44_700_000},
        {"weights": "a|b", "central_accuracy": None, "rounds": 3},
    ]

    table = compare_table(rows, ["weights", "central_accuracy", "bytes_sent"])

    assert table.splitlines() == [
        "| weights  | central_accuracy | bytes_sent |",
        "| -------- | ---------------: | ---------: |",
        "| imagenet |            0.912 |    21.9 KB |",
        "| none     |            0.500 |    44.7 MB |",
        "| a\\|b     |                  |            |",
    ]


def test_progress_prints_a_line_per_round_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with RoundProgress(2, title="exp") as progress:
        for r in range(3):
            progress.round_done(make_record(r, clients_accuracy_worst10=0.25 if r == 2 else None))
        progress.message("early stopping: no gain in 3 rounds")

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "exp: 2 rounds"
    assert lines[1].startswith("round 0/2  blocks=0  clients=0/0  central_acc=0.100  fed_acc=-")
    assert lines[2] == (
        "round 1/2  blocks=0  clients=4/5  central_acc=0.433  fed_acc=0.500  "
        "sent=18.6 MB  received=11.0 KB  time=1.5s  1 rejected"
    )
    assert lines[3].startswith("round 2/2")
    assert "  fed_acc=0.550  worst10%_clients_acc=0.250  sent=" in lines[3]  # the worst-served clients, beside the mean
    assert lines[4] == "early stopping: no gain in 3 rounds"
    assert len(lines) == 5


def test_progress_on_a_terminal_prints_table_rows() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=120)

    with RoundProgress(2, title="exp", console=console) as progress:
        progress.round_done(make_record(1))

    text = output.getvalue()
    assert "central acc" in text  # the header
    assert "4/5" in text and "0.433" in text and "18.6 MB" in text


def test_a_round_without_federated_evaluation_shows_no_federated_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    skipped = _record(1)
    skipped.federated_accuracy = skipped.federated_loss = None
    skipped.evaluations_sampled = 0
    output = io.StringIO()
    with RoundProgress(2, title="exp", console=Console(file=output, force_terminal=True, width=200)) as progress:
        progress.round_done(skipped)
    with RoundProgress(2, title="exp") as progress:
        progress.round_done(skipped)

    assert "  fed_acc=-  " in capsys.readouterr().out.splitlines()[1]
    # The table row: round, blocks, clients, central acc, fed acc, ...
    assert re.search(r"\s1\s+0\s+5/5\s+0\.250\s+-\s+2\.0 MB", output.getvalue())
