"""Central DP with SecAgg+: clients clip, SecAgg+ sums, the server noises the sum; refusals under SecAgg+.

The toy clients' updates are known, so the test can compute the clipped sum the server must never
see, and test the aggregate against it plus noise of the configured scale. Ray workers import this
module by name to find its ClientApp (tests/ and the repository go on PYTHONPATH), so the server
side (fedtune.config pulls in timm: seconds per worker) is imported where it is used.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtune import messages as keys
from fedtune.client.app import _client_side_clipping
from fedtune.client.secure_aggregation import secure_aggregation_mod
from fedtune.protocol import RefusedMessage, error_reply

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.server.secure_aggregation import SecureRoundReport

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NUM_CLIENTS = 4
SIZE = 4000  # coordinates of the toy update: enough to test the noise's distribution
CLIPPING_NORM = 1.0
NORMS = (0.5, 3.0, 0.8, 10.0)  # of each partition's update: the second and the last are clipped
REFUSE_PARTITION = "test.refuse-partition"  # config entry: this partition refuses at its privacy budget
TIMEOUT = 60.0


def sent_arrays() -> ArrayRecord:
    """What the server sends: the head's float tensors (under central DP no statistics travel)."""
    rng = np.random.default_rng(0)
    return ArrayRecord({
        "stages.head.weight": Array(rng.normal(size=(SIZE - 10,)).astype(np.float32)),
        "stages.head.bias": Array(rng.normal(size=(10,)).astype(np.float32)),
    })


def update_of(partition: int) -> np.ndarray:
    """The change a partition's training makes to the sent tensors, flattened in their order."""
    direction = np.random.default_rng(1000 + partition).normal(size=SIZE)
    return NORMS[partition] * direction / np.linalg.norm(direction)


def train_config(*, clipping_norm: float = CLIPPING_NORM) -> ConfigRecord:
    return ConfigRecord({keys.CLIENT_CONFIG: '{"seed": 3}', keys.MODEL_HASH: "abc123",
                         keys.TRAINABLE_STAGES: ["head"], KEY_CLIPPING_NORM: clipping_norm})


# ----- the clients ---------------------------------------------------------------------------------

def _toy_train(msg: Message, context: Context) -> Message:
    """fedtune's train reply layout, with a known (unclipped) update in place of real training."""
    partition = int(context.node_config["partition-id"])
    if partition == int(msg.content[keys.CONFIG].get(REFUSE_PARTITION, -1)):
        return error_reply(msg, f"{keys.PRIVACY_REFUSAL}: this round would take epsilon past the target")
    sent = msg.content[keys.ARRAYS]
    update, start, trained = update_of(partition), 0, {}
    for name, array in sent.items():
        values = array.numpy()
        trained[name] = Array((values + update[start:start + values.size].reshape(values.shape)).astype(values.dtype))
        start += values.size
    # num-examples differ: under central DP they must not weigh.
    metrics = MetricRecord({keys.NUM_EXAMPLES: 7 + 13 * partition, "train_loss": float(partition)})
    return Message(RecordDict({keys.ARRAYS: ArrayRecord(trained), keys.METRICS: metrics}), reply_to=msg)


# fedtune's ClientApp mods, in its order: SecAgg+ outside, Flower's clipping inside.
central_app = ClientApp(mods=[secure_aggregation_mod, _client_side_clipping])
central_app.train()(_toy_train)


# ----- the server ---------------------------------------------------------------------------------

@dataclass
class Scenario:
    """One secure round under central DP; then what came of it."""

    noise_multiplier: float
    expected_clients: int
    refuse_partition: int = -1
    result: tuple[ArrayRecord, MetricRecord | None, SecureRoundReport] | None = None
    partitions: dict[int, int] | None = None  # node -> partition, from the clients' metrics


