"""Each round's results for TensorBoard (output.tensorboard) and MLflow (output.mlflow), as the run writes them.

The run directory's own files (fedtune/report.py) stay the record of a run; these sinks are
copies for the tools people watch runs with. A sink that fails (a full disk, a tracking server
that went away) is dropped with one warning naming it and the problem: monitoring never ends a
federation.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from fedtune.config import ExperimentConfig, MLflowConfig
from fedtune.model_file import CONFIG_JSON, MODEL_FILE
from fedtune.records import RoundRecord
from fedtune.report import SUMMARY_JSON

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("fedtune.monitoring")

TENSORBOARD_DIR = "tensorboard"  # under the run directory
MLFLOW_INSTALL = "pip install 'fedtune[mlflow]'"
# Older MLflow servers refuse parameter values over 500 characters (this client's limit is 6000:
# mlflow/utils/validation.py, MAX_PARAM_VAL_LENGTH); a longer value (a long lr_multipliers table,
# a long path) is cut, saying so, and config.json, logged with the run as an artifact, holds it whole.
MAX_PARAM_CHARS = 500
# MLflow's log_batch limits (mlflow/utils/validation.py): 100 params, 1000 metrics per call.
_PARAMS_PER_CALL = 100
_METRICS_PER_CALL = 1000
# The round record's `extra` keys are the server's own (epsilon_client_<node id>, ...); one of
# another form could break MLflow's key rules and with them the whole sink, so it is left out.
_EXTRA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,200}")
# Tracking URIs MLflow serves with its SQLAlchemy store (mlflow/store/db/db_types.py, DATABASE_ENGINES).
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_MAX_PROBLEM_CHARS = 300  # of a backend's error, in the warning

# The record's fields under the names both tools show, grouped by what they are about.
_FIELDS = {
    "central/loss": "central_loss",
    "central/accuracy": "central_accuracy",
    "federated/loss": "federated_loss",
    "federated/accuracy": "federated_accuracy",
    # each client counted once: where the global model serves some clients and fails others
    "clients/accuracy_mean": "clients_accuracy_mean",
    "clients/accuracy_median": "clients_accuracy_median",
    "clients/accuracy_worst10": "clients_accuracy_worst10",
    # under personalization: each client's own model
    "clients/personal_accuracy_mean": "clients_personal_accuracy_mean",
    "clients/personal_accuracy_median": "clients_personal_accuracy_median",
    "clients/personal_accuracy_worst10": "clients_personal_accuracy_worst10",
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "bytes/sent": "bytes_sent",
    "bytes/received": "bytes_received",
    "bytes/sent_backbone": "bytes_sent_backbone",
    "bytes/backbone_serialised": "bytes_backbone_serialised",  # a simulation shares one copy per machine
    "clients/sampled": "clients_sampled",
    "clients/ok": "clients_ok",
    "clients/rejected": "clients_rejected",
    "clients/failed": "clients_failed",
    "bound/updates_rejected_norm": "updates_rejected_norm",
    "bound/updates_clipped": "updates_clipped",
    "bound/weights_capped": "weights_capped",
    "evaluations/sampled": "evaluations_sampled",  # 0: no federated evaluation that round
    "evaluations/rejected": "evaluations_rejected",
    "evaluations/failed": "evaluations_failed",
    "time/seconds": "seconds",
}


def scalars_of(record: RoundRecord) -> dict[str, float]:
    """The round's numbers by tag: the record's fields, then its extra figures (epsilon under privacy/)."""
    scalars = {tag: float(value) for tag, name in _FIELDS.items() if (value := getattr(record, name)) is not None}
    for key, value in sorted(record.extra.items()):
        if _EXTRA_KEY.fullmatch(key):
            scalars[f"{'privacy' if key.startswith('epsilon') else 'extra'}/{key}"] = float(value)
    return scalars


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as flat MLflow params ("train.lr": "0.01"), values cut to MAX_PARAM_CHARS."""
    params = {}
    for key, value in _flatten(cfg):
        text = value if isinstance(value, str) else json.dumps(value, default=_plain)
        if len(text) > MAX_PARAM_CHARS:
            note = f"... ({len(text)} characters; whole in {CONFIG_JSON})"
            text = text[:MAX_PARAM_CHARS - len(note)] + note
        params[key] = text
    return params


