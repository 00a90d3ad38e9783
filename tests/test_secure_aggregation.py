"""SecAgg+ for real: Flower's workflow and mod in the simulation engine, with toy clients.

The clients' updates are known functions of their partition, so the test can compute the plain
weighted average the server must never see, and compare the secure aggregate with it. Ray workers
import this module by name to find the ClientApps (tests/ and the repository go on PYTHONPATH), so
the server side (fedtune.config pulls in timm: seconds per worker) is imported where it is used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Parameters, Status
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.simulation import run_simulation

from fedtune import messages as keys
from fedtune.client.secure_aggregation import secure_aggregation_mod

if TYPE_CHECKING:
    from fedtune.config import SecureAggregationConfig
    from fedtune.server.secure_aggregation import SecureRoundReport

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
NUM_CLIENTS = 4
STAGES = ["block", "head"]
FAIL_PARTITION = "test.fail-partition"  # config entry: this partition's training raises
PARTITION = "partition"  # reply metric, so the test can tell which partitions completed
CONFIG_INTACT = "config-intact"  # reply metric: 1.0 if the client got fedtune's config as sent
TIMEOUT = 60.0


def settings(**changes: Any) -> SecureAggregationConfig:
    """fedtune's defaults, but max_weight 100: weights below it, updates within clipping_range."""
    from fedtune.config import SecureAggregationConfig

    return SecureAggregationConfig(enabled=True, max_weight=100.0, **changes)


def global_arrays() -> ArrayRecord:
    """What the server sends: float tensors of two shapes and an integer counter, like a BatchNorm's."""
    rng = np.random.default_rng(0)
    return ArrayRecord({
        "stages.block.weight": Array(rng.normal(size=(4, 3)).astype(np.float32)),
        "stages.head.bias": Array(rng.normal(size=(5,)).astype(np.float32)),
        "stages.block.bn.num_batches_tracked": Array(np.array(100, dtype=np.int64)),
    })


def num_examples_of(partition: int) -> int:
    return 7 + 13 * partition


def update_of(partition: int, name: str, like: np.ndarray) -> np.ndarray:
    """The change a partition's training makes to a tensor."""
    if name.endswith("num_batches_tracked"):
        return np.array(3 * (partition + 1), dtype=np.int64)
    rng = np.random.default_rng(1000 + partition)
    return rng.uniform(-1.0, 1.0, size=like.shape).astype(like.dtype)


def train_config() -> ConfigRecord:
    return ConfigRecord({keys.CLIENT_CONFIG: '{"seed": 3}', keys.MODEL_HASH: "abc123", keys.TRAINABLE_STAGES: STAGES})


# ----- the clients ---------------------------------------------------------------------------------

def _toy_train(msg: Message, context: Context) -> Message:
    """fedtune's train reply layout, with a known update in place of real training."""
    partition = int(context.node_config["partition-id"])
    config = msg.content[keys.CONFIG]
    if partition == int(config.get(FAIL_PARTITION, -1)):
        raise RuntimeError(f"partition {partition} fails on purpose")
    intact = (list(config[keys.TRAINABLE_STAGES]) == STAGES and config[keys.MODEL_HASH] == "abc123"
              and int(config[keys.SERVER_ROUND]) >= 1)
    sent = msg.content[keys.ARRAYS]
    trained = {name: Array(np.asarray(array.numpy() + update_of(partition, name, array.numpy())))
               for name, array in sent.items()}
    metrics = MetricRecord({keys.NUM_EXAMPLES: num_examples_of(partition), "train_loss": float(partition),
                            PARTITION: partition, CONFIG_INTACT: float(intact)})
    return Message(RecordDict({keys.ARRAYS: ArrayRecord(trained), keys.METRICS: metrics}), reply_to=msg)


secure_app = ClientApp(mods=[secure_aggregation_mod])
secure_app.train()(_toy_train)

plain_app = ClientApp()  # the same clients, without the mod
plain_app.train()(_toy_train)


