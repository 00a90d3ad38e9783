"""The update bound (strategy.bound): each update's norm against the round's median, each client's weight capped."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg
from replies import evaluate_reply, train_reply

from fedtune import messages as keys
from fedtune.config import UpdateBoundConfig, parse_config
from fedtune.records import RoundRecord
from fedtune.report import RunDirectory
from fedtune.strategies.bound import UpdateBound, bound_applies, lower_median
from fedtune.strategies.validation import check_evaluate_replies, check_train_replies, specs_of, train_metric_specs

pytestmark = pytest.mark.usefixtures("server_identity")

SIZE = 200
RNG = np.random.default_rng(0)
START = {"w": RNG.normal(size=SIZE).astype(np.float32), "bn.running_var": np.ones(8, np.float32)}
SENT = ArrayRecord({k: Array(v) for k, v in START.items()})
BUFFERS = frozenset({"bn.running_var"})


def _honest(node: int, *, scale: float = 1.0) -> dict[str, np.ndarray]:
    """An honest update: a common direction, a little noise; statistics moving ~100 x more than weights."""
    rng = np.random.default_rng(100 + node)
    direction = np.linspace(-1, 1, SIZE).astype(np.float32) * 0.05
    return {
        "w": START["w"] + scale * (direction + rng.normal(scale=0.01, size=SIZE).astype(np.float32)),
        "bn.running_var": START["bn.running_var"] * rng.uniform(1.5, 3.0, size=8).astype(np.float32),
    }


def _parsed(updates: list[dict[str, np.ndarray]], weights: list[int] | None = None) -> list[Message]:
    weights = weights or [100] * len(updates)
    replies = [train_reply(u, w, node=n) for n, (u, w) in enumerate(zip(updates, weights, strict=True))]
    checked = check_train_replies(replies, specs_of(SENT), metrics=train_metric_specs(dp_sgd=False), server_round=1,
                                  name_of=str)
    assert not checked.problems
    return sorted(checked.valid, key=lambda r: r.metadata.src_node_id)


def _bound(**settings: object) -> UpdateBound:
    return UpdateBound(UpdateBoundConfig(**settings), buffer_keys=BUFFERS)


def _node_name(node: int) -> str:
    return f"node {node} (partition {node})"


def _delta(reply: Message) -> np.ndarray:
    return reply.content[keys.ARRAYS]["w"].numpy().astype(np.float64) - START["w"]


def test_lower_median() -> None:
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([1.0, 1e6]) == 1.0  # of two, the lower: one hostile update cannot raise the bound
    assert lower_median([5.0]) == 5.0


@pytest.mark.parametrize(
    ("attack", "norm_ratio"),
    [(lambda d: d * 1e6, 1e6), (lambda d: -10 * d, 10), (lambda d: RNG.normal(scale=1.0, size=SIZE), 18)],
    ids=["scaled-1e6", "sign-flipped-x10", "noise"],
)
def test_an_outsized_update_is_rejected_named_and_explained(attack, norm_ratio: float,  # noqa: ANN001
                                                            caplog: pytest.LogCaptureFixture) -> None:
    updates = [_honest(n) for n in range(4)]
    hostile = dict(_honest(4))
    hostile["w"] = (START["w"] + attack(_honest(4)["w"] - START["w"])).astype(np.float32)
    replies = _parsed(updates + [hostile])

    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        result = _bound().apply(replies, SENT, server_round=3, name_of=_node_name)

    assert [r.metadata.src_node_id for r in result.kept] == [0, 1, 2, 3]
    assert [r.metadata.src_node_id for r in result.rejected] == [4]
    assert result.count("norm_rejected") == 1 and result.count("norm_clipped") == 0
    event = result.events[0]
    assert event.node == 4 and "its parameter update's norm" in event.detail
    assert "over strategy.bound.norm_ratio = 3" in event.detail
    ratio = float(event.detail.split(" is ")[1].split(" x ")[0])
    assert ratio > norm_ratio / 2
    assert "round 3: rejected the update of node 4 (partition 4): its parameter update's norm" in caplog.text


def test_honest_updates_of_different_sizes_all_pass() -> None:
    # Norms within 0.77-1.55 x the median on the quickstart task (10 clients, Dirichlet alpha 1).
    updates = [_honest(n, scale=s) for n, s in enumerate([0.7, 0.8, 1.0, 1.2, 1.6])]
    result = _bound().apply(_parsed(updates), SENT, server_round=1, name_of=str)
    assert len(result.kept) == 5 and not result.events


def test_statistics_are_bounded_against_statistics_not_weights() -> None:
    # Honest running statistics move far more than the weights: measured together, every update
    # would be judged by its statistics. A poisoned running variance is caught in its own group.
    updates = [_honest(n) for n in range(5)]
    result = _bound().apply(_parsed(updates), SENT, server_round=1, name_of=str)
    assert not result.events
    poisoned = dict(_honest(5))
    poisoned["bn.running_var"] = START["bn.running_var"] * 1000
    result = _bound().apply(_parsed(updates + [poisoned]), SENT, server_round=1, name_of=str)
    assert [r.metadata.src_node_id for r in result.rejected] == [5]
    assert "its statistics update's norm" in result.events[0].detail


def test_with_two_updates_a_hostile_one_cannot_drag_the_median_up() -> None:
    hostile = dict(_honest(1))
    hostile["w"] = START["w"] + 1e6
    result = _bound().apply(_parsed([_honest(0), hostile]), SENT, server_round=1, name_of=str)
    assert [r.metadata.src_node_id for r in result.rejected] == [1]


def test_clip_scales_an_outsized_update_down_to_the_bound() -> None:
    updates = [_honest(n) for n in range(4)]
    hostile = dict(_honest(4))
    hostile["w"] = START["w"] - 10 * (_honest(4)["w"] - START["w"])
    replies = _parsed(updates + [hostile])
    median = lower_median([float(np.linalg.norm(_delta(r))) for r in replies])

    result = _bound(norm_action="clip").apply(replies, SENT, server_round=1, name_of=str)

    assert len(result.kept) == 5 and result.count("norm_clipped") == 1
    clipped = result.kept[4]
    assert float(np.linalg.norm(_delta(clipped))) == pytest.approx(3 * median, rel=1e-5)
    # Only the group over the bound is scaled: the statistics are as sent by the client.
    np.testing.assert_array_equal(clipped.content[keys.ARRAYS]["bn.running_var"].numpy(), hostile["bn.running_var"])
    cosine = _delta(clipped) @ (hostile["w"] - START["w"]) / np.linalg.norm(_delta(clipped)) / np.linalg.norm(
        hostile["w"] - START["w"])
    assert cosine == pytest.approx(1.0, abs=1e-6)  # same direction, shorter


def test_two_sign_flipped_updates_of_five_outweigh_the_honest_ones_when_clipped_not_when_rejected() -> None:
    # Why the default is reject: clipped to 3 x the median, two -10 x updates still pull with 6
    # medians against the honest three's 3.
    honest = [_honest(n) for n in range(3)]
    hostile = []
    for n in (3, 4):
        update = dict(_honest(n))
        update["w"] = START["w"] - 10 * (_honest(n)["w"] - START["w"])
        hostile.append(update)
    direction = np.mean([u["w"] - START["w"] for u in honest], axis=0)
    moved = {}
    for action in ("clip", "reject"):
        result = _bound(norm_action=action).apply(_parsed(honest + hostile), SENT, server_round=1, name_of=str)
        arrays, _ = FedAvg().aggregate_train(1, result.kept)
        moved[action] = float((arrays["w"].numpy() - START["w"]) @ direction)
    assert moved["clip"] < 0 < moved["reject"]


def test_a_lying_num_examples_is_capped_to_the_ratio_of_the_median(caplog: pytest.LogCaptureFixture) -> None:
    replies = _parsed([_honest(n) for n in range(5)], weights=[200, 240, 260, 300, 10**12])
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        result = _bound().apply(replies, SENT, server_round=2, name_of=_node_name)
    weights = [r.content[keys.METRICS][keys.NUM_EXAMPLES] for r in result.kept]
    assert weights == [200, 240, 260, 300, 520]  # 2 x the median, 260
    assert result.count("weight_capped") == 1
    assert result.events[0].detail == (
        "num-examples 1000000000000 counts as 520 (strategy.bound.weight_ratio = 2 x the round's median 260)"
    )
    assert "round 2: capped the weight of the update of node 4 (partition 4)" in caplog.text


def test_a_modest_cap_is_logged_once_per_client_and_counted_every_round(caplog: pytest.LogCaptureFixture) -> None:
    # An honest client with twice the median's share, as a non-IID partition gives (quickstart: 204 vs 99),
    # beside one claiming far more: the first is noted once, the second warned of every round.
    bound = _bound()
    counts = []
    with caplog.at_level(logging.DEBUG, logger="fedtune.server"):
        for server_round in (1, 2, 3):
            replies = _parsed([_honest(n) for n in range(5)], weights=[99, 99, 99, 204, 10**6])
            counts.append(bound.apply(replies, SENT, server_round=server_round, name_of=_node_name).count(
                "weight_capped"))
    assert counts == [2, 2, 2]
    modest = [r for r in caplog.records if "update of node 3 " in r.getMessage()]
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in modest] == [(logging.INFO, "round 1")]
    assert "num-examples 204 counts as 198" in modest[0].getMessage()
    assert "logged once per client" in modest[0].getMessage()
    large = [r for r in caplog.records if "update of node 4 " in r.getMessage()]
    assert [r.levelno for r in large] == [logging.WARNING] * 3


def test_the_absolute_cap_applies_when_it_is_lower() -> None:
    replies = _parsed([_honest(n) for n in range(3)], weights=[200, 400, 900])
    result = _bound(max_examples=300).apply(replies, SENT, server_round=1, name_of=str)
    assert [r.content[keys.METRICS][keys.NUM_EXAMPLES] for r in result.kept] == [200, 300, 300]
    assert all("strategy.bound.max_examples = 300" in e.detail for e in result.events)


def test_a_rejected_update_does_not_move_the_median_weight() -> None:
    big = dict(_honest(3))
    big["w"] = START["w"] + 1e6
    replies = _parsed([_honest(n) for n in range(3)] + [big, dict(big)], weights=[100, 100, 100, 10**9, 10**9])
    result = _bound().apply(replies, SENT, server_round=1, name_of=str)
    assert result.count("norm_rejected") == 2
    assert [r.content[keys.METRICS][keys.NUM_EXAMPLES] for r in result.kept] == [100, 100, 100]


def test_nothing_is_bounded_when_switched_off() -> None:
    hostile = dict(_honest(1))
    hostile["w"] = START["w"] + 1e6
    replies = _parsed([_honest(0), hostile, _honest(2)], weights=[1, 10**12, 1])
    result = _bound(norm_ratio=None, weight_ratio=None).apply(replies, SENT, server_round=1, name_of=str)
    assert len(result.kept) == 3 and not result.events


def test_evaluation_weights_are_capped_too() -> None:
    replies = [evaluate_reply({keys.NUM_EXAMPLES: n, "loss": 0.1, "accuracy": 0.5}, node=i)
               for i, n in enumerate([50, 60, 10**12])]
    valid = check_evaluate_replies(replies, server_round=1, name_of=str).valid
    events = _bound().cap_weights(valid, what="evaluation", server_round=1, name_of=str)
    assert [e.node for e in events] == [2]
    (capped,) = [reply for reply in valid if reply.metadata.src_node_id == 2]
    assert capped.content[keys.METRICS][keys.NUM_EXAMPLES] == 120


@pytest.mark.parametrize(
    ("settings", "applies"),
    [
        ({}, True),
        ({"privacy": {"secure_aggregation": {"enabled": True}}}, False),
        ({"privacy": {"central": {"enabled": True}}}, False),
        ({"privacy": {"dp_sgd": {"enabled": True}}}, True),
        ({"strategy": {"bound": {"enabled": False}}}, False),
        ({"strategy": {"name": "krum", "bound": {"enabled": True}}}, True),
    ],
    ids=["default", "secagg", "central-dp", "dp-sgd", "off", "on"],
)
def test_where_the_bound_applies(settings: dict, applies: bool) -> None:
    assert bound_applies(parse_config(settings)) is applies


def test_the_bounds_work_is_counted_in_history_json_csv_and_summary(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "bounded")
    problems = {"node 7": "train update norm rejected: its parameter update's norm ...",
                "node 9": "train update weight capped: num-examples 1000000000000 counts as 780 (...)"}
    for server_round in (1, 2):
        run.append_round(RoundRecord(
            round=server_round, trainable_blocks="0", clients_sampled=5, clients_ok=4, clients_rejected=1,
            clients_failed=0, bytes_sent=1, bytes_received=1, bytes_sent_backbone=0, train_loss=0.5,
            train_accuracy=0.5, federated_loss=0.5, federated_accuracy=0.5, central_loss=0.5, central_accuracy=0.5,
            seconds=1.0, updates_rejected_norm=1, updates_clipped=0, weights_capped=1, evaluations_rejected=2,
            evaluations_failed=1, client_problems=problems if server_round == 2 else {"node 7": "late"},
        ))
    history = json.loads((run.path / "history.json").read_text())
    assert history["rounds"][1]["client_problems"] == problems
    summary = history["summary"]
    assert (summary["updates_rejected_norm_total"], summary["weights_capped_total"], summary["updates_clipped_total"],
            summary["clients_rejected_total"], summary["evaluations_rejected_total"],
            summary["evaluations_failed_total"]) == (2, 2, 0, 2, 4, 2)
    assert summary["problems_by_client"] == {
        "node 7": {"rounds": 2, "last_round": 2, "last_problem": problems["node 7"]},
        "node 9": {"rounds": 1, "last_round": 2, "last_problem": problems["node 9"]},
    }
    with open(run.path / "history.csv", newline="") as file:
        header, *rows = list(csv.reader(file))
    assert {"updates_rejected_norm", "updates_clipped", "weights_capped", "evaluations_rejected"} <= set(header)
    assert "client_problems" not in header  # free text per client: history.json only
    assert dict(zip(header, rows[1], strict=True))["weights_capped"] == "1"
    assert RunDirectory.load_history(run.path)[1].client_problems == problems
