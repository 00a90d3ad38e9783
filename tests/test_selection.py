"""`fedtune select`: the scores are those of the pooled data, the worst replies and queries are refused, the files.

One real simulation (Ray, the real ClientApp, digits at 32 px, 3 clients, 2 candidates that share
a model) checks the scores against LogME of the same data's statistics computed here, with one
client whose reply is forged; the rest runs in this process: the real ClientApp against hostile
queries, the server's parser against hostile replies, and the command's options.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from server_messages import BACKBONE, NUM_CLASSES, Node, global_model, query, settings
from typer.testing import CliRunner

from fedtune import messages as keys
from fedtune.backbones import HEAD, StagedModel, build_model
from fedtune.candidates import Candidate, parse_candidates, parse_sample
from fedtune.cli import cli
from fedtune.client.app import app as client_app
from fedtune.client.cache import FeatureCache
from fedtune.client.task import SHARED_CACHE, NodeIdentity, feature_key, local_data
from fedtune.config import ExperimentConfig, load_config
from fedtune.engine import extract_features
from fedtune.params import state_hash
from fedtune.protocol import ClientSettings
from fedtune.selection import SELECTION_CSV, SELECTION_JSON, SELECTION_PNG, CandidateScore, Selection, print_table
from fedtune.server.selection import sampled
from fedtune.server.statistics import StatisticsShape, parse_statistics_reply
from fedtune.statistics_protocol import (
    MESSAGE_TYPE,
    StatisticsRequest,
    from_secure_sums,
    from_two_digits,
    secure_vectors,
    statistics_query,
    statistics_record,
    statistics_reply,
    two_digits,
)
from fedtune.strategies.validation import UnusableReply
from fedtune.transferability import FeatureStatistics, logme

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SMALL = ["data.image_size=32", "federation.num_clients=3", "train.unfreeze=[]"]


# --- one real selection ---------------------------------------------------------------------------

FORGED = 2  # the virtual client whose reply is forged


def _forging(app: ClientApp) -> ClientApp:
    """The real ClientApp, except that client FORGED claims twice the examples its class counts hold."""
    forging = ClientApp()

    @forging.query(keys.STATISTICS)
    def statistics(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if msg.content.config_records[keys.CONFIG][keys.VIRTUAL_PARTITION] == FORGED and not reply.has_error():
            metrics = reply.content.metric_records[keys.METRICS]
            metrics[keys.NUM_EXAMPLES] = 2 * int(metrics[keys.NUM_EXAMPLES])
        return reply

    @forging.query()
    def model_query(msg: Message, context: Context) -> Message:
        return app(msg, context)

    return forging


def _model_here(cfg: ExperimentConfig) -> tuple[StagedModel, str]:
    """The model a run of `cfg` builds (fedtune/server/run.py seeds torch just before), and its hash."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.backbone, num_classes=NUM_CLASSES, weights=cfg.model.weights,
                        head_dropout=cfg.model.head_dropout, cut=cfg.model.cut)
    return model, state_hash({k: v.detach().clone() for k, v in model.state_dict().items()})


def _pooled_here(cfg: ExperimentConfig, clients: list[int]) -> FeatureStatistics:
    """The statistics of a config's model over these clients' training splits, computed in this process
    (not through the selection's code)."""
    model, _ = _model_here(cfg)
    settings_of = ClientSettings.of(cfg, num_classes=NUM_CLASSES, run_key="here")
    total = None
    for client in clients:
        node = NodeIdentity(partition_id=client, num_partitions=cfg.federation.num_clients,
                            cache_root=Path("unused"), simulated=True)
        data = local_data(settings_of, node)
        features, labels = extract_features(model, data.train, stop=model.stage_index(HEAD), batch_size=64,
                                            device=torch.device("cpu")).tensors
        stats = FeatureStatistics.of(features.double().numpy(), labels.numpy(), num_classes=NUM_CLASSES)
        total = stats if total is None else total + stats
    assert total is not None
    return total


