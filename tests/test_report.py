"""The run directory: history files, atomic writes, model files and plots."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from round_records import make_record

from fedtune import report
from fedtune.model_file import CLASS_NAMES, class_names_of, encode_class_names, load_model_file
from fedtune.records import RECORD_COLUMNS
from fedtune.report import RunDirectory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path: Path) -> RunDirectory:
    return RunDirectory.create(tmp_path, "exp")


def leftover_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_history_json_holds_rounds_and_summary(run: RunDirectory) -> None:
    records = [make_record(r) for r in range(4)]

    for record in records:
        run.append_round(record)

    history = json.loads((run.path / "history.json").read_text())
    assert [row["round"] for row in history["rounds"]] == [0, 1, 2, 3]
    assert history["rounds"][0]["federated_accuracy"] is None
    summary = history["summary"]
    assert summary["rounds_completed"] == 3
    assert summary["best_metric"] == "central_accuracy"
    assert summary["best_round"] == 3
    assert summary["bytes_sent_total"] == sum(r.bytes_sent for r in records)
    assert summary["bytes_sent_backbone_total"] == 18_600_000
    assert RunDirectory.load_history(run.path / "history.json") == records
    assert RunDirectory.load_history(run.path) == records  # the folder works too


def test_history_csv_columns_values_and_empty_cells(run: RunDirectory) -> None:
    records = [make_record(0), make_record(1), make_record(2, extra={"proximal_term": 0.02, "zeta": 3.5})]

    for record in records:
        run.append_round(record)

    with open(run.path / "history.csv", newline="") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    assert header == [*RECORD_COLUMNS, "proximal_term", "zeta"]
    assert header[:3] == ["round", "trainable_blocks", "clients_sampled"]
    assert len(body) == 3
    by_name = [dict(zip(header, row, strict=True)) for row in body]
    assert by_name[0]["train_loss"] == ""  # None is an empty cell
    assert by_name[0]["proximal_term"] == ""  # round 0 has no extra metrics
    assert by_name[1]["zeta"] == ""
    for record, row in zip(records, by_name, strict=True):
        assert int(row["round"]) == record.round
        assert row["trainable_blocks"] == record.trainable_blocks
        assert int(row["bytes_sent"]) == record.bytes_sent
        assert float(row["central_accuracy"]) == record.central_accuracy  # exact round trip
        assert float(row["seconds"]) == record.seconds
    assert float(by_name[2]["zeta"]) == 3.5


def test_repeated_round_replaces_it_and_later_ones(run: RunDirectory) -> None:
    for r in range(4):
        run.append_round(make_record(r))

    run.append_round(make_record(2, seconds=99.0))

    assert [(r.round, r.seconds) for r in run.records] == [(0, 0.5), (1, 1.5), (2, 99.0)]
    assert RunDirectory(run.path).records == run.records  # reopening continues the same history


def test_extra_key_shadowing_a_column_is_refused(run: RunDirectory) -> None:
    with pytest.raises(ValueError, match="seconds"):
        run.append_round(make_record(1, extra={"seconds": 1.0}))


def test_failed_write_leaves_previous_history_and_no_temp_file(run: RunDirectory) -> None:
    run.append_round(make_record(0))
    run.append_round(make_record(1))
    json_before = (run.path / "history.json").read_bytes()
    csv_before = (run.path / "history.csv").read_bytes()

    # json.dump streams its output, so it writes part of the file before meeting the object it
    # cannot serialise: a failure half-way through the write.
    with pytest.raises(TypeError):
        run.append_round(make_record(2, extra={"broken": object()}))

    assert (run.path / "history.json").read_bytes() == json_before
    assert (run.path / "history.csv").read_bytes() == csv_before
    assert leftover_temp_files(run.path) == []
    assert [r.round for r in run.records] == [0, 1]
    run.append_round(make_record(2))
    assert [r.round for r in RunDirectory.load_history(run.path)] == [0, 1, 2]


def test_no_temp_files_after_every_kind_of_write(run: RunDirectory) -> None:
    run.write_config(json.dumps({"name": "exp", "train": {"lr": 0.01}}))
    run.append_round(make_record(0))
    run.append_round(make_record(1))
    run.write_summary({"stop_reason": "rounds"})
    run.save_model({"w": torch.ones(2)}, {})
    run.write_plots()

    assert leftover_temp_files(run.path) == []


def test_config_written_as_json_and_yaml(run: RunDirectory) -> None:
    config = {"name": "exp", "train": {"lr": 0.01, "unfreeze": [{"from_round": 3, "trainable_blocks": "all"}]}}

    path = run.write_config(json.dumps(config))

    assert path == run.path / "config.json"
    assert json.loads(path.read_text()) == config
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == config


def test_summary_written(run: RunDirectory) -> None:
    path = run.write_summary({"stop_reason": "early stopping", "best_round": 4})

    assert json.loads(path.read_text()) == {"stop_reason": "early stopping", "best_round": 4}


def test_run_directory_names_are_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed clock: three runs started within the same second.
    monkeypatch.setattr(report, "_timestamp", lambda: "20250101-120000")

    paths = [RunDirectory.create(tmp_path / "runs" / "nested", "exp").path for _ in range(3)]

    assert [p.name for p in paths] == ["exp-20250101-120000", "exp-20250101-120000-1", "exp-20250101-120000-2"]
    assert all(p.is_dir() for p in paths)


def test_model_round_trip_with_metadata(run: RunDirectory) -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"head.weight": weight.t(), "head.bias": torch.zeros(4), "step": torch.tensor(7)}
    metadata = {"backbone": "tiny", "config": json.dumps({"name": "exp"})}

    path = run.save_model(state, metadata)
    tensors, loaded_metadata = load_model_file(path)

    assert path == run.path / "model.safetensors"
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor)
    assert loaded_metadata == metadata


def test_class_names_travel_as_a_list_and_older_files_still_read(run: RunDirectory) -> None:
    classes = ["cat,dog", "bird", 'quote " and \\ backslash', "ünïcode"]
    path = run.save_model({"w": torch.ones(1)}, {CLASS_NAMES: encode_class_names(classes)})

    assert class_names_of(load_model_file(path)[1], source=path) == classes
    assert class_names_of({"classes": "ants,bees"}, source=path) == ["ants", "bees"]  # before CLASS_NAMES
    for broken in ({CLASS_NAMES: "ants,bees"}, {CLASS_NAMES: "[1, 2]"}, {CLASS_NAMES: "[]"}, {}):
        with pytest.raises(ValueError, match=r"model\.safetensors: metadata .*class names"):
            class_names_of(broken, source=path)


def test_an_output_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("a file where the runs should go")
    with pytest.raises(ValueError, match=r"cannot make the output folder .*runs \(output\.dir\)"):
        RunDirectory.create(tmp_path / "runs", "exp")
    with pytest.raises(ValueError, match=r"cannot make the output folder .*runs/below \(output\.dir\)"):
        RunDirectory.create(tmp_path / "runs" / "below", "exp")


def test_model_metadata_must_be_strings(run: RunDirectory) -> None:
    with pytest.raises(TypeError, match="round"):
        run.save_model({"w": torch.ones(1)}, {"round": 3})  # type: ignore[dict-item]


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model_file(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08" + b"\x00" * 7 + b"{}"])
def test_corrupt_model_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)

    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model_file(path)


def test_truncated_model_file(run: RunDirectory) -> None:
    path = run.save_model({"w": torch.ones(64)}, {"k": "v"})
    path.write_bytes(path.read_bytes()[:-16])

    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model_file(path)


def test_plots_are_png_files(run: RunDirectory) -> None:
    for r in range(5):
        run.append_round(make_record(r))

    paths = run.write_plots()

    assert [p.name for p in paths] == ["accuracy.png", "bytes.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 1000


def test_plots_skip_what_has_no_data(run: RunDirectory) -> None:
    assert run.write_plots() == []

    run.append_round(make_record(0))  # round 0 alone: an accuracy, but no traffic
    assert [p.name for p in run.write_plots()] == ["accuracy.png"]

    blank = dict(federated_accuracy=None, central_accuracy=None)
    other = RunDirectory.create(run.path.parent, "blank")
    other.append_round(make_record(1, **blank))
    assert [p.name for p in other.write_plots()] == ["bytes.png"]


def test_history_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text('{"rounds": [{"round": 1, "colour": "red"}]}')

    with pytest.raises(ValueError, match="not a fedtune history"):
        RunDirectory.load_history(tmp_path / "history.json")
    with pytest.raises(FileNotFoundError):
        RunDirectory.load_history(tmp_path / "missing.json")


def test_the_accuracy_plot_joins_the_rounds_that_had_federated_evaluation(run: RunDirectory) -> None:
    from fedtune.plots import draw_accuracy, figure_of

    # Federated evaluation every 2 rounds and in the last (federation.evaluation.every: 2, rounds: 5).
    records = [make_record(0)] + [
        make_record(r) if r in (2, 4, 5) else
        make_record(r, evaluations_sampled=0, federated_loss=None, federated_accuracy=None)
        for r in range(1, 6)
    ]
    figure = figure_of(draw_accuracy, records, "exp")
    assert figure is not None
    lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()}
    assert lines["central (server's held-out set)"] == [0, 1, 2, 3, 4, 5]
    assert lines["federated (clients' validation splits in the rounds that had one)"] == [2, 4, 5]

    for record in records:
        run.append_round(record)
    assert [p.name for p in run.write_plots()] == ["accuracy.png", "bytes.png"]
    with (run.path / "history.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["evaluations_sampled"], row["federated_accuracy"]) for row in rows[1:3]] == [("0", ""), ("", "0.55")]


def test_the_privacy_plot_names_each_client_and_past_ten_the_largest_spender() -> None:
    from fedtune.plots import draw_epsilon, figure_of

    def records(clients: int) -> list:
        return [make_record(r, extra={**{f"epsilon_client_{c}": 0.1 * r * (c + 1) for c in range(clients)},
                                      "epsilon_max": 0.1 * r * clients}) for r in range(1, 4)]

    names = {0: "client 0 (node 8431…)", 1: "client 1 (node 1207…)", 2: "client 2 (node 5550…)"}
    figure = figure_of(partial(draw_epsilon, budget=3.0, client_names=names), records(3), "exp")
    assert figure is not None
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels[:3] == list(names.values())

    figure = figure_of(partial(draw_epsilon, budget=3.0, client_names={11: "client 11 (node 9999…)"}),
                       records(12), "exp")
    assert figure is not None
    assert [text.get_text() for text in figure.axes[0].texts] == ["client 11 (node 9999…)"]