def _flatten(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    # Sections become dotted keys; a value that is a mapping or list (lr_multipliers, unfreeze)
    # stays one param, so the keys are the schema's names and never the user's.
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _plain(value: object) -> object:
    # Tuples of sections (train.unfreeze) as JSON.
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON")


class Sink(Protocol):
    name: str

    def write(self, record: RoundRecord) -> None: ...

    def close(self, *, artifacts: list[Path], failed: bool) -> None: ...


class TensorBoardSink:
    """Scalars by round in <run dir>/tensorboard/; what a resumed run replays is hidden, not doubled."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path, *, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier files' events from this step on, so a round
        # the killed run wrote and this one plays again shows once (tensorboard's EventAccumulator).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, record: RoundRecord) -> None:
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, global_step=record.round)
        # On disk before the round's checkpoint: a resumed run writes only the rounds after it.
        self.writer.flush()

    def close(self, *, artifacts: list[Path], failed: bool) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per server process: the config as params, every round's metrics by step, the model at the end.

    A resumed run opens a new MLflow run (tagged fedtune.resumed) and logs the rounds recorded
    before it again, so each MLflow run holds the whole history, each step once.
    """

    name = "MLflow"

    def __init__(self, settings: MLflowConfig, cfg: ExperimentConfig, run_dir: Path, *, resumed: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        # A client of its own, not mlflow's global (fluent) state, which other code may be using.
        self.client: MlflowClient = MlflowClient(tracking_uri=settings.tracking_uri)
        experiment_id = self._experiment_id(settings.experiment)
        tags = {"fedtune.run_dir": str(run_dir.resolve()), "fedtune.resumed": str(resumed).lower()}
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in config_params(cfg).items()]
        for start in range(0, len(params), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + _PARAMS_PER_CALL])

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:
            # Another run created it in between; if it still is not there, the first error stands.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def write(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, record.round) for tag, value in scalars_of(record).items()]
        for start in range(0, len(metrics), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _METRICS_PER_CALL])

    def close(self, *, artifacts: list[Path], failed: bool) -> None:
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class RunMonitor:
    """The run's sinks: every round goes to each, and a sink that fails is dropped with one warning."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.closed = False

    @classmethod
    def open(cls, cfg: ExperimentConfig, run_dir: Path, *, history: list[RoundRecord], resumed: bool) -> RunMonitor:
        """The sinks `cfg.output` asks for, given the rounds recorded before this process plays any.

        A fresh run's history is round 0, which every sink gets. A resumed run's TensorBoard files
        hold its history already, unless TensorBoard was switched on only for the resume; MLflow
        gets it again, in the new MLflow run.
        """
        monitor = cls([])
        next_round = max((r.round for r in history), default=-1) + 1
        if cfg.output.tensorboard:
            written = resumed and (run_dir / TENSORBOARD_DIR).is_dir()
            sink = monitor._start("TensorBoard", lambda: TensorBoardSink(
                run_dir / TENSORBOARD_DIR, purge_step=next_round if written else None))
            if sink is not None and not written:
                monitor._add(sink, history)
        if cfg.output.mlflow is not None:
            mlflow = cfg.output.mlflow
            sink = monitor._start("MLflow", lambda: MLflowSink(mlflow, cfg, run_dir, resumed=resumed))
            if sink is not None:
                monitor._add(sink, history)
        return monitor

    def write(self, record: RoundRecord) -> None:
        for sink in list(self.sinks):
            self._call(sink, partial(sink.write, record))

    def close(self, run_dir: Path | None = None, *, failed: bool = False) -> None:
        """End every sink; with `run_dir`, MLflow gets the final model, summary and config as artifacts."""
        if self.closed:
            return
        self.closed = True
        artifacts = [run_dir / name for name in (MODEL_FILE, SUMMARY_JSON, CONFIG_JSON)] if run_dir else []
        for sink in list(self.sinks):
            self._call(sink, partial(sink.close, artifacts=artifacts, failed=failed))
        self.sinks = []

    def __enter__(self) -> RunMonitor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # A run that raised before it finished: what was logged stays, and MLflow marks the run failed.
        if kind is not None:
            self.close(failed=True)

    def _start(self, name: str, build: Callable[[], Sink]) -> Sink | None:
        try:
            sink = build()
        except Exception as error:  # noqa: BLE001 - any backend problem: the run goes on without it
            _warn(name, error)
            return None
        self.sinks.append(sink)
        return sink

    def _add(self, sink: Sink, history: list[RoundRecord]) -> None:
        for record in history:
            if not self._call(sink, partial(sink.write, record)):
                return

    def _call(self, sink: Sink, action: Callable[[], object]) -> bool:
        """Run one sink action; on failure warn once and drop the sink. True when it worked."""
        try:
            action()
        except Exception as error:  # noqa: BLE001 - a full disk, a server gone, a refused value: not the run's end
            _warn(sink.name, error)
            self.sinks.remove(sink)
            return False
        return True


def _warn(name: str, error: Exception) -> None:
    # One line, bounded: an MLflow error can span lines and carry a whole HTTP response.
    problem = " ".join(str(error).split())
    if len(problem) > _MAX_PROBLEM_CHARS:
        problem = problem[:_MAX_PROBLEM_CHARS] + "..."
    log.warning("monitoring: %s stopped, the run goes on without it: %s: %s", name, type(error).__name__, problem)


def mlflow_problem(settings: MLflowConfig) -> str | None:
    """Why output.mlflow cannot work on this machine, checked before a run starts; None when it can."""
    try:
        from mlflow import environment_variables
    except ImportError:
        return f"output.mlflow: MLflow is not installed; {MLFLOW_INSTALL} (or remove output.mlflow)"
    scheme = settings.tracking_uri.partition(":")[0].partition("+")[0].lower()
    # MLflow 3 refuses file stores unless told otherwise (mlflow/store/tracking/file_store.py, FileStore.__init__).
    allow_file_store = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if scheme == "file" and allow_file_store is not None and not allow_file_store.get():
        return ("output.mlflow.tracking_uri: this MLflow refuses file: stores unless MLFLOW_ALLOW_FILE_STORE=true is "
                "set; set it, or use sqlite:///abs/path/mlflow.db")
    # Database stores are MLflow's SQLAlchemy store; mlflow-skinny leaves its packages to flwr or the full mlflow.
    missing = [name for name in ("sqlalchemy", "alembic") if importlib.util.find_spec(name) is None]
    if scheme in _DATABASE_SCHEMES and missing:
        return (f"output.mlflow.tracking_uri: a {scheme}: store needs {' and '.join(missing)}, not "
                "installed here; pip install mlflow (or use an http(s):// tracking server)")
    return None
