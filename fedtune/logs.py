"""Log output a person can follow: fedtune's own lines, and Flower's without its chatter."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DropDeprecatedSimulationNotice(logging.Filter):
    # fedtune calls flwr.simulation.run_simulation on purpose (see fedtune/simulation.py); the
    # notice that `flwr run` is preferred is not for fedtune's users, who have both.
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def setup_logging(level: int = logging.INFO) -> None:
    """Idempotent: one stderr handler on the `fedtune` logger."""
    logger = logging.getLogger("fedtune")
    logger.setLevel(level)
    if not any(getattr(h, "_fedtune", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._fedtune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropDeprecatedSimulationNotice) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropDeprecatedSimulationNotice())
