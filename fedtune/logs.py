"""Log output a person can follow: every line once, and Flower's and Ray's routine lines only with -v."""

from __future__ import annotations

import enum
import logging
import os
import sys
import warnings
from typing import TextIO

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Verbosity(enum.Enum):
    """How much the terminal shows; the `fedtune` command's -q / -v."""

    QUIET = "quiet"  # errors and the result only
    NORMAL = "normal"  # fedtune's lines; other libraries' warnings and errors
    VERBOSE = "verbose"  # also fedtune's debug lines and Flower's and Ray's routine ones


# Each level, the lowest level shown of fedtune's own records and of every other library's.
_THRESHOLDS = {
    Verbosity.QUIET: (logging.ERROR, logging.ERROR),
    Verbosity.NORMAL: (logging.INFO, logging.WARNING),
    Verbosity.VERBOSE: (logging.DEBUG, logging.DEBUG),
}
_verbosity = Verbosity.NORMAL
# The chosen verbosity travels in the environment to this process's children: the workers of a
# local Ray (virtual clients) and Flower's processes, which call setup_logging() themselves.
VERBOSITY_ENV = "FEDTUNE_VERBOSITY"


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when the handler was made.

    So a record printed while rich's live display has sys.stderr redirected scrolls above the
    display instead of tearing it, and one printed under a test runner's capture lands there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr


# Flower warns of this at the end of every simulation, once per virtual-client process
# (flwr/simulation/ray_transport/ray_actor.py, line 40): routine, not a problem.
_FLOWER_ROUTINE_WARNINGS = ("Manually terminating ClientAppActor",)


def _is_under(name: str, parent: str) -> bool:
    return name == parent or name.startswith(f"{parent}.")


class _ByOrigin(logging.Filter):
    """fedtune's records from its threshold, every other library's from its own (Flower's, Ray's, Opacus's).

    A client's own info lines count as routine too: in a simulation each of the virtual clients
    prints one a round (fedtune/client/app.py), which Ray then forwards to this terminal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        own, others = _THRESHOLDS[_verbosity]
        if _is_under(record.name, "fedtune") and not _is_under(record.name, "fedtune.client"):
            return record.levelno >= own
        if _verbosity is not Verbosity.VERBOSE and record.name == "flwr" and record.levelno == logging.WARNING:
            message = record.getMessage()
            if any(message.startswith(routine) for routine in _FLOWER_ROUTINE_WARNINGS):
                return False
        return record.levelno >= others


class _DropDeprecatedSimulationNotice(logging.Filter):
    # fedtune calls flwr.simulation.run_simulation on purpose (see fedtune/simulation.py); the
    # notice that `flwr run` is preferred is not for fedtune's users, who have both.
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def verbosity() -> Verbosity:
    """The verbosity chosen at the last setup_logging (NORMAL before any)."""
    return _verbosity


def setup_logging(level: Verbosity | None = None) -> None:
    """Print every log record of this process once, on stderr, as `level` allows; idempotent.

    `None` keeps the verbosity chosen before, in this process or (FEDTUNE_VERBOSITY) its parent:
    the `fedtune` command chooses it from -q / -v; the code that runs the federation calls this
    again once flwr is imported, and so does the ClientApp in Ray's workers.

    One handler on the root logger prints every library's records. Two others would print them a
    second time, so they are set aside:
    - a plain StreamHandler on the root logger that an import put there: Opacus calls
      logging.basicConfig when imported (opacus/utils/module_utils.py, line 25);
    - Flower's own console handler on the `flwr` logger (flwr/supercore/logger.py, lines 147-153):
      it is turned off through Flower's update_console_handler, and `flwr` records, which
      propagate to the root, are printed there like any other library's.
    pytest's capture handlers are subclasses of StreamHandler and are left alone.
    """
    global _verbosity
    inherited = os.environ.get(VERBOSITY_ENV)
    unknown = None
    if level is not None:
        _verbosity = level
        os.environ[VERBOSITY_ENV] = level.value
    elif inherited is not None:
        try:
            _verbosity = Verbosity(inherited)
        except ValueError:
            unknown = inherited
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:  # logging.basicConfig's, from a library's import
            root.removeHandler(handler)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.addFilter(_ByOrigin())
        root.addHandler(handler)
    own, _ = _THRESHOLDS[_verbosity]
    logging.getLogger("fedtune").setLevel(own)
    if unknown is not None:
        logging.getLogger("fedtune").warning("%s=%.40r is not one of %s; kept %s", VERBOSITY_ENV, unknown,
                                             ", ".join(v.value for v in Verbosity), _verbosity.value)
        os.environ[VERBOSITY_ENV] = _verbosity.value  # said once, not at every later call

    if "flwr" in sys.modules:  # else Flower's handler does not exist yet; importing flwr here would slow every command
        from flwr.common.logger import update_console_handler

        update_console_handler(level=logging.CRITICAL + 1)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropDeprecatedSimulationNotice) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropDeprecatedSimulationNotice())
    if _verbosity is not Verbosity.VERBOSE:
        # A tip about a future default of Ray's, printed at every ray.init (ray/_private/worker.py,
        # line 2051): nothing for a fedtune user to do.
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        # Printed by every DP-SGD client (torch/utils/hooks.py, line 230): Opacus's hooks on a
        # trainable part fed cached features, which need no gradient. Expected, and harmless there.
        # (Opacus's own "Secure RNG turned off" stays: it names a limit of the guarantee.)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed",
                                category=UserWarning)
