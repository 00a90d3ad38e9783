"""TensorBoard and MLflow output: what each tool's own reader finds after a run, a resume, and a backend failure."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from round_records import make_record
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import ConfigError, ExperimentConfig, MLflowConfig, load_config, parse_config
from fedtune.model_file import MODEL_FILE
from fedtune.monitoring import (
    MAX_PARAM_CHARS,
    TENSORBOARD_DIR,
    RunMonitor,
    config_params,
    mlflow_problem,
    scalars_of,
)
from fedtune.report import SUMMARY_JSON, RunDirectory
from fedtune.server.checkpoint import Checkpoint
from fedtune.simulation import simulate

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TAGS = {
    "central/loss", "central/accuracy", "federated/loss", "federated/accuracy", "train/loss", "train/accuracy",
    "bytes/sent", "bytes/received", "clients/ok", "clients/rejected", "clients/failed", "bound/updates_rejected_norm",
}


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local MLflow file store: MLflow 3 keeps it behind MLFLOW_ALLOW_FILE_STORE."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def monitored(tmp_path: Path, *, tensorboard: bool = False, mlflow: dict[str, object] | None = None,
              **sections: object) -> ExperimentConfig:
    output: dict[str, object] = {"dir": str(tmp_path / "runs"), "tensorboard": tensorboard}
    if mlflow is not None:
        output["mlflow"] = mlflow
    return parse_config({"output": output, **sections})


def scalars(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, round(event.value, 6)) for event in accumulator.Scalars(tag)]


def only_run(store: str, experiment: str = "fedtune") -> str:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return str(runs[0].info.run_id)


# --- what goes out -------------------------------------------------------------------------------------------


def test_a_round_becomes_tagged_scalars_and_none_is_left_out() -> None:
    record = make_record(2, extra={"epsilon_client_7": 1.5, "epsilon_user": 2.0, "proximal_term": 0.1,
                                   "bad key\nforged": 3.0}, clients_accuracy_worst10=0.25)
    values = scalars_of(record)
    assert values["clients/accuracy_worst10"] == 0.25 and "clients/accuracy_median" not in values
    assert values["central/accuracy"] == pytest.approx(record.central_accuracy)
    assert values["bytes/sent"] == record.bytes_sent and values["clients/rejected"] == 1
    assert values["privacy/epsilon_client_7"] == 1.5 and values["privacy/epsilon_user"] == 2.0
    assert values["extra/proximal_term"] == 0.1
    assert not any("forged" in tag for tag in values)  # a key outside [A-Za-z0-9_.-] would break MLflow's rules
    baseline = scalars_of(make_record(0))
    assert "train/loss" not in baseline and "federated/accuracy" not in baseline  # None: no client trained yet
    assert baseline["central/accuracy"] == 0.1


def test_a_round_without_federated_evaluation_has_no_federated_scalars_and_says_none_was_sampled() -> None:
    values = scalars_of(make_record(3, evaluations_sampled=0, federated_loss=None, federated_accuracy=None))
    assert not any(tag.startswith("federated/") for tag in values)
    assert values["evaluations/sampled"] == 0 and values["central/accuracy"] == pytest.approx(0.5)
    assert scalars_of(make_record(3, evaluations_sampled=5))["evaluations/sampled"] == 5
    assert "evaluations/sampled" not in scalars_of(make_record(3))  # a row written before it was recorded


def test_config_params_are_flat_bounded_and_keyed_by_the_schema(tmp_path: Path) -> None:
    many = {f"stage_{i:03d}_with_a_long_name": 0.5 for i in range(60)}
    cfg = monitored(tmp_path, train={"lr": 0.02, "lr_multipliers": many, "unfreeze": [{"from_round": 2,
                                                                                       "trainable_blocks": 1}]})
    params = config_params(cfg)
    assert params["train.lr"] == "0.02" and params["name"] == "experiment" and params["output.tensorboard"] == "false"
    assert json.loads(params["train.unfreeze"]) == [{"from_round": 2, "trainable_blocks": 1}]
    assert all(len(value) <= MAX_PARAM_CHARS for value in params.values())
    assert params["train.lr_multipliers"].endswith("characters; whole in config.json)")
    assert not any("stage_000" in key for key in params)  # the user's names stay inside one value


# --- TensorBoard ----------------------------------------------------------------------------------------------


def test_tensorboard_reader_loads_every_round_by_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = monitored(tmp_path, tensorboard=True)
    with RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False) as monitor:
        for round_ in (1, 2):
            monitor.write(make_record(round_, extra={"epsilon_client_1": 0.5 * round_}))
        monitor.close(run_dir)

    accumulator = scalars(run_dir / TENSORBOARD_DIR)
    assert EXPECTED_TAGS <= set(accumulator.Tags()["scalars"])
    assert steps(accumulator, "central/accuracy") == [(0, 0.1), (1, 0.433333), (2, 0.466667)]
    assert [step for step, _ in steps(accumulator, "train/loss")] == [1, 2]  # round 0 trains nothing
    assert steps(accumulator, "privacy/epsilon_client_1") == [(1, 0.5), (2, 1.0)]


def test_a_resumed_run_shows_each_round_once_with_its_replayed_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = monitored(tmp_path, tensorboard=True)
    killed = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
    for round_ in (1, 2):
        killed.write(make_record(round_))
    # Killed after round 2 was written but before its checkpoint: the resumed run plays round 2 again.
    resumed = RunMonitor.open(cfg, run_dir, history=[make_record(0), make_record(1)], resumed=True)
    resumed.write(make_record(2, central_accuracy=0.9))
    resumed.write(make_record(3))
    resumed.close(run_dir)

    accumulator = scalars(run_dir / TENSORBOARD_DIR)
    assert steps(accumulator, "central/accuracy") == [(0, 0.1), (1, 0.433333), (2, 0.9), (3, 0.5)]
    assert [step for step, _ in steps(accumulator, "bytes/sent")] == [0, 1, 2, 3]


def test_tensorboard_switched_on_for_a_resume_gets_the_rounds_before_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = monitored(tmp_path, tensorboard=True)  # the crashed run had it off: no tensorboard/ yet
    resumed = RunMonitor.open(cfg, run_dir, history=[make_record(0), make_record(1)], resumed=True)
    resumed.write(make_record(2))
    resumed.close(run_dir)

    accumulator = scalars(run_dir / TENSORBOARD_DIR)
    assert [step for step, _ in steps(accumulator, "central/accuracy")] == [0, 1, 2]


def test_tensorboard_that_cannot_write_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / TENSORBOARD_DIR).write_text("a file where the folder would go")
    cfg = monitored(tmp_path, tensorboard=True)
    with caplog.at_level(logging.WARNING, logger="fedtune.monitoring"):
        monitor = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
        monitor.write(make_record(1))
        monitor.close(run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedtune.monitoring"]
    assert len(warnings) == 1 and warnings[0].startswith("monitoring: TensorBoard stopped, the run goes on")
    assert monitor.sinks == []


# --- MLflow -----------------------------------------------------------------------------------------------------


def test_mlflow_gets_metrics_by_step_params_and_artifacts(tmp_path: Path, file_store: str) -> None:
    run_dir = tmp_path / "runs" / "experiment-1"
    run_dir.mkdir(parents=True)
    cfg = monitored(tmp_path, mlflow={"tracking_uri": file_store}, train={"lr": 0.03})
    monitor = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
    monitor.write(make_record(1, extra={"epsilon_user": 0.7}))
    (run_dir / MODEL_FILE).write_bytes(b"model bytes")
    (run_dir / SUMMARY_JSON).write_text("{}")
    monitor.close(run_dir)

    client = MlflowClient(file_store)
    run = client.get_run(only_run(file_store))
    assert run.info.status == "FINISHED" and run.info.run_name == "experiment-1"
    assert run.data.params["train.lr"] == "0.03" and run.data.tags["fedtune.resumed"] == "false"
    history = client.get_metric_history(run.info.run_id, "central/accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.1), (1, 0.433333)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "privacy/epsilon_user")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {MODEL_FILE, SUMMARY_JSON} <= artifacts


def test_a_sqlite_store_works_as_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts in ./mlruns
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = monitored(tmp_path, mlflow={"tracking_uri": store})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MODEL_FILE).write_bytes(b"model bytes")
    monitor = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
    monitor.write(make_record(1))
    monitor.close(run_dir)

    client = MlflowClient(store)
    run_id = only_run(store)
    assert [m.step for m in client.get_metric_history(run_id, "bytes/received")] == [0, 1]
    assert MODEL_FILE in {a.path for a in client.list_artifacts(run_id)}


def test_a_resumed_run_is_a_new_mlflow_run_holding_each_round_once(tmp_path: Path, file_store: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = monitored(tmp_path, mlflow={"tracking_uri": file_store, "experiment": "resumes"})
    RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False).write(make_record(1))  # then killed
    resumed = RunMonitor.open(cfg, run_dir, history=[make_record(0), make_record(1)], resumed=True)
    resumed.write(make_record(2))
    resumed.close(run_dir)

    client = MlflowClient(file_store)
    experiment = client.get_experiment_by_name("resumes")
    assert experiment is not None
    latest = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["fedtune.resumed"] == "true")
    assert [m.step for m in client.get_metric_history(latest.info.run_id, "bytes/sent")] == [0, 1, 2]


def test_an_experiment_name_with_dots_and_slashes_stays_a_name(tmp_path: Path, file_store: str) -> None:
    # Never a path here: the store keeps experiments in folders named by id, the name inside them.
    store_parent = tmp_path / "outside"
    store_parent.mkdir()
    before = set(tmp_path.rglob("*"))
    cfg = monitored(tmp_path, mlflow={"tracking_uri": file_store, "experiment": "../../outside/escaped"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False).close(run_dir)

    assert only_run(file_store, "../../outside/escaped")
    created = {p for p in set(tmp_path.rglob("*")) - before if p != run_dir}
    assert all(p.is_relative_to(tmp_path / "mlruns") for p in created), sorted(created)
    assert not any(store_parent.iterdir())


def test_a_tracking_server_that_is_down_does_not_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = monitored(tmp_path, tensorboard=True, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="fedtune.monitoring"):
        monitor = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
        monitor.write(make_record(1))
        monitor.close(run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedtune.monitoring"]
    assert len(warnings) == 1 and "MLflow stopped" in warnings[0] and len(warnings[0]) < 500
    assert [step for step, _ in steps(scalars(run_dir / TENSORBOARD_DIR), "clients/ok")] == [0, 1]  # unharmed


def test_a_store_lost_mid_run_warns_once_and_tensorboard_goes_on(
    tmp_path: Path, file_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = monitored(tmp_path, tensorboard=True, mlflow={"tracking_uri": file_store})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="fedtune.monitoring"):
        monitor = RunMonitor.open(cfg, run_dir, history=[make_record(0)], resumed=False)
        monitor.write(make_record(1))
        shutil.rmtree(tmp_path / "mlruns")  # the store is gone (a disk unmounted, a folder cleaned up)
        monitor.write(make_record(2))
        monitor.write(make_record(3))
        monitor.close(run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedtune.monitoring"]
    assert len(warnings) == 1 and "MLflow stopped" in warnings[0]
    assert [step for step, _ in steps(scalars(run_dir / TENSORBOARD_DIR), "clients/ok")] == [0, 1, 2, 3]


# --- config and preflight ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mlflow", "expected"),
    [
        ({"tracking_uri": "sqlite:///" + "x" * 10_000_000}, "at most 4096 characters"),
        ({"tracking_uri": 5}, "valid string"),
        ({"tracking_uri": ["file:///tmp/mlruns"]}, "valid string"),
        ({"tracking_uri": "mlruns"}, "tracking URI with a scheme"),
        ({"tracking_uri": "file:///tmp/ml runs"}, "tracking URI with a scheme"),
        ({"tracking_uri": "http://mlflow.example\n:5000"}, "tracking URI with a scheme"),
        ({"tracking_uri": "file:///tmp/mlruns", "experiment": "run\nINFO forged log line"}, "control characters"),
        ({"tracking_uri": "file:///tmp/mlruns", "experiment": "  "}, "not blank"),
        ({"tracking_uri": "file:///tmp/mlruns", "experiment": "e" * 300}, "at most 256 characters"),
        ({"tracking_uri": "file:///tmp/mlruns", "experimnet": "x"}, "unknown key"),
        ({"experiment": "x"}, "tracking_uri: Field required"),
        ("file:///tmp/mlruns", "valid dictionary"),
    ],
)
def test_bad_mlflow_settings_name_the_key_in_one_short_line(mlflow: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"output": {"mlflow": mlflow}})
    message = str(caught.value)
    assert "output.mlflow" in message and expected in message and len(message) < 400 and "\n" not in message


def test_credentials_in_the_tracking_uri_are_refused_without_repeating_them() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"output": {"mlflow": {"tracking_uri": "https://alice:s3cret@mlflow.example"}}})
    message = str(caught.value)
    assert "output.mlflow.tracking_uri: must not hold credentials" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "s3cret" not in message


def test_tensorboard_is_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"output.tensorboard: Input should be a valid boolean \(got 'yes'\)"):
        parse_config({"output": {"tensorboard": "yes"}})


def test_mlflow_not_installed_fails_check_at_once_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "experiment.yaml"
    config.write_text(f"output:\n  dir: {tmp_path / 'runs'}\n  mlflow:\n    tracking_uri: sqlite:///{tmp_path}/m.db\n")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    result = CliRunner().invoke(cli, ["check", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "output.mlflow: MLflow is not installed; pip install 'fedtune[mlflow]'" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_file_store_mlflow_refuses_is_caught_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = tmp_path / "experiment.yaml"
    store = (tmp_path / "mlruns").as_uri()
    config.write_text(f"output:\n  dir: {tmp_path / 'runs'}\n  mlflow:\n    tracking_uri: {store}\n")
    result = CliRunner().invoke(cli, ["simulate", str(config)])
    assert result.exit_code == 2
    assert "output.mlflow.tracking_uri: this MLflow refuses file: stores unless MLFLOW_ALLOW_FILE_STORE=true" in (
        result.output)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "postgresql+psycopg2://db.example/mlflow"])
def test_a_database_store_without_sqlalchemy_is_caught_before_the_run(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "alembic", None)  # as where only mlflow-skinny is installed
    problem = mlflow_problem(MLflowConfig(tracking_uri=uri))
    assert problem is not None and problem.startswith("output.mlflow.tracking_uri: a ")
    assert "needs alembic, not installed here; pip install mlflow" in problem


# --- a real run -------------------------------------------------------------------------------------------------


def quickstart(tmp_path: Path, store: str) -> ExperimentConfig:
    """3 clients, 32 px, 2 rounds, the head only; both outputs on."""
    return load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=3", "federation.rounds=2", "train.trainable_blocks=0",
        "train.unfreeze=[]", f"output.dir={tmp_path / 'runs'}", "output.tensorboard=true",
        f"output.mlflow={{tracking_uri: '{store}', experiment: quickstart}}",
    ])


def check_both_tools(run_dir: Path, store: str, *, resumed: bool) -> None:
    """Each round once in TensorBoard and in the (last) MLflow run, as history.json has it; the model logged."""
    accumulator = scalars(run_dir / TENSORBOARD_DIR)
    assert EXPECTED_TAGS <= set(accumulator.Tags()["scalars"])
    history = RunDirectory.load_history(run_dir)
    assert steps(accumulator, "central/accuracy") == [(r.round, round(r.central_accuracy or 0, 6)) for r in history]
    assert [step for step, _ in steps(accumulator, "federated/accuracy")] == [1, 2]
    assert all(value > 0 for _, value in steps(accumulator, "bytes/sent")[1:])

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = {r.data.tags["fedtune.resumed"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == ({"false", "true"} if resumed else {"false"})
    if resumed:
        assert runs["false"].info.status == "FAILED"  # the killed server's
    run = runs[str(resumed).lower()]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["federation.num_clients"] == "3" and run.data.params["data.image_size"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "central/accuracy")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "clients/ok")] == [0, 1, 2]
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id)}
    assert artifacts[MODEL_FILE] == (run_dir / MODEL_FILE).stat().st_size
    assert SUMMARY_JSON in artifacts


def test_a_simulation_leaves_tensorboard_files_and_an_mlflow_run(tmp_path: Path, file_store: str) -> None:
    outcome = simulate(quickstart(tmp_path, file_store))
    assert outcome.rounds_completed == 2
    check_both_tools(outcome.run_dir, file_store, resumed=False)


@pytest.mark.slow
def test_a_simulation_killed_and_resumed_leaves_each_round_once_in_both_tools(
    tmp_path: Path, file_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after round 2 was recorded and monitored, before its checkpoint: started again, it plays round 2 again."""
    cfg = quickstart(tmp_path, file_store)
    save = Checkpoint.save

    def killed_at_round_2(self: Checkpoint, folder: Path) -> Path:
        if self.round == 2:
            raise KeyboardInterrupt("the server is killed")
        return save(self, folder)

    monkeypatch.setattr(Checkpoint, "save", killed_at_round_2)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):  # in simulation the ServerApp runs in a thread
        simulate(cfg)
    monkeypatch.setattr(Checkpoint, "save", save)
    outcome = simulate(cfg)
    assert outcome.rounds_completed == 2
    check_both_tools(outcome.run_dir, file_store, resumed=True)