# ----- the server ---------------------------------------------------------------------------------

@dataclass
class Scenario:
    """One secure round: its settings and failing partition, then what came of it."""

    settings: SecureAggregationConfig = field(default_factory=settings)
    fail_partition: int = -1
    result: tuple[ArrayRecord, MetricRecord | None, SecureRoundReport] | None = None
    error: Exception | None = None


def simulate(client_app: ClientApp, scenarios: dict[str, Scenario]) -> dict[str, Scenario]:
    """Play each scenario as one round of one simulated federation (Ray starts once)."""
    from fedtune.server.secure_aggregation import secure_train_round

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(nodes := sorted(grid.get_node_ids())) < NUM_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.1)  # the simulated nodes connect shortly after the ServerApp starts
        for server_round, scenario in enumerate(scenarios.values(), start=1):
            config = train_config()
            config[FAIL_PARTITION] = scenario.fail_partition
            try:
                scenario.result = secure_train_round(
                    grid, server_round=server_round, node_ids=nodes, arrays=global_arrays(), config=config,
                    settings=scenario.settings, timeout=TIMEOUT,
                )
            except Exception as err:  # the test inspects it
                scenario.error = err

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
    )
    return scenarios


@pytest.fixture(scope="module")
def ray_can_import_tests() -> Iterator[None]:
    # Ray workers inherit the environment: let them import this module's ClientApps by name.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def secure_rounds(ray_can_import_tests: None) -> dict[str, Scenario]:
    return simulate(secure_app, {
        "all": Scenario(),
        "one drops": Scenario(settings(reconstruction_threshold=0.5), fail_partition=3),
        "threshold too high": Scenario(settings(reconstruction_threshold=NUM_CLIENTS), fail_partition=3),
        "updates beyond clipping": Scenario(settings(clipping_range=0.001)),
    })


def expected_average(partitions: list[int]) -> dict[str, np.ndarray]:
    """The plain num-examples-weighted average of the partitions' trained tensors, in float64."""
    weights = np.array([num_examples_of(p) for p in partitions], dtype=np.float64)
    out = {}
    for name, array in global_arrays().items():
        start = array.numpy().astype(np.float64)
        trained = [start + update_of(p, name, array.numpy()).astype(np.float64) for p in partitions]
        out[name] = sum(w * t for w, t in zip(weights, trained, strict=True)) / weights.sum()
    return out


def quantization_error_bound(
    settings: SecureAggregationConfig, num_examples: Sequence[int], max_abs_update: float
) -> float:
    """Largest possible |secure average - exact num-examples-weighted average| of the updates, per element.

    Each client i scales its update d_i by w_i = round(n_i / max_weight * T) / T (T the
    quantization_range), so |w_i - n_i / max_weight| <= 1 / (2T), and stochastically rounds
    (w_i d_i + c) T / (2c) to an integer (c the clipping_range): an error below one step, 2c / T.
    The server gets (sum w_i d_i + E) / W with W = sum w_i and |E| < N 2c / T; replacing the weights
    w_i by n_i / max_weight moves the average by at most N max|d| / (T W). `max_abs_update` bounds
    |d_i|; the result assumes nothing was clipped (the clients refuse updates that would be).
    """
    steps = settings.quantization_range
    clients = len(num_examples)
    least_weight = sum(n / settings.max_weight for n in num_examples) - clients / (2 * steps)
    return clients * (2 * settings.clipping_range + max_abs_update) / (steps * least_weight)


