"""The experiment file: validation errors name the key; overrides; the unfreeze schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import ConfigError, load_config
from fedtune.protocol import ClientSettings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_committed_configs_are_valid() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("train:\n  lrr: 0.1\n", "train.lrr", "unknown key"),
        ("train:\n  lr: -1\n", "train.lr", "greater than 0"),
        ("train:\n  lr: fast\n", "train.lr", "valid number"),
        ("federation:\n  num_clients: 0\n", "federation.num_clients", "greater than or equal to 1"),
        ("strategy:\n  name: fedsgd\n", "strategy.name", "'fedavg'"),
        ("data:\n  source: mnist\n", "data", "unknown data source 'mnist'"),
        ("data:\n  partition:\n    scheme: dirichlet\n    alpha: 0\n", "data.partition.alpha", "greater than 0"),
        ("federation:\n  num_clients: 2\n  clients_per_round: 3\n", "federation", "exceeds num_clients"),
        ("train:\n  trainable_blocks: some\n", "train.trainable_blocks", "'all'"),
        (
            "federation:\n  rounds: 3\ntrain:\n  unfreeze:\n    - {from_round: 5, trainable_blocks: 1}\n",
            "train.unfreeze",
            "after the last round",
        ),
        (
            "train:\n  trainable_blocks: 2\n  unfreeze:\n    - {from_round: 2, trainable_blocks: 1}\n",
            "train",
            "must not decrease",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    message = str(error.value)
    assert "\n" not in message
    assert f"{key}:" in message
    assert hint in message


def test_not_a_mapping_and_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr=0.02", "train.trainable_blocks=all",
                                                               "data.augment=true", "federation.rounds=7"])
    assert cfg.train.lr == 0.02
    assert cfg.train.trainable_blocks == "all"
    assert cfg.data.augment is True
    assert cfg.federation.rounds == 7
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(write(tmp_path, "{}"), ["train.nope=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, "{}"), ["train.lr"])


def test_unfreeze_schedule_by_round(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "federation:\n  rounds: 8\ntrain:\n  trainable_blocks: 0\n  unfreeze:\n"
            "    - {from_round: 4, trainable_blocks: 1}\n    - {from_round: 7, trainable_blocks: all}\n",
        )
    )
    assert [cfg.train.trainable_blocks_at(r) for r in range(1, 9)] == [0, 0, 0, 1, 1, 1, "all", "all"]


def test_client_settings_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.05\n"))
    text = ClientSettings.of(cfg, num_classes=10).to_message()
    settings = ClientSettings.from_message(text)
    assert settings.train.lr == 0.05
    assert settings.num_classes == 10
    assert len(text) < 400  # rides along with every message: keep it small


def test_unknown_backbone_and_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model: unknown backbone 'resnet17'; known: .*resnet18"):
        load_config(write(tmp_path, "model:\n  backbone: resnet17\n"))
    with pytest.raises(ConfigError, match="model.weights: no weights file at /nowhere/w.safetensors"):
        load_config(write(tmp_path, "model:\n  weights: /nowhere/w.safetensors\n"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert load_config(write(tmp_path, f"model:\n  weights: {weights}\n")).model.weights == str(weights)


# --- the file itself: empty, duplicated, not UTF-8, too deep, too large ---------------------------


def load_error(tmp_path: Path, text: str | bytes, overrides: list[str] | None = None) -> str:
    path = tmp_path / "exp.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides or [])
    message = str(error.value)
    assert "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_refused_and_says_how_to_ask_for_the_defaults(tmp_path: Path, text: str) -> None:
    assert "the file is empty (or holds only comments); to run with every default setting, write {} in it" in (
        load_error(tmp_path, text))
    assert load_config(write(tmp_path, "{}")) == load_config(write(tmp_path, "# the defaults\n{}\n"))


def test_a_section_written_twice_is_an_error_naming_it_and_its_lines(tmp_path: Path) -> None:
    # The case: the second train: section silently turned adam / lr 0.5 into sgd / 0.01.
    text = "train:\n  optimizer: adam\n  lr: 0.5\nfederation:\n  rounds: 2\ntrain:\n  lr: 0.01\n"
    message = load_error(tmp_path, text)
    assert "not valid YAML: line 6, column 1: duplicate key train (lines 1 and 6)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: 0.5\n  momentum: 0.8\n  lr: 0.01\n", "duplicate key train.lr (lines 2 and 4)"),
        ("privacy:\n  dp_sgd:\n    enabled: true\n    enabled: false\n", "duplicate key privacy.dp_sgd.enabled"),
        ("train:\n  unfreeze:\n    - {from_round: 2, from_round: 3, trainable_blocks: 1}\n",
         "duplicate key train.unfreeze[0].from_round"),
        ("train: {lr: 0.1, lr: 0.2}\n", "duplicate key train.lr (lines 1 and 1)"),
    ],
)
def test_duplicate_keys_at_any_depth_are_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in load_error(tmp_path, text)


def test_duplicate_keys_in_an_override_and_merge_keys(tmp_path: Path) -> None:
    assert "--set train: not valid YAML" in load_error(tmp_path, "{}", ["train={lr: 0.1, lr: 0.2}"])
    assert "duplicate key lr" in load_error(tmp_path, "{}", ["train={lr: 0.1, lr: 0.2}"])
    # A YAML merge (<<) followed by keys of the mapping's own is an override, as YAML means it.
    cfg = load_config(write(tmp_path, "federation: {rounds: 5}\ntrain:\n  unfreeze:\n"
                                      "    - &step {from_round: 2, trainable_blocks: 1}\n"
                                      "    - <<: *step\n      from_round: 3\n      trainable_blocks: 2\n"))
    assert [(s.from_round, s.trainable_blocks) for s in cfg.train.unfreeze] == [(2, 1), (3, 2)]


def test_not_utf8_is_named_with_the_byte(tmp_path: Path) -> None:
    message = load_error(tmp_path, "name: caf\xe9\n".encode("latin-1"))
    assert message.endswith("exp.yaml: not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8")
    assert load_config(write(tmp_path, "\ufeffname: with-bom\n")).name == "with-bom"  # a BOM is fine


@pytest.mark.parametrize(
    "text",
    [
        "train: " + "[" * 5000 + "]" * 5000 + "\n",
        "train: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
        # 700 levels: the indentation alone makes the file 490 KB
        "".join("  " * depth + f"k{depth}:\n" for depth in range(700)) + "  " * 700 + "end: 1\n",
    ],
    ids=["flow-lists", "flow-maps", "block-maps"],
)
def test_nesting_thousands_of_levels_deep_is_an_error_not_a_recursion_error(tmp_path: Path, text: str) -> None:
    assert "nested more than 32 levels deep" in load_error(tmp_path, text)


def test_aliases_cannot_expand_without_bound(tmp_path: Path) -> None:
    # Nine levels of nine aliases each: 387 million values from a few hundred bytes.
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    assert "more than 100000 values once its aliases are expanded" in load_error(tmp_path, "\n".join(lines) + "\n")
    assert "alias *a refers to a node that contains it" in load_error(tmp_path, "train: &a {lr: *a}\n")


def test_file_size_is_bounded_and_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    assert "larger than 1024 KB" in load_error(tmp_path, "name: " + "x" * (1 << 20) + "\n")
    # Under the bound, a long value or key is shown cut, with its length.
    message = load_error(tmp_path, "name: " + "y" * 900_000 + "!\n")
    assert "name: String should have at most 128 characters" in message and "... (900003 characters))" in message
    assert "... (200000 characters): unknown key" in load_error(tmp_path, "train:\n  ? " + "k" * 200_000 + "\n  : 1\n")
    assert "(100002 characters)" in load_error(tmp_path, "{}", ["model.backbone=" + "b" * 100_000])
    assert "data.source: String should have at most 256 characters" in load_error(
        tmp_path, "{}", ["data.source=" + "s" * 100_000])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("federation:\n  num_clients: true\n", "federation.num_clients: Input should be a valid integer (got True)"),
        ("train:\n  lr: false\n", "train.lr: Input should be a valid number (got False)"),
        ("train:\n  batch_size: 1e18\n", "train.batch_size: Input should be a valid integer (got 1e+18)"),
        ("train:\n  batch_size: 32.0\n", "train.batch_size: Input should be a valid integer (got 32.0)"),
        ("train:\n  local_epochs: '3'\n", "train.local_epochs: Input should be a valid integer (got '3')"),
        ("data:\n  augment: 1\n", "data.augment: Input should be a valid boolean (got 1)"),
        ("train:\n  lr: .inf\n", "train.lr: Input should be a finite number (got inf)"),
        ("seed: .nan\n", "seed: Input should be a valid integer (got nan)"),
    ],
)
def test_numbers_are_numbers_and_nothing_else(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in load_error(tmp_path, text)


def test_exponent_floats_and_integers_where_floats_are_expected(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 (no dot) and 2.5e2 (no sign) as strings; a config means numbers.
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 2.5e2\nfederation:\n  client_gpus: 1\n"))
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.federation.client_gpus) == (0.001, 250.0, 1.0)
    assert isinstance(cfg.federation.client_gpus, float)
    assert load_config(write(tmp_path, "{}"), ["train.lr=5e-4"]).train.lr == 0.0005


def test_yaml_errors_are_one_line_with_their_position(tmp_path: Path) -> None:
    assert "exp.yaml: not valid YAML: line 2, column 1: while parsing a flow sequence expected ',' or ']'" in (
        load_error(tmp_path, "train: [unclosed\n"))
    assert "--set train.lr: not valid YAML: line 1, column" in load_error(tmp_path, "{}", ["train.lr=[unclosed"])
    assert "special characters are not allowed" in load_error(tmp_path, "name: a\x00b\n")


QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["federation.evaluation.every=0"], "federation.evaluation.every", "greater than or equal to 1"),
        (["federation.evaluation.every=2.0"], "federation.evaluation.every", "valid integer"),
        (["federation.evaluation.enabled=1"], "federation.evaluation.enabled", "valid boolean"),
        (["federation.evaluation.fraction=0"], "federation.evaluation.fraction", "greater than 0"),
        (["federation.evaluation.fraction=1.5"], "federation.evaluation.fraction", "less than or equal to 1"),
        (["federation.evaluation.fraction=.nan"], "federation.evaluation.fraction", "finite number"),
        (["federation.evaluation.clients_per_round=0"], "federation.evaluation.clients_per_round",
         "greater than or equal to 1"),
        (["federation.evaluation.clients_per_round=11"], "federation",
         "evaluation.clients_per_round (11) exceeds num_clients (10)"),
        (["federation.evaluation.clients_per_round=3", "federation.evaluation.fraction=0.5"],
         "federation.evaluation", "set clients_per_round or fraction, not both"),
        (["federation.evaluation.evry=2"], "federation.evaluation.evry", "unknown key"),
        (["federation.evaluation=every 2"], "federation.evaluation", "valid dictionary"),
        # Early stopping on a metric no round measures would never stop the run.
        (["early_stopping.enabled=true", "federation.evaluation.enabled=false"], "early_stopping.metric",
         "federated_accuracy is never measured (federation.evaluation is off"),
        (["early_stopping.enabled=true", "data.val_fraction=0"], "early_stopping.metric",
         "federated_accuracy is never measured (data.val_fraction is 0"),
    ],
)
def test_invalid_evaluation_settings_name_the_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, overrides)
    message = str(error.value)
    assert f"{key}:" in message and hint in message, message


def test_federated_evaluation_schedule_and_sample_size_default_to_every_round_and_the_trained_clients() -> None:
    from fedtune.strategies import sampling

    cfg = load_config(QUICKSTART)  # every round, as many clients as train: as before the setting existed
    assert cfg.federated_evaluation and all(cfg.federation.evaluates_in(r) for r in range(1, 9))
    assert sampling(cfg)["fraction_evaluate"] == 1.0 and sampling(cfg)["min_evaluate_nodes"] == 10
    assert load_config(QUICKSTART, ["federation.clients_per_round=4"]).federation.evaluated_per_round == 4

    every = load_config(QUICKSTART, ["federation.rounds=7", "federation.evaluation.every=3"])
    assert [r for r in range(1, 8) if every.federation.evaluates_in(r)] == [3, 6, 7]  # and always the last
    only_last = load_config(QUICKSTART, ["federation.rounds=3", "train.unfreeze=[]", "federation.evaluation.every=100"])
    assert [r for r in range(1, 4) if only_last.federation.evaluates_in(r)] == [3]

    counted = load_config(QUICKSTART, ["federation.clients_per_round=2", "federation.evaluation.clients_per_round=7"])
    assert sampling(counted)["fraction_evaluate"] == 0.7 and sampling(counted)["min_evaluate_nodes"] == 7
    # A fraction of num_clients, rounded down without float noise (0.29 x 100 = 28.999999999999996), at least one.
    hundred = ["federation.num_clients=100", "federation.evaluation.fraction=0.29"]
    assert load_config(QUICKSTART, hundred).federation.evaluated_per_round == 29
    assert load_config(QUICKSTART, ["federation.evaluation.fraction=0.01"]).federation.evaluated_per_round == 1

    off = load_config(QUICKSTART, ["federation.evaluation.enabled=false"])
    assert not off.federated_evaluation and not any(off.federation.evaluates_in(r) for r in range(1, 9))
    assert sampling(off)["fraction_evaluate"] == 0.0 and sampling(off)["min_evaluate_nodes"] == 0
    no_split = load_config(QUICKSTART, ["data.val_fraction=0"])
    assert not no_split.federated_evaluation and sampling(no_split)["fraction_evaluate"] == 0.0