@pytest.fixture(scope="module")
def central_rounds() -> Iterator[dict[str, Scenario]]:
    from fedtune.config import SecureAggregationConfig
    from fedtune.server.secure_aggregation import secure_train_round
    from fedtune.strategies.central_dp import CentralNoise

    scenarios = {
        # Noise too small to matter: the aggregate is the clipped sum over the expected count (6,
        # not the 4 drawn), within the quantisation bound.
        "sum": Scenario(noise_multiplier=1e-9, expected_clients=6),
        "noise": Scenario(noise_multiplier=0.8, expected_clients=2),
        "refusal": Scenario(noise_multiplier=1e-9, expected_clients=4, refuse_partition=2),
    }
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(nodes := sorted(grid.get_node_ids())) < NUM_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.1)  # the simulated nodes connect shortly after the ServerApp starts
        noise_generator = np.random.default_rng(12345)  # the server's noise, seeded for the test
        for server_round, scenario in enumerate(scenarios.values(), start=1):
            config = train_config()
            config[REFUSE_PARTITION] = scenario.refuse_partition
            scenario.result = secure_train_round(
                grid, server_round=server_round, node_ids=nodes, arrays=sent_arrays(), config=config,
                settings=SecureAggregationConfig(enabled=True, reconstruction_threshold=0.5), timeout=TIMEOUT,
                noise=CentralNoise(scenario.noise_multiplier, CLIPPING_NORM, scenario.expected_clients,
                                   noise_generator),
            )

    with pytest.MonkeyPatch.context() as patch:
        # Ray workers inherit the environment: let them import this module's ClientApp by name.
        patch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        patch.setenv("OMP_NUM_THREADS", "1")
        run_simulation(server_app=server_app, client_app=central_app, num_supernodes=NUM_CLIENTS,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}})
    yield scenarios


def clipped_sum(partitions: list[int]) -> np.ndarray:
    total = np.zeros(SIZE)
    for partition in partitions:
        update = update_of(partition)
        total += update * min(1.0, CLIPPING_NORM / np.linalg.norm(update))
    return total


def released_update(result: tuple[ArrayRecord, MetricRecord | None, SecureRoundReport]) -> np.ndarray:
    aggregated = result[0]
    sent = sent_arrays()
    assert list(aggregated.keys()) == list(sent.keys())
    return np.concatenate([aggregated[name].numpy().astype(np.float64).ravel() - array.numpy().ravel()
                           for name, array in sent.items()])


def partitions_in(report: SecureRoundReport) -> list[int]:
    # The toy clients report their partition as their train loss.
    return sorted(int(metrics["train_loss"]) for metrics in report.client_metrics.values())


def quantization_bound(summed: int, expected: int) -> float:
    """|released - clipped sum / expected| per coordinate, at most: each client's stochastic rounding
    errs by less than one step 2c / T, the tensors are float32 (about 1e-7 of values near 1)."""
    from fedtune.config import SecureAggregationConfig

    settings = SecureAggregationConfig()
    return summed * 2 * settings.clipping_range / settings.quantization_range / expected + 1e-6


def test_the_aggregate_is_the_clipped_secure_sum_over_the_expected_count(central_rounds: dict[str, Scenario]) -> None:
    scenario = central_rounds["sum"]
    assert scenario.result is not None
    _, metrics, report = scenario.result
    assert partitions_in(report) == [0, 1, 2, 3] and not report.dropped
    expected = clipped_sum([0, 1, 2, 3]) / 6
    got = released_update(scenario.result)
    assert np.abs(got - expected).max() <= quantization_bound(4, 6)
    # Not the unclipped sum, nor the mean: far from both.
    assert np.abs(got - sum(update_of(p) for p in range(4)) / 6).max() > 100 * quantization_bound(4, 6)
    assert np.abs(got - expected * 6 / 4).max() > 100 * quantization_bound(4, 6)
    # Every client weighs the same, whatever its number of examples: the metrics too.
    assert metrics is not None and metrics["train_loss"] == pytest.approx(1.5)
    assert all(m[keys.NUM_EXAMPLES] == 1 for m in report.client_metrics.values())


def test_the_noise_on_the_secure_sum_has_the_configured_scale(central_rounds: dict[str, Scenario]) -> None:
    from scipy import stats

    scenario = central_rounds["noise"]
    assert scenario.result is not None
    residual = released_update(scenario.result) - clipped_sum([0, 1, 2, 3]) / 2
    stddev = 0.8 * CLIPPING_NORM / 2  # noise_multiplier x clipping_norm / expected clients
    # The seeded noise of SIZE coordinates against N(0, stddev^2): its mean, its variance
    # (chi-square with SIZE degrees of freedom), and its distribution (Kolmogorov-Smirnov).
    assert abs(residual.mean()) < 4 * stddev / math.sqrt(SIZE)
    chi_square = float(np.sum((residual / stddev) ** 2))
    assert 1e-4 < stats.chi2.cdf(chi_square, SIZE) < 1 - 1e-4, chi_square / SIZE
    assert stats.kstest(residual / stddev, "norm").pvalue > 1e-4


def test_a_refusal_under_secure_aggregation_is_reported_as_one(central_rounds: dict[str, Scenario]) -> None:
    scenario = central_rounds["refusal"]
    assert scenario.result is not None
    _, _, report = scenario.result
    # The refusing client's masks are removed with its neighbours' shares: the others' sum stands.
    assert partitions_in(report) == [0, 1, 3]
    got = released_update(scenario.result)
    assert np.abs(got - clipped_sum([0, 1, 3]) / 4).max() <= quantization_bound(3, 4)
    (refused, reason), = report.refused.items()
    assert report.dropped == {refused: "collect masked vectors"}
    assert reason == f"{keys.PRIVACY_REFUSAL}: this round would take epsilon past the target"


def train_message(config: ConfigRecord) -> Message:
    """A train message as it arrives at a node (outside a run, Message() cannot fill in the metadata)."""
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict({keys.ARRAYS: sent_arrays(), keys.CONFIG: config}), metadata=metadata)


def test_a_client_drawn_alone_adds_the_rounds_noise_to_its_clipped_update() -> None:
    from scipy import stats

    config = train_config()
    config[keys.OWN_NOISE_STDDEV] = 0.7
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    reply = _client_side_clipping(train_message(config), context, _toy_train)
    sent = sent_arrays()
    update = np.concatenate([reply.content[keys.ARRAYS][name].numpy().astype(np.float64).ravel() - array.numpy().ravel()
                             for name, array in sent.items()])
    clipped = update_of(3) * CLIPPING_NORM / NORMS[3]  # Flower's fixedclipping_mod, then the noise
    residual = (update - clipped) / 0.7
    assert abs(residual.mean()) < 4 / math.sqrt(SIZE) and abs(residual.std() - 1) < 0.05
    assert stats.kstest(residual, "norm").pvalue > 1e-4


@pytest.mark.parametrize(("value", "problem"), [
    (0.0, "must be a finite number in (0, 1e+12]"),
    (-1.0, "must be a finite number in (0, 1e+12]"),
    (float("nan"), "must be a finite number"),
    ("0.5", "must be a number, got str"),
    (None, "without " + KEY_CLIPPING_NORM),
])
def test_a_malformed_own_noise_is_refused(value: object, problem: str) -> None:
    from fedtune.protocol import parse_own_noise, parse_round_instruction

    config = train_config()
    if value is None:  # noise without the clipping norm it belongs to
        del config[KEY_CLIPPING_NORM]
        value = 0.5
    config[keys.OWN_NOISE_STDDEV] = value
    config[keys.SERVER_ROUND] = 1
    with pytest.raises(RefusedMessage, match=re.escape(problem)):
        parse_own_noise(config)
    with pytest.raises(RefusedMessage, match=re.escape(problem)):
        parse_round_instruction(RecordDict({keys.ARRAYS: sent_arrays(), keys.CONFIG: config}))