def assert_secure_average(result: tuple[ArrayRecord, MetricRecord | None, SecureRoundReport],
                          partitions: list[int], settings: SecureAggregationConfig) -> None:
    aggregated, metrics, report = result
    sent = global_arrays()
    expected = expected_average(partitions)
    largest_update = max(float(np.abs(update_of(p, n, a.numpy())).max()) for p in partitions for n, a in sent.items()
                         if not n.endswith("num_batches_tracked"))
    bound = quantization_error_bound(settings, [num_examples_of(p) for p in partitions], largest_update)
    assert 0 < bound < 1e-4
    assert list(aggregated.keys()) == list(sent.keys())
    for name, array in aggregated.items():
        got, want = array.numpy(), expected[name]
        assert got.dtype == sent[name].numpy().dtype and got.shape == sent[name].numpy().shape, name
        if np.issubdtype(got.dtype, np.integer):
            assert got == np.rint(want), name  # the average count, rounded
            continue
        # Quantisation error, then float32 rounding of the result.
        tolerance = bound + np.finfo(np.float32).eps * np.abs(want)
        assert np.all(np.abs(got.astype(np.float64) - want) <= tolerance), (name, np.abs(got - want).max(), bound)
        # It moved for real: the updates are far larger than the tolerance.
        assert np.abs(got.astype(np.float64) - sent[name].numpy()).max() > 100 * bound, name

    assert sorted(int(m[PARTITION]) for m in report.client_metrics.values()) == partitions
    assert all(m[CONFIG_INTACT] == 1.0 for m in report.client_metrics.values())
    assert report.completed == sorted(report.client_metrics)
    weights = [num_examples_of(p) for p in partitions]
    assert metrics is not None
    assert metrics["train_loss"] == pytest.approx(np.dot(weights, partitions) / sum(weights))


def test_secure_aggregate_equals_the_plain_weighted_average(secure_rounds: dict[str, Scenario]) -> None:
    scenario = secure_rounds["all"]
    assert scenario.error is None, scenario.error
    assert scenario.result is not None
    assert_secure_average(scenario.result, list(range(NUM_CLIENTS)), scenario.settings)
    report = scenario.result[2]
    assert len(report.sampled) == NUM_CLIENTS and report.completed == report.sampled and not report.dropped
    assert (report.num_shares, report.threshold) == (NUM_CLIENTS, 3)  # all share holders, round(0.67 x 4)


def test_a_client_dropping_out_is_recovered_from_the_others(secure_rounds: dict[str, Scenario]) -> None:
    scenario = secure_rounds["one drops"]
    assert scenario.error is None, scenario.error
    assert scenario.result is not None
    # The dropped client's pairwise masks are reconstructed from its neighbours' shares: the
    # aggregate is exactly the average of the three that completed.
    assert_secure_average(scenario.result, [0, 1, 2], scenario.settings)
    report = scenario.result[2]
    assert len(report.completed) == 3 and list(report.dropped.values()) == ["collect masked vectors"]


def test_too_few_clients_for_the_threshold_fails_loudly(secure_rounds: dict[str, Scenario]) -> None:
    from fedtune.server.secure_aggregation import SecureAggregationError

    scenario = secure_rounds["threshold too high"]
    assert scenario.result is None
    assert isinstance(scenario.error, SecureAggregationError)
    message = str(scenario.error)
    assert "halted at stage 'collect masked vectors'" in message
    assert "3 of 4 sampled clients" in message and "at least 4 of its 4 share holders" in message
    assert "partition 3 fails on purpose" in message  # the client's own reason travels along


def test_updates_that_would_be_clipped_are_refused(secure_rounds: dict[str, Scenario]) -> None:
    from fedtune.server.secure_aggregation import SecureAggregationError

    scenario = secure_rounds["updates beyond clipping"]
    assert isinstance(scenario.error, SecureAggregationError)
    message = str(scenario.error)
    assert "halted at stage 'collect masked vectors'" in message
    assert "beyond privacy.secure_aggregation.clipping_range=0.001" in message


def test_clients_without_the_mod_fail_loudly(ray_can_import_tests: None) -> None:
    from fedtune.server.secure_aggregation import SecureAggregationError

    scenario = simulate(plain_app, {"no mod": Scenario()})["no mod"]
    assert scenario.result is None
    assert isinstance(scenario.error, SecureAggregationError)
    assert "halted at stage 'setup'" in str(scenario.error)