def test_select_scores_the_pooled_statistics_and_refuses_a_forged_reply(tmp_path: Path, isolated_cache: Path) -> None:
    from fedtune.simulation import select

    overrides = [*SMALL, f"output.dir={tmp_path / 'runs'}"]
    cfg = load_config(QUICKSTART, overrides)
    candidates = parse_candidates(["efficientnet_lite0", "efficientnet_lite0@blocks_5"])

    selection, folder = select(cfg, candidates, client_app=_forging(client_app))

    assert selection.clients_used == [0, 1]
    assert list(selection.clients_refused) == [FORGED]
    assert "class-counts add up to" in selection.clients_refused[FORGED]
    by_name = {score.candidate: score for score in selection.scores}
    for candidate in candidates:
        pooled = _pooled_here(candidate.configure(cfg), [0, 1])
        assert by_name[candidate.label].examples == pooled.count
        assert by_name[candidate.label].logme == pytest.approx(logme(pooled), abs=1e-6)
        assert by_name[candidate.label].logme_centred == pytest.approx(logme(pooled.centred()), abs=1e-6)
    # The whole backbone's training features are cached where its head-only fine-tuning looks for them.
    whole_cfg = candidates[0].configure(cfg)
    whole_settings = ClientSettings.of(whole_cfg, num_classes=NUM_CLASSES, run_key="here")
    whole, whole_hash = _model_here(whole_cfg)
    head = whole.stage_index(HEAD)
    shared = FeatureCache(isolated_cache / SHARED_CACHE)
    for client in (0, 1):
        node = NodeIdentity(partition_id=client, num_partitions=3, cache_root=Path("unused"), simulated=True)
        assert shared.get(*feature_key(whole_hash, head, local_data(whole_settings, node).train_identity))
    written = json.loads((folder / SELECTION_JSON).read_text())
    assert written["chosen"] == selection.chosen.candidate == selection.scores[0].candidate
    assert [s["candidate"] for s in written["scores"]] == [s.candidate for s in selection.scores]
    assert written["clients_refused"] == {str(FORGED): selection.clients_refused[FORGED]}
    assert (folder / SELECTION_CSV).read_text().splitlines()[0].startswith("rank,candidate,")
    assert (folder / SELECTION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert selection.bytes_received > 0 and selection.seconds > 0


# --- the command's options ------------------------------------------------------------------------


def _canned(folder: Path) -> Callable[..., tuple[Selection, Path]]:
    def run(cfg: object, candidates: list[Candidate], *, sample: float) -> tuple[Selection, Path]:
        scores = [CandidateScore(candidate=c.label, backbone=c.backbone, weights=c.weights, cut=c.cut, feature_dim=8,
                                 examples=10, logme_centred=float(-i), logme=0.0, h_score=0.5, shrunk_h_score=0.4,
                                 seconds=1.0, bytes_sent=10, bytes_received=20)
                  for i, c in enumerate(reversed(candidates))]
        folder.mkdir(parents=True, exist_ok=True)
        return Selection(name="quickstart", scores=scores, clients=3, clients_used=[0, 1, 2], clients_refused={},
                         clients_failed={}, seconds=2.0, bytes_sent=30, bytes_received=60, sample=sample), folder

    return run


def test_write_gives_a_config_check_accepts_and_never_overwrites_unasked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtune.simulation

    monkeypatch.setattr(fedtune.simulation, "select", _canned(tmp_path / "sel"))
    runner = CliRunner()
    target = tmp_path / "chosen.yaml"
    sets = [item for override in [*SMALL, f"output.dir={tmp_path / 'runs'}"] for item in ("--set", override)]
    args = ["select", str(QUICKSTART), *sets, "--candidates", "efficientnet_lite0:none efficientnet_lite0@blocks_5",
            "--write", str(target)]

    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "spent 2.0 s, sent 30 B, received 60 B" in done.output
    checked = runner.invoke(cli, ["check", str(target)])
    assert checked.exit_code == 0, checked.output
    resolved = json.loads(checked.output)
    assert resolved["model"] | {"head_dropout": 0} == {"backbone": "efficientnet_lite0", "weights": "imagenet",
                                                        "cut": "blocks_5", "head_dropout": 0}
    assert resolved["data"]["image_size"] == 32 and resolved["federation"]["num_clients"] == 3

    target.write_text("mine\n")
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    assert target.read_text() == "mine\n"
    forced = runner.invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "cut: blocks_5" in target.read_text()
    # --sample reaches the selection, and the config written trains on the whole training split.
    sampled = runner.invoke(cli, [*args, "--force", "--sample", "0.25"])
    assert sampled.exit_code == 0, sampled.output
    assert "3 of 3 clients (25% of each one's training split)" in sampled.output
    assert "train_fraction" not in target.read_text()


def test_a_sample_scales_the_training_fraction_the_statistics_read() -> None:
    cfg = load_config(QUICKSTART, ["data.train_fraction=0.5"])
    assert sampled(cfg, 0.25).data.train_fraction == 0.125
    assert sampled(cfg, 0.25).model_dump(exclude={"data"}) == cfg.model_dump(exclude={"data"})
    for bad in (0.0, -0.5, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            sampled(cfg, bad)
    # The same rule for the run config's select-sample, a string a submitted run sets.
    assert parse_sample("") == 1.0 and parse_sample(" 0.25 ") == 0.25
    for text, problem in (("a lot", "'a lot' is not a number"), ("nan", r"fraction in \(0, 1\], not nan"),
                          ("2", r"fraction in \(0, 1\], not 2.0"), ("-0", r"fraction in \(0, 1\], not -0.0")):
        with pytest.raises(ValueError, match=problem):
            parse_sample(text)


SAMPLE_RULE = "the share of each client's training split must be a fraction in (0, 1]"


@pytest.mark.parametrize(("candidates", "problem"), [
    ("efficientnet_lite0@blocks_99", "efficientnet_lite0@blocks_99: model.cut: 'blocks_99' is not a block"),
    ("no_such_net", "unknown backbone 'no_such_net'"),
    ("efficientnet_lite0:/no/such/file", "no weights file at /no/such/file"),
    ("efficientnet_lite0 efficientnet_lite0:imagenet", "named twice"),
    ("efficientnet_lite0@", "nothing after '@'"),
    ("all efficientnet_lite0", "'all' stands alone"),
    ("vit_b_16:none", "vit_b_16:none: data.image_size: vit_b_16 cannot take 64 px images"),
    ("efficientnet_lite0 --sample 0", f"--sample: {SAMPLE_RULE}, not 0.0"),
    ("efficientnet_lite0 --sample 1.5", f"--sample: {SAMPLE_RULE}, not 1.5"),
    ("efficientnet_lite0 --sample nan", f"--sample: {SAMPLE_RULE}, not nan"),
])
def test_a_bad_candidate_stops_the_command_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, candidates: str, problem: str) -> None:
    import fedtune.simulation

    monkeypatch.setattr(fedtune.simulation, "select", lambda *a, **k: pytest.fail("the selection started"))
    candidates, _, option = candidates.partition(" --")  # an option after the candidates: "--sample 0"
    done = CliRunner().invoke(cli, ["select", str(QUICKSTART), "--set", f"output.dir={tmp_path}",
                                    "--candidates", candidates, *(f"--{option}".split() if option else [])])
    assert done.exit_code == 2
    assert problem in done.output


# --- hostile replies ------------------------------------------------------------------------------

DIMS, CLASSES = 8, 3


def _reply(examples: int, *, candidates: int = 1, seed: int = 0) -> RecordDict:
    """An honest reply for features of DIMS dimensions: the Gram matrix whole (examples >= DIMS) or factored."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(examples, DIMS))
    labels = np.arange(examples) % (CLASSES - 1)  # the last class has no examples
    records = [statistics_record(features, labels, num_classes=CLASSES) for _ in range(candidates)]
    return statistics_reply(records, num_examples=examples, seconds=[0.25] * candidates)


def _shapes(candidates: int = 1) -> list[StatisticsShape]:
    return [StatisticsShape(f"c{i}", DIMS, CLASSES) for i in range(candidates)]


def test_honest_replies_in_both_forms_give_the_statistics_of_their_features() -> None:
    for examples in (5, 30):  # a factor of the Gram matrix, then the Gram matrix itself
        rng = np.random.default_rng(0)
        features = rng.normal(size=(examples, DIMS))
        labels = np.arange(examples) % (CLASSES - 1)
        parsed = parse_statistics_reply(_reply(examples), _shapes())
        expected = FeatureStatistics.of(features, labels, num_classes=CLASSES)
        np.testing.assert_allclose(parsed.statistics[0].gram, expected.gram, rtol=1e-10, atol=1e-10)
        # The factor is kept (the server scores in its span), the whole matrix has none.
        assert (parsed.statistics[0].factor is not None) == (examples < DIMS)
        np.testing.assert_array_equal(parsed.statistics[0].class_counts, expected.class_counts)
        assert parsed.num_examples == examples and parsed.seconds == [0.25]


def _record(content: RecordDict, index: int = 0) -> ArrayRecord:
    return content.array_records[f"{keys.STATISTICS_RECORD}{index}"]


def _set(name: str, value: np.ndarray) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        _record(content)[name] = Array(np.ascontiguousarray(value))
    return change


def _edit(name: str, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        _record(content)[name] = Array(np.ascontiguousarray(edit(_record(content)[name].numpy().copy())))
    return change


def _metric(name: str, value: object) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        content.metric_records[keys.METRICS][name] = value  # type: ignore[assignment]
    return change


def _drop_metric(name: str) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        del content.metric_records[keys.METRICS][name]
    return change


def _at(array: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    array[index] = value
    return array


def _lying_header(content: RecordDict) -> None:
    # Declares the expected shape, encodes another of as many bytes.
    honest = _record(content)[keys.GRAM]
    forged = Array(np.zeros((4, 16)))
    _record(content)[keys.GRAM] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=forged.data)


def _declared_huge_factor(content: RecordDict) -> None:
    honest = _record(content)[keys.GRAM_FACTOR]
    _record(content)[keys.GRAM_FACTOR] = Array(dtype=honest.dtype, shape=(10**12, DIMS), stype=honest.stype,
                                               data=honest.data)


def _padded(content: RecordDict) -> None:
    honest = _record(content)[keys.CLASS_SUMS]
    _record(content)[keys.CLASS_SUMS] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                                              data=honest.data + b"\0" * 1_000_000)


def _sums_outside_the_span(content: RecordDict) -> None:
    # Each class sum moved along a direction no feature the factor describes takes: within the trace bound.
    factor = _record(content)[keys.GRAM_FACTOR].numpy()
    outside = np.linalg.svd(factor)[2][-1]  # orthogonal to the factor's rows (5 of 8 dimensions)
    sums = _record(content)[keys.CLASS_SUMS].numpy().copy()
    sums[0] += 0.1 * np.linalg.norm(sums[0]) * outside
    _record(content)[keys.CLASS_SUMS] = Array(np.ascontiguousarray(sums))


def _extra_record(content: RecordDict) -> None:
    content[f"{keys.STATISTICS_RECORD}7"] = ArrayRecord({keys.CLASS_COUNTS: Array(np.zeros(CLASSES))})


def _config_record(content: RecordDict) -> None:
    content[keys.CONFIG] = ConfigRecord({"note": "hello"})


def _both_forms(content: RecordDict) -> None:
    _record(content)[keys.GRAM] = Array(np.eye(DIMS))


WHOLE = 30  # examples: the Gram matrix travels whole
FACTORED = 5  # examples: it travels as a factor
HOSTILE: list[tuple[str, int, Callable[[RecordDict], None], str]] = [
    ("NaN in the class sums", WHOLE, _edit(keys.CLASS_SUMS, lambda a: _at(a, (0, 0), np.nan)), "non-finite"),
    ("infinite Gram entry", WHOLE, _edit(keys.GRAM, lambda a: _at(a, (1, 1), np.inf)), "non-finite"),
    ("float32 Gram matrix", WHOLE, _edit(keys.GRAM, lambda a: a.astype(np.float32)), "dtype float32"),
    ("Gram matrix of another size", WHOLE, _set(keys.GRAM, np.eye(DIMS + 1)), "shape (9, 9), expected (8, 8)"),
    ("asymmetric Gram matrix", WHOLE, _edit(keys.GRAM, lambda a: _at(a, (0, 1), a[0, 1] + 1)), "not symmetric"),
    ("negative diagonal", WHOLE, _set(keys.GRAM, -np.eye(DIMS)), "negative diagonal"),
    ("no Gram matrix", WHOLE, _set(keys.GRAM, np.ones((DIMS, DIMS)) * 5 - np.eye(DIMS) * 4), "no Gram matrix"),
    ("a fractional count", WHOLE, _edit(keys.CLASS_COUNTS, lambda a: a + np.array([0.5, -0.5, 0])), "whole numbers"),
    ("a negative count", WHOLE, _edit(keys.CLASS_COUNTS, lambda a: a + np.array([16, 0, -1])), "whole numbers"),
    ("counts beyond the examples", WHOLE, _edit(keys.CLASS_COUNTS, lambda a: a * 2), "add up to 60"),
    ("a sum for a class of none", WHOLE, _edit(keys.CLASS_SUMS, lambda a: _at(a, (2, 0), 1.0)), "class of no"),
    ("a class sum past the trace", WHOLE, _edit(keys.CLASS_SUMS, lambda a: a * 1e6), "cannot come from"),
    ("a header that lies", WHOLE, _lying_header, "has shape (4, 16)"),
    ("padded data", WHOLE, _padded, "carries"),
    ("a factor of more rows than examples", FACTORED, _set(keys.GRAM_FACTOR, np.ones((6, DIMS))), "R <= 5"),
    ("a factor of other columns", FACTORED, _set(keys.GRAM_FACTOR, np.ones((2, DIMS + 1))), "expected (R, 8)"),
    ("a factor declared huge", FACTORED, _declared_huge_factor, "R <= 5"),
    ("both forms of the Gram matrix", FACTORED, _both_forms, "expected class-sums"),
    ("class sums outside the factor's span", FACTORED, _sums_outside_the_span, "outside the span"),
    ("a factor whose squares overflow", FACTORED, _edit(keys.GRAM_FACTOR, lambda a: a * 1e200), "overflow a float64"),
    ("num-examples a float", WHOLE, _metric(keys.NUM_EXAMPLES, 30.0), "'num-examples' must be an integer"),
    ("no examples", WHOLE, _metric(keys.NUM_EXAMPLES, 0), "'num-examples' must be an integer in [1,"),
    ("negative seconds", WHOLE, _metric(f"{keys.STATISTICS_SECONDS}0", -1.0), "seconds in [0,"),
    ("NaN seconds", WHOLE, _metric(f"{keys.STATISTICS_SECONDS}0", float("nan")), "seconds in [0,"),
    ("an unknown metric", WHOLE, _metric("x" * 200, 1.0), "unexpected ['xxxx"),
    ("no seconds", WHOLE, _drop_metric(f"{keys.STATISTICS_SECONDS}0"), "missing ['seconds.0']"),
    ("a record too many", WHOLE, _extra_record, "expected the ArrayRecords"),
    ("a config record", WHOLE, _config_record, "no config records"),
]


@pytest.mark.parametrize(("examples", "change", "problem"), [case[1:] for case in HOSTILE],
                         ids=[case[0] for case in HOSTILE])
def test_a_hostile_reply_is_refused_naming_the_problem(
        examples: int, change: Callable[[RecordDict], None], problem: str) -> None:
    content = _reply(examples)
    parse_statistics_reply(content, _shapes())  # honest, before the change
    change(content)
    with pytest.raises(UnusableReply) as refused:
        parse_statistics_reply(content, _shapes())
    assert problem in str(refused.value)


def test_class_counts_that_differ_between_candidates_are_refused() -> None:
    content = _reply(WHOLE, candidates=2)
    record = _record(content, 1)
    record[keys.CLASS_COUNTS] = Array(record[keys.CLASS_COUNTS].numpy() + np.array([1.0, -1.0, 0.0]))
    with pytest.raises(UnusableReply, match="candidate c1: class counts differ"):
        parse_statistics_reply(content, _shapes(2))


# --- hostile queries, through the real ClientApp ----------------------------------------------------


@pytest.fixture
def holding(tmp_path: Path, server_identity: None) -> Node:
    node = Node(cache=tmp_path / "node")
    assert not node.send(query(with_backbone=True)).has_error()
    return node


def _below_head() -> str:
    stages = list(global_model().model.stages)
    return stages[stages.index(HEAD) - 1]


def _query(config: dict[str, object] | None = None, *, requests: int = 1, **change: object) -> Message:
    settings_json = json.dumps(settings())
    values: dict[str, object] = {
        keys.STATISTICS_SETTINGS: [settings_json] * requests,
        keys.STATISTICS_MODELS: [global_model().model_hash] * requests,
        keys.STATISTICS_STAGES: [_below_head()] * requests,
    }
    values |= change
    content = RecordDict({keys.CONFIG: ConfigRecord(config if config is not None else values)})  # type: ignore[arg-type]
    return Message(content, dst_node_id=1, message_type=MESSAGE_TYPE)


def test_a_node_answers_a_statistics_query_with_what_the_server_accepts(holding: Node) -> None:
    model = global_model().model
    dims = model.stages[HEAD][-1].in_features
    reply = holding.send(_query())
    assert not reply.has_error(), reply.error.reason
    parsed = parse_statistics_reply(reply.content, [StatisticsShape(BACKBONE, dims, NUM_CLASSES)])
    # The features are cached under the key head-only fine-tuning reads them with.
    cfg_settings = ClientSettings.model_validate(settings())
    node = NodeIdentity(partition_id=0, num_partitions=10, cache_root=holding.cache, simulated=False)
    identity = local_data(cfg_settings, node).train_identity
    cached = FeatureCache(holding.cache).get(*feature_key(global_model().model_hash, model.stage_index(HEAD), identity))
    assert cached is not None
    features, labels = cached.tensors
    expected = FeatureStatistics.of(features.double().numpy(), labels.numpy(), num_classes=NUM_CLASSES)
    assert parsed.num_examples == expected.count
    np.testing.assert_allclose(parsed.statistics[0].gram, expected.gram, rtol=1e-9, atol=1e-9 * expected.gram.max())


def test_a_node_with_its_own_privacy_budget_refuses_statistics(tmp_path: Path, server_identity: None) -> None:
    strict = Node(cache=tmp_path / "strict", extra_config={"max-epsilon": 1.0})
    assert not strict.send(query(with_backbone=True)).has_error()

    reply = strict.send(_query())

    assert reply.has_error()
    assert "leaves it only under DP-SGD (its max-epsilon is 1)" in reply.error.reason


def test_two_models_decode_the_images_once_and_each_gets_its_own_features(holding: Node) -> None:
    other = global_model(seed=1)
    assert not holding.send(query(other, with_backbone=True)).has_error()
    models = [global_model().model_hash, other.model_hash]
    reply = holding.send(_query(requests=2, **{keys.STATISTICS_MODELS: models}))
    assert not reply.has_error(), reply.error.reason
    shape = StatisticsShape(BACKBONE, global_model().model.stages[HEAD][-1].in_features, NUM_CLASSES)
    parsed = parse_statistics_reply(reply.content, [shape, shape])
    node = NodeIdentity(partition_id=0, num_partitions=10, cache_root=holding.cache, simulated=False)
    data = local_data(ClientSettings.model_validate(settings()), node)
    for model, stats in zip((global_model(), other), parsed.statistics, strict=True):
        features, labels = extract_features(model.model, data.train, stop=model.model.stage_index(HEAD),
                                            batch_size=64, device=torch.device("cpu")).tensors
        expected = FeatureStatistics.of(features.double().numpy(), labels.numpy(), num_classes=NUM_CLASSES)
        np.testing.assert_allclose(stats.gram, expected.gram, rtol=1e-9, atol=1e-9 * expected.gram.max())


def test_a_query_of_two_stages_of_one_model_runs_one_pass(holding: Node) -> None:
    stages = [name for name in global_model().model.stages if name.startswith("features")]
    reply = holding.send(_query(requests=2, **{keys.STATISTICS_STAGES: [stages[3], _below_head()]}))
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.array_records) == {f"{keys.STATISTICS_RECORD}0", f"{keys.STATISTICS_RECORD}1"}


HOSTILE_QUERIES: list[tuple[str, dict[str, object], str, str]] = [
    ("the head as the feature", {keys.STATISTICS_STAGES: [HEAD]}, keys.STATISTICS_STAGES, "not a stage below the head"),
    ("a stage the model lacks", {keys.STATISTICS_STAGES: ["blocks_99"]}, keys.STATISTICS_STAGES,
     "not a stage below the head"),
    ("a path as a stage", {keys.STATISTICS_STAGES: ["../etc"]}, keys.STATISTICS_STAGES, "is not a stage name"),
    ("a malformed hash", {keys.STATISTICS_MODELS: ["../../victim"]}, keys.STATISTICS_MODELS, "64 lowercase hex"),
    ("a model not cached", {keys.STATISTICS_MODELS: ["0" * 64]}, "", "model not cached"),
    ("too many candidates", {keys.STATISTICS_STAGES: ["pool"] * 65}, keys.STATISTICS_STAGES, "more than 64"),
    ("lists of other lengths", {keys.STATISTICS_STAGES: ["pool", "pool"]}, keys.STATISTICS_STAGES,
     "one of each per candidate"),
    ("a number for a list", {keys.STATISTICS_MODELS: 7}, keys.STATISTICS_MODELS, "must be a non-empty list"),
    ("an empty list", {keys.STATISTICS_SETTINGS: []}, keys.STATISTICS_SETTINGS, "must be a non-empty list"),
    ("augmented images", {keys.STATISTICS_SETTINGS: [json.dumps(settings("data.augment=true"))]},
     keys.STATISTICS_SETTINGS, "data.augment"),
    ("settings of another version", {keys.STATISTICS_SETTINGS: [json.dumps(settings() | {"version": 99})]},
     keys.STATISTICS_SETTINGS, "different fedtune releases"),
    ("an unknown key", {"fedtune.other": 1}, keys.CONFIG, "unknown key 'fedtune.other'"),
    ("secure bounds in a plain query", {keys.STATISTICS_NORMS: [1.0], keys.STATISTICS_MAX_EXAMPLES: 100,
                                        keys.STATISTICS_LEVELS: 2**20},
     keys.STATISTICS_NORMS, "would go to the server unmasked"),
    ("levels not a power of two", {keys.STATISTICS_NORMS: [1.0], keys.STATISTICS_MAX_EXAMPLES: 100,
                                   keys.STATISTICS_LEVELS: 1000}, keys.STATISTICS_LEVELS, "a power of two"),
    ("secure bounds of the wrong count", {keys.STATISTICS_NORMS: [1.0, 2.0], keys.STATISTICS_MAX_EXAMPLES: 100},
     keys.STATISTICS_NORMS, "must be 1 numbers"),
    ("an infinite norm bound", {keys.STATISTICS_NORMS: [float("inf")], keys.STATISTICS_MAX_EXAMPLES: 100},
     keys.STATISTICS_NORMS, "must be 1 numbers"),
    ("a bool for the examples", {keys.STATISTICS_NORMS: [1.0], keys.STATISTICS_MAX_EXAMPLES: True},
     keys.STATISTICS_MAX_EXAMPLES, "must be an integer"),
]


@pytest.mark.parametrize(("change", "field", "problem"), [case[1:] for case in HOSTILE_QUERIES],
                         ids=[case[0] for case in HOSTILE_QUERIES])
def test_a_node_refuses_a_hostile_statistics_query(holding: Node, change: dict[str, object], field: str,
                                                   problem: str) -> None:
    before = sorted(p for p in holding.cache.rglob("*") if p.is_file())
    reply = holding.send(_query(**change))
    assert reply.has_error(), "the query was answered"
    reason = reply.error.reason or ""
    prefix = f"{keys.REFUSED}: {field}: " if field else keys.MODEL_MISSING
    assert reason.startswith(prefix), reason
    assert problem in reason, reason
    assert sorted(p for p in holding.cache.rglob("*") if p.is_file()) == before  # nothing computed, nothing written


def test_a_query_naming_one_model_with_two_architectures_is_refused(holding: Node) -> None:
    other = json.dumps(settings("model.head_dropout=0.5"))
    reply = holding.send(_query(requests=2, **{keys.STATISTICS_SETTINGS: [json.dumps(settings()), other]}))
    assert (reply.error.reason or "").startswith(f"{keys.REFUSED}: {keys.STATISTICS_MODELS}: names the model")


def test_a_request_round_trips_through_the_query(holding: Node) -> None:
    request = StatisticsRequest(ClientSettings.model_validate(settings()), global_model().model_hash, _below_head())
    message = Message(statistics_query([request]), dst_node_id=1, message_type=MESSAGE_TYPE)
    assert not holding.send(message).has_error()


# --- under SecAgg+ ------------------------------------------------------------------------------------


def test_secure_sums_of_quantised_statistics_are_the_plain_sums_within_the_stated_bound() -> None:
    # Flower's own quantisation, as SecAgg+ applies it (the masks cancel exactly in the modular sum).
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedtune.server.statistics import quantization_for

    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    rng = np.random.default_rng(1)
    clients, dims, classes, most = 3, 40, 4, 200
    parts = [(np.abs(rng.normal(size=(n, dims))) * 3, rng.integers(0, classes, n)) for n in (50, 120, 7)]
    norm = 2.0 * max(float(np.linalg.norm(f, axis=1).max()) for f, _ in parts)
    levels = quantization_for(clients)
    assert levels == 2**30
    summed: dict[str, np.ndarray] = {}
    for features, labels in parts:
        vectors = secure_vectors(features, labels, num_classes=classes, norm=norm, max_examples=most, levels=levels)
        for name, value in vectors.items():
            quantised = quantize([value], 1.0, levels)[0].astype(np.int64)
            summed[name] = summed.get(name, 0) + quantised
    # What SecAgg+'s unmasking computes: dequantise the sum, shifted back by the clients' offsets.
    sums = {name: dequantize([value], 1.0, levels)[0] - (clients - 1) for name, value in summed.items()}
    secure, clipped = from_secure_sums(sums, dims=dims, norm=norm, max_examples=most, levels=levels)
    plain = FeatureStatistics.of(np.vstack([f for f, _ in parts]), np.concatenate([y for _, y in parts]),
                                 num_classes=classes)
    assert clipped == 0
    np.testing.assert_array_equal(secure.class_counts, plain.class_counts)
    # Two digits: the error is that of the second digit's rounding, plus floating-point rounding.
    bound = clients * 4 / levels**2 * most * norm**2 + 1e-12 * np.abs(plain.gram).max()
    assert np.abs(secure.gram - plain.gram).max() <= bound
    # One quantised value per entry would have been off by up to this much:
    assert bound < 1e-6 * clients * 2 / levels * most * norm**2
    assert logme(secure) == pytest.approx(logme(plain), abs=1e-9)


def test_the_first_digit_goes_through_flowers_quantisation_exactly() -> None:
    from flwr.common.secure_aggregation.quantization import quantize

    levels = 2**28
    values = np.random.default_rng(0).uniform(-1, 1, 100_000)
    hi, lo = two_digits(values, levels)
    assert ((lo >= 0) & (lo <= 1)).all()
    np.testing.assert_allclose(from_two_digits(hi, lo, levels), values, rtol=0, atol=1e-15)
    steps = (hi + 1) * (levels / 2)
    for _ in range(3):  # stochastic rounding draws nothing for a value on the grid
        np.testing.assert_array_equal(quantize([hi], 1.0, levels)[0], steps.astype(np.int64))


def test_a_client_refuses_more_examples_than_the_sums_are_scaled_for() -> None:
    from fedtune.protocol import RefusedMessage

    with pytest.raises(RefusedMessage, match="holds 11 examples, more than the 10"):
        secure_vectors(np.ones((11, 3)), np.zeros(11, dtype=int), num_classes=2, norm=5.0, max_examples=10,
                       levels=2**10)


def test_longer_features_are_clipped_to_the_bound_and_counted() -> None:
    features = np.array([[3.0, 4.0], [0.3, 0.4]])
    vectors = secure_vectors(features, np.array([0, 1]), num_classes=2, norm=1.0, max_examples=10, levels=2**20)
    parts = {part: from_two_digits(vectors[f"{part}.hi"], vectors[f"{part}.lo"], 2**20) for part in ("clipped",
                                                                                                     "gram-triangle")}
    assert parts["clipped"][0] * 10 == pytest.approx(1)
    assert parts["gram-triangle"][0] * 10 == pytest.approx(0.6**2 + 0.3**2)


def test_select_under_secure_aggregation_scores_the_sums_alone(tmp_path: Path) -> None:
    from fedtune.simulation import select

    overrides = [*SMALL, f"output.dir={tmp_path / 'runs'}", "privacy.secure_aggregation.enabled=true"]
    cfg = load_config(QUICKSTART, overrides)
    candidate = Candidate.parse("efficientnet_lite0@blocks_5")

    selection, folder = select(cfg, [candidate])

    assert selection.secure_aggregation and len(selection.clients_used) == 3 and not selection.clients_refused
    pooled = _pooled_here(candidate.configure(cfg), [0, 1, 2])
    assert selection.scores[0].examples == pooled.count
    assert selection.scores[0].logme == pytest.approx(logme(pooled), abs=1e-3)
    report = json.loads((folder / SELECTION_JSON).read_text())["secure"]
    assert report["candidates"][candidate.label]["features_clipped"] == 0
    assert report["quantization_levels"] == 2**30


# --- on real nodes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_select_ranks_on_real_nodes_over_tls(tmp_path: Path) -> None:
    from real_nodes import serve_once

    runs = tmp_path / "runs"
    task = ["--select", "efficientnet_lite0@blocks_3 efficientnet_lite0@blocks_5:none", "--sample", "0.5"]
    overrides = ["federation.num_clients=2", "data.image_size=32", "train.unfreeze=[]", f"output.dir={runs}"]
    nodes = serve_once(tmp_path, QUICKSTART, task, overrides)
    (folder,) = runs.glob("quickstart-select-*")
    selection = json.loads((folder / SELECTION_JSON).read_text())
    assert len(selection["clients_used"]) == 2 and not selection["clients_refused"]
    # --sample went through the run config to every node's query: half of each node's training split.
    assert selection["sample"] == 0.5
    settings_of = ClientSettings.of(sampled(load_config(QUICKSTART, overrides), 0.5), num_classes=NUM_CLASSES,
                                    run_key="here")
    halves = [len(local_data(settings_of, NodeIdentity(partition_id=partition, num_partitions=2,
                                                       cache_root=Path("unused"), simulated=True)).train)
              for partition in range(2)]
    assert [s["examples"] for s in selection["scores"]] == [sum(halves)] * 2
    assert {s["candidate"] for s in selection["scores"]} == {"efficientnet_lite0@blocks_3",
                                                             "efficientnet_lite0@blocks_5:none"}
    for partition in range(2):  # each node cached both models on its own disk
        assert len(list((nodes.cache(partition) / "models").glob("*.safetensors"))) == 2


def test_server_takes_a_sample_only_with_select(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["server", str(QUICKSTART), "--sample", "0.5", "--set", f"output.dir={tmp_path}"])
    assert done.exit_code == 2
    assert "--sample: applies to --select alone" in done.output


def test_random_init_above_its_imagenet_weights_is_flagged_as_negative_transfer() -> None:
    def scored(label: str, value: float) -> CandidateScore:
        candidate = Candidate.parse(label)
        return CandidateScore(candidate=label, backbone=candidate.backbone, weights=candidate.weights,
                              cut=candidate.cut, feature_dim=8, examples=10, logme_centred=value, logme=0.0,
                              h_score=0.5, shrunk_h_score=0.4, seconds=1.0, bytes_sent=10, bytes_received=20)

    def selection(*scores: CandidateScore) -> Selection:
        return Selection(name="digits", scores=list(scores), clients=2, clients_used=[0, 1], clients_refused={},
                         clients_failed={}, seconds=1.0, bytes_sent=1, bytes_received=1)

    flagged = selection(scored("efficientnet_lite0", 0.2), scored("efficientnet_lite0:none", 0.3),
                        scored("efficientnet_lite0@blocks_5", 0.25))
    assert flagged.negative_transfer == [
        "negative transfer: efficientnet_lite0:none (random init) scores 0.3000, above efficientnet_lite0 with "
        "ImageNet weights (0.2000)"]
    assert json.loads(flagged.to_json())["negative_transfer"] == flagged.negative_transfer
    out = io.StringIO()
    print_table(flagged, file=out)
    assert "negative transfer: efficientnet_lite0:none" in out.getvalue()
    # Below its pretrained twin, or with no pretrained twin of the same cut, random init says nothing.
    assert not selection(scored("efficientnet_lite0", 0.4), scored("efficientnet_lite0:none", 0.3)).negative_transfer
    assert not selection(scored("efficientnet_lite0@blocks_5", 0.1),
                         scored("efficientnet_lite0:none", 0.3)).negative_transfer