class _ReplyingGrid(Grid):
    """Answers every message with an error reply: the one call SecAgg+'s stages make of a grid."""

    def __init__(self, reason_of: dict[int, str]) -> None:
        self.reason_of = reason_of

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [error_reply(m, self.reason_of[m.metadata.dst_node_id]) for m in messages]

    def set_run(self, run: object) -> None:
        raise AssertionError("not called by SecAgg+'s stages")

    @property
    def run(self) -> Any:  # noqa: ANN401 - Flower's Run
        raise AssertionError("not called by SecAgg+'s stages")

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise AssertionError("not called by SecAgg+'s stages")

    def get_node_ids(self) -> list[int]:
        raise AssertionError("not called by SecAgg+'s stages")

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise AssertionError("not called by SecAgg+'s stages")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise AssertionError("not called by SecAgg+'s stages")


def test_a_clients_error_reason_is_noted_bounded_and_printable() -> None:
    # Under SecAgg+ the server tells a refusal from a dropout by the reason a client wrote: the
    # worst versions of it are long, multi-line, with terminal escapes.
    from fedtune.server.secure_aggregation import _ReasonsBySender, refusals
    from fedtune.text import MAX_REASON

    sprawling = f"{keys.PRIVACY_REFUSAL}: \nround 9: all good\n" + "x" * 10_000_000
    escaped = f"{keys.PRIVACY_REFUSAL}: spent \x1b[2J" + "y" * 10_000
    noted = _ReasonsBySender(_ReplyingGrid({1: sprawling, 2: escaped, 3: "out of memory"}))
    messages = [train_message(train_config()) for _ in range(3)]
    for node, message in enumerate(messages, start=1):
        message.metadata.dst_node_id = node
    noted.send_and_receive(messages)
    assert noted.reasons[3] == "out of memory"
    assert all(len(reason) <= MAX_REASON + 3 and reason.isprintable() for reason in noted.reasons.values())
    # Its last line is what a client's reason says (tracebacks end there): no refusal.
    assert noted.reasons[1].startswith("xxx")
    # A refusal is the client's own word, and its own loss: it leaves the run.
    assert list(refusals(noted.reasons)) == [2] and noted.reasons[2].startswith(f"{keys.PRIVACY_REFUSAL}: spent ?[2J")


# ----- the whole run -------------------------------------------------------------------------------

def secure_central_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    from fedtune.config import load_config

    return load_config(REPO / "configs/quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3",
        "train.unfreeze=[]", "privacy.central.enabled=true", "privacy.central.clipping=client",
        "privacy.central.noise_multiplier=0.5", "privacy.central.clipping_norm=5",
        "privacy.secure_aggregation.enabled=true", f"output.dir={tmp_path / 'runs'}", *overrides,
    ])


def test_a_federation_with_central_dp_on_the_secure_sum_accounts_its_epsilon(tmp_path: Path) -> None:
    from dp_accounting import dp_event, rdp

    from fedtune.accounting import user_level_epsilon
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    # The draw follows the seed (privacy.central.reproducible), and seed 391 plays the three kinds of
    # round: an empty draw (the noise alone), a secure sum of 2, a client alone (its own noise).
    cfg = secure_central_config(tmp_path, "privacy.central.reproducible=true", "seed=391")
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    # Poisson sampling, each of 4 clients with probability 1/2: every round, whatever its draw, is
    # one release of the mechanism, and accounted.
    assert [r.clients_sampled for r in history[1:]] == [0, 2, 1]
    assert all(r.clients_ok == r.clients_sampled and not r.client_problems for r in history[1:])
    epsilons = [r.extra["epsilon_user"] for r in history[1:]]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    delta = cfg.privacy.central.target_delta
    assert epsilons[-1] == pytest.approx(user_level_epsilon([0.5] * 3, sampling_rate=0.5, delta=delta))
    independent = rdp.RdpAccountant()
    independent.compose(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(0.5)), 3)
    assert epsilons[-1] == pytest.approx(independent.get_epsilon(delta), rel=0.01)
    privacy = json.loads((outcome.run_dir / "privacy.json").read_text())
    user = privacy["user_level"]
    assert user["secure_sum"] is True and user["epsilon"] == pytest.approx(epsilons[-1])
    assert user["sampling"].startswith("Poisson") and user["noise_stddev"] == pytest.approx(0.5 * 5 / 2)
    assert privacy["secure_aggregation"]["quantization_error_to_noise"] < 1e-4
    # Every round released the model plus noise: it moved, whatever the draw.
    assert all(r.central_loss is not None and math.isfinite(r.central_loss) for r in history)
    assert len({r.central_loss for r in history}) == len(history)