@pytest.mark.parametrize(("nodes", "changes", "problem"), [
    ([1], {}, "at least 2 clients"),
    (list(range(1024)), {}, "must stay below 4294967296"),
    ([1, 2, 3], {"num_shares": 2.5}, "fraction up to 1 or a whole count"),
    ([1, 2, 3], {"num_shares": 2.0}, "greater than 2"),  # Flower's own check
])
def test_settings_that_cannot_work_are_refused_before_any_message(
    nodes: list[int], changes: dict[str, float], problem: str
) -> None:
    from fedtune.server.secure_aggregation import secure_train_round

    with pytest.raises(ValueError, match=problem):
        secure_train_round(None, server_round=1, node_ids=nodes, arrays=global_arrays(),  # type: ignore[arg-type]
                           config=train_config(), settings=settings(**changes), timeout=1.0)



@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY])
def test_other_messages_pass_the_mod_untouched(message_type: str) -> None:
    """Queries, evaluation and fedtune's ordinary train messages never meet secaggplus_mod."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    content = RecordDict({keys.ARRAYS: global_arrays(), keys.CONFIG: train_config()})
    # As it arrives at a node (outside a run, Message() cannot fill in the metadata itself).
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type=message_type)
    msg = Message(content=content, metadata=metadata)
    seen: list[Message] = []
    replies: list[Message] = []

    def handler(received: Message, _: Context) -> Message:
        seen.append(received)
        replies.append(Message(RecordDict(), reply_to=received))
        return replies[-1]

    reply = secure_aggregation_mod(msg, context, handler)
    assert seen == [msg] and seen[0].content is content and replies == [reply]
    assert not context.state.config_records  # no SecAgg+ state was started


def test_hostile_plain_text_metrics_never_end_the_round(caplog: pytest.LogCaptureFixture) -> None:
    # SecAgg+ masks the tensors only: num-examples and the metrics reach the server as the client
    # wrote them, past the ClientApp's own MetricRecord checks.
    from fedtune.server.secure_aggregation import parse_client_metrics
    from fedtune.strategies.validation import train_metric_specs

    def result(node: int, num_examples: int, **metrics: object) -> tuple[ClientProxy, FitRes]:
        proxy = GridClientProxy(str(node), None, 1)  # type: ignore[arg-type]
        return proxy, FitRes(Status(Code.OK, ""), Parameters([], ""), num_examples, metrics)  # type: ignore[arg-type]

    good = {"train_loss": 0.5, "train_accuracy": 0.75}
    results = [
        result(1, 10, **good, extra=1.0),
        result(2, 30, **good),
        result(3, 10**12 * 10**6, **good),  # above 2**53: not even exact as a weight
        result(4, 20, train_loss="0.1", train_accuracy=0.5),  # a string, which MetricRecord cannot hold
        result(5, 20, train_loss=float("nan"), train_accuracy=0.5),
        result(6, 20, **good, note="hello", blob=b"\x00" * 10),
    ]
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        reported, averaged = parse_client_metrics(results, train_metric_specs(dp_sgd=False), 2, lambda n: f"client {n}")

    assert sorted(reported) == [1, 2, 6]
    assert reported[1]["extra"] == 1.0 and "note" not in reported[6]
    metrics = aggregate_metricrecords(averaged, keys.NUM_EXAMPLES)
    assert set(metrics) == {"train_loss", "train_accuracy"}  # `extra` is one client's only
    assert metrics["train_loss"] == pytest.approx(0.5)
    for node, problem in ((3, "metric 'num-examples' must be a positive integer up to 2**53"),
                          (4, "metric 'train_loss' must be a finite number >= 0, got '0.1'"),
                          (5, "metric 'train_loss' must be a finite number >= 0, got nan")):
        assert f"round 2: left the train metrics of client {node} out of the round's: {problem}" in caplog.text
    assert "ignored metrics blob, note in the train reply of client 6: not numbers" in caplog.text
