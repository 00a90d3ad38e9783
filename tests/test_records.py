"""A round's record read back from history.json: every field of the form the record declares, or refused by name."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from round_records import make_record

from fedtune.records import record_from_dict
from fedtune.report import RunDirectory


def test_a_record_round_trips_through_its_json_form() -> None:
    record = make_record(2, client_problems={"node 3": "update norm 9.1 over the bound 3.0: left out"})

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