@pytest.mark.parametrize(("overrides", "problem"), [
    (["privacy.central.clipping=server"], "privacy.central.clipping: server cannot be combined with "
                                          "privacy.secure_aggregation"),
    (["privacy.central.clipping=adaptive", "privacy.central.clipped_count_stddev=1"],
     "privacy.central.clipping: adaptive cannot be combined with privacy.secure_aggregation"),
    (["privacy.central.clipping_norm=9"], "privacy.central.clipping_norm: 9 exceeds "
                                          "privacy.secure_aggregation.clipping_range (8)"),
    (["privacy.central.clipping_norm=0.001", "privacy.secure_aggregation.clipping_range=100000"],
     "privacy.secure_aggregation.clipping_range: 100000 quantised in 4194304 steps gives a rounding error up to"),
    (["federation.num_clients=2000", "federation.clients_per_round=2"],
     "privacy.secure_aggregation.quantization_range: 2000 clients (Poisson sampling can draw them all)"),
])
def test_central_dp_settings_that_cannot_work_on_a_secure_sum_are_config_errors(
    tmp_path: Path, overrides: list[str], problem: str
) -> None:
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError) as error:
        secure_central_config(tmp_path, *overrides)
    assert problem in str(error.value)


def test_a_client_at_its_budget_under_secure_aggregation_is_recorded_as_a_refusal(tmp_path: Path) -> None:
    from fedtune.report import RunDirectory
    from fedtune.simulation import simulate

    # DP-SGD with a fixed noise multiplier and a small budget, which the larger clients' sampling
    # rates pass in round 1 and the others' in round 2. A client refuses in SecAgg+'s collect-
    # masked-vectors stage, where its train config arrives; the others' shares remove its masks.
    cfg = secure_central_config(
        tmp_path, "privacy.central.enabled=false", "federation.clients_per_round=null", "federation.rounds=4",
        "privacy.dp_sgd.enabled=true", "privacy.dp_sgd.noise_multiplier=2.0", "privacy.dp_sgd.target_epsilon=1.35",
        "privacy.secure_aggregation.reconstruction_threshold=0.5",
    )
    outcome = simulate(cfg)
    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert outcome.stop_reason == (f"{keys.PRIVACY_REFUSAL}: 4 clients are at their budget and 0 remain, fewer "
                                   "than the 2 clients secure aggregation needs")
    # Round 1: two refuse, and the round goes on with the sum of the other two; round 2: the last
    # two refuse, the protocol halts for want of them, and the round records them all the same.
    assert [(r.clients_sampled, r.clients_ok, r.clients_failed) for r in history[1:]] == [(4, 2, 2), (2, 0, 2)]
    assert history[0].central_accuracy != history[1].central_accuracy == history[2].central_accuracy
    refusals = [note for r in history[1:] for note in r.client_problems.values()]
    assert len(refusals) == 4 and all(note.startswith(f"train reply failed: {keys.PRIVACY_REFUSAL}: this round would "
                                                      "take epsilon") for note in refusals), refusals
    assert all(len(r.client_problems) == r.clients_failed for r in history[1:])
    spent = [r.extra["epsilon_max"] for r in history[1:] if "epsilon_max" in r.extra]
    assert spent and max(spent) <= 1.35  # no client ever passed its budget
