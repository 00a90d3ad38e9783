"""A round's record read back from history.json: every field of the form the record declares, or refused by name."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from round_records import make_record

from fedtune.records import ClientSpread, record_from_dict
from fedtune.report import RunDirectory


def test_a_record_round_trips_through_its_json_form() -> None:
    record = make_record(2, client_problems={"node 3": "update norm 9.1 over the bound 3.0: left out"},
                         client_accuracy={"client 0": 0.5, "client 1": 1.0}, clients_accuracy_worst10=0.5)

    assert record_from_dict(json.loads(json.dumps(asdict(record)))) == record


def test_optional_fields_may_be_left_out_and_numbers_may_be_whole() -> None:
    row = asdict(make_record(1))
    for name in ("updates_clipped", "extra", "client_problems"):
        del row[name]
    row["seconds"] = 2  # as a file written by hand or by another tool may have it

    record = record_from_dict(row)

    assert record.updates_clipped == 0 and record.extra == {} and record.seconds == 2


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"round": "3"}, "'round' holds str"),
        ({"round": 2.5}, "'round' holds float"),
        ({"bytes_sent": True}, "'bytes_sent' holds bool"),
        ({"central_accuracy": "0.9"}, "'central_accuracy' holds str"),
        ({"trainable_blocks": 0}, "'trainable_blocks' holds int"),
        ({"seconds": None}, "'seconds' holds NoneType"),
        ({"extra": {"proximal_term": "high"}}, "'extra' holds dict"),
        ({"extra": [1.0]}, "'extra' holds list"),
        ({"client_problems": {"node 1": 7}}, "'client_problems' holds dict"),
        ({"client_accuracy": {"client 1": "0.9"}}, "'client_accuracy' holds dict"),
        ({"clients_accuracy_worst10": "low"}, "'clients_accuracy_worst10' holds str"),
        ({"colour": "red"}, r"unknown round fields \['colour'\]"),
    ],
)
def test_a_field_of_the_wrong_form_is_refused_by_name(change: dict[str, object], named: str) -> None:
    row = asdict(make_record(1)) | change

    with pytest.raises(ValueError, match=named):
        record_from_dict(row)


def test_missing_fields_and_rows_that_are_not_objects_are_refused() -> None:
    row = asdict(make_record(1))
    del row["bytes_received"]

    with pytest.raises(ValueError, match=r"missing: \['bytes_received'\]"):
        record_from_dict(row)
    with pytest.raises(ValueError, match="a round is a JSON object, not list"):
        record_from_dict([1, 2])


def test_a_resumed_run_refuses_a_damaged_history_naming_the_file(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "exp")
    run.append_round(make_record(0))
    run.append_round(make_record(1))
    history = json.loads((run.path / "history.json").read_text())
    history["rounds"][1]["bytes_sent"] = "many"
    (run.path / "history.json").write_text(json.dumps(history))

    with pytest.raises(ValueError, match=r"history\.json: not a fedtune history file .*'bytes_sent' holds str"):
        RunDirectory(run.path)
    for broken in ('{"rounds": 3}', "[1]", '{"rounds": [1]}', "\xff"):
        (run.path / "history.json").write_text(broken, encoding="latin-1")
        with pytest.raises(ValueError, match="not a fedtune history file"):
            RunDirectory.load_history(run.path)



def test_a_round_without_federated_evaluation_says_so_and_older_rows_read_as_unrecorded() -> None:
    skipped = make_record(1, evaluations_sampled=0, federated_loss=None, federated_accuracy=None)
    row = json.loads(json.dumps(asdict(skipped)))
    assert (row["evaluations_sampled"], row["federated_accuracy"], row["federated_loss"]) == (0, None, None)
    assert record_from_dict(row) == skipped

    del row["evaluations_sampled"]  # a history written before fedtune recorded it
    assert record_from_dict(row).evaluations_sampled is None
    with pytest.raises(ValueError, match="'evaluations_sampled' holds str"):
        record_from_dict(asdict(skipped) | {"evaluations_sampled": "none"})


def test_the_spread_of_client_accuracies_counts_each_client_once_and_names_the_worst_10_percent() -> None:
    ten = ClientSpread.of([0.9, 0.1, 0.8, 0.7, 0.95, 0.85, 0.6, 0.75, 0.65, 1.0])
    assert ten.worst10 == 0.1 and ten.median == pytest.approx(0.775) and ten.mean == pytest.approx(0.73)
    twenty_five = ClientSpread.of([0.2, 0.4, 0.3] + [1.0] * 22)  # the worst 10%: ceil(2.5) = 3 clients
    assert twenty_five.worst10 == pytest.approx(0.3)
    assert ClientSpread.of([0.4]).columns() == {"clients_accuracy_mean": 0.4, "clients_accuracy_median": 0.4,
                                                "clients_accuracy_worst10": 0.4}
    assert set(ClientSpread.of([]).columns().values()) == {None}  # empty cells in history.csv


def test_the_summary_names_the_last_evaluations_worst_client(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "exp")
    run.append_round(make_record(0))
    run.append_round(make_record(1, client_accuracy={"client 0": 0.9, "client 1": 0.2},
                                 **ClientSpread.of([0.9, 0.2]).columns()))
    run.append_round(make_record(2))  # no federated evaluation this round

    final = json.loads((run.path / "history.json").read_text())["summary"]["final_clients_accuracy"]

    assert final == {"round": 1, "clients": 2, "mean": 0.55, "median": 0.55, "worst10": 0.2,
                     "worst_client": "client 1", "worst_client_accuracy": 0.2}
    assert [p.name for p in run.write_plots()] == ["accuracy.png", "clients.png", "bytes.png"]


def test_two_nodes_claiming_one_client_name_keep_their_own_accuracies() -> None:
    from fedtune.server.round import _by_name

    # A node's name comes from the partition it claims: a hostile one may claim another's.
    named = _by_name({1001: 0.9, 2002: 0.1, 3003: 0.5}, name_of=lambda node: "client 0" if node < 3000 else "client 2")

    assert named == {"client 0": 0.9, "client 0 [node 2002]": 0.1, "client 2": 0.5}
