"""Server checkpoints: written atomically every round, and a crashed run resumes to the same model."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from interruptions import crash_in_round
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from fedtune.config import load_config
from fedtune.report import RunDirectory
from fedtune.server import checkpoint as checkpoint_module
from fedtune.server.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, RandomState, find_resumable
from fedtune.simulation import simulate
from fedtune.strategies import build_strategy, restore_strategy_state, strategy_state

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, *overrides: str):  # noqa: ANN202 - an ExperimentConfig
    return load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=2", "federation.rounds=3", "train.local_epochs=1",
        "train.unfreeze=[{from_round: 3, trainable_blocks: 1}]", "strategy.name=fedadam",
        f"output.dir={tmp_path / 'runs'}", *overrides,
    ])


def test_checkpoint_round_trip_restores_moments_and_random_generators(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    strategy = build_strategy(cfg)
    strategy.m_t = {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}  # type: ignore[attr-defined]
    strategy.v_t = {"head.weight": np.full((2, 3), 0.5, dtype=np.float32)}  # type: ignore[attr-defined]
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, scalars = strategy_state(strategy)
    checkpoint = Checkpoint(
        round=2, run_key="quickstart-abc", model_hash="f" * 64, elapsed_seconds=12.5,
        model={"head.weight": torch.randn(2, 3)}, strategy_tensors=tensors, strategy_scalars=scalars,
        random_state=RandomState.capture(), early_stopping={"best": 0.5, "best_round": 1, "stale": 1},
        at_budget=[42], privacy={"released_noise": [], "dp_sgd_clients": {"42": {"noise_multiplier": 1.0}}},
        deliveries={7: 1},
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    path = checkpoint.save(tmp_path)

    loaded = Checkpoint.load(path)
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, loaded.strategy_tensors, loaded.strategy_scalars)
    assert np.array_equal(fresh.m_t["head.weight"], strategy.m_t["head.weight"])  # type: ignore[attr-defined]
    assert np.array_equal(fresh.v_t["head.weight"], strategy.v_t["head.weight"])  # type: ignore[attr-defined]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded.random_state.restore()
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert torch.equal(loaded.model["head.weight"], checkpoint.model["head.weight"])
    assert (loaded.round, loaded.run_key, loaded.at_budget, loaded.deliveries) == (2, "quickstart-abc", [42], {7: 1})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp file left behind


def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
    run_dir.write_config(cfg.to_json())
    (run_dir.path / CHECKPOINT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    found = find_resumable(cfg)
    assert found == run_dir.path / CHECKPOINT_FILE
    with pytest.raises(CheckpointError, match="cannot be read.*not used and is left as it is.*output.resume=false"):
        Checkpoint.load(found)
    assert (run_dir.path / CHECKPOINT_FILE).read_bytes().endswith(b"not a header")
    # A different config (here: one more round) is a different run, never resumed.
    assert find_resumable(_config(tmp_path, "federation.rounds=4")) is None


def _saved_checkpoint(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    checkpoint = Checkpoint(
        round=2, run_key="exp-0123456789ab", model_hash="a" * 64, elapsed_seconds=3.0,
        model={"head.weight": torch.full((4, 3), 0.5), "head.bias": torch.zeros(4)}, strategy_tensors={},
        strategy_scalars={}, random_state=RandomState.capture(), early_stopping={"best": None, "best_round": 0,
                                                                                  "stale": 0},
        at_budget=[], privacy={}, deliveries={},
    )
    return checkpoint.save(folder)


def _header(raw: bytes) -> tuple[int, dict]:
    length = int.from_bytes(raw[:8], "little")
    return 8 + length, json.loads(raw[8:8 + length])


def _expect_refused(path: Path, match: str) -> None:
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match) as error:
        Checkpoint.load(path)
    assert str(path) in str(error.value) and "it was not used and is left as it is" in str(error.value)
    assert path.read_bytes() == before  # never rewritten, never deleted


def test_a_crashed_run_resumes_with_monitoring_switched_on_and_from_before_newer_settings(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
    recorded = json.loads(cfg.to_json())
    # Written by a fedtune without the monitoring settings: they count at their defaults.
    del recorded["output"]["tensorboard"], recorded["output"]["mlflow"]
    run_dir.write_config(json.dumps(recorded))
    (run_dir.path / CHECKPOINT_FILE).write_bytes(b"checkpoint")

    assert find_resumable(cfg) == run_dir.path / CHECKPOINT_FILE
    # How the run is watched is not what it computes: switching TensorBoard on still resumes it.
    assert find_resumable(_config(tmp_path, "output.tensorboard=true")) == run_dir.path / CHECKPOINT_FILE
    assert find_resumable(_config(tmp_path, "train.lr=0.5")) is None
    # A config.json this fedtune cannot read is not resumed, and not touched.
    (run_dir.path / "config.json").write_text('{"model": {"backbone": "no-such-net"}}')
    assert find_resumable(cfg) is None


def test_an_exponent_bit_flipped_in_a_weight_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = _saved_checkpoint(tmp_path)
    assert torch.equal(Checkpoint.load(path).model["head.weight"], torch.full((4, 3), 0.5))
    raw = bytearray(path.read_bytes())
    data_start, header = _header(bytes(raw))
    first_byte = data_start + header["model/head.weight"]["data_offsets"][0]
    raw[first_byte + 3] ^= 0x40  # float32 little-endian: 0.5 becomes 1.7e38
    path.write_bytes(bytes(raw))

    _expect_refused(path, "is damaged: its contents do not match its checksum")


def test_a_changed_state_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = _saved_checkpoint(tmp_path)
    raw = path.read_bytes()
    assert raw.count(b'\\"round\\": 2') == 1  # the state is JSON inside the JSON header
    path.write_bytes(raw.replace(b'\\"round\\": 2', b'\\"round\\": 7'))

    _expect_refused(path, "is damaged: its contents do not match its checksum")


def _rewrite_state(path: Path, change: Callable[[dict], None], *, recompute_checksum: bool) -> None:
    raw = path.read_bytes()
    tensors = checkpoint_module.load_tensors(raw)
    metadata = dict(_header(raw)[1]["__metadata__"])
    state = json.loads(metadata["fedtune.checkpoint"])
    change(state)
    metadata["fedtune.checkpoint"] = json.dumps(state)
    if recompute_checksum:  # as a checkpoint written by another program (or version) would be
        metadata["fedtune.checkpoint.sha256"] = checkpoint_module._digest(tensors, metadata["fedtune.checkpoint"])
    path.write_bytes(save_tensors(tensors, metadata=metadata))


def test_a_checkpoint_lacking_a_key_is_named_not_a_bare_key_error(tmp_path: Path) -> None:
    path = _saved_checkpoint(tmp_path)
    _rewrite_state(path, lambda state: state.pop("round"), recompute_checksum=False)
    _expect_refused(path, "is damaged")

    path = _saved_checkpoint(tmp_path / "consistent")
    _rewrite_state(path, lambda state: state.pop("round"), recompute_checksum=True)
    _expect_refused(path, "lacks 'round'")

    path = _saved_checkpoint(tmp_path / "malformed")
    _rewrite_state(path, lambda state: state.update(at_budget="everyone"), recompute_checksum=True)
    _expect_refused(path, "holds a malformed value")


def test_a_checkpoint_without_a_checksum_is_not_used(tmp_path: Path) -> None:
    """Checkpoints of the format before checksums (1) cannot be verified, so they are not resumed."""
    path = _saved_checkpoint(tmp_path)
    raw = path.read_bytes()
    metadata = dict(_header(raw)[1]["__metadata__"])
    del metadata["fedtune.checkpoint.sha256"]
    path.write_bytes(save_tensors(checkpoint_module.load_tensors(raw), metadata=metadata))

    _expect_refused(path, r"has no checksum \(format 2; this fedtune writes 2\), so it cannot be verified")


def test_a_crashed_run_resumes_and_ends_with_the_uninterrupted_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAdam (server-side moments), DP-SGD (client ledgers) and LoRA adapters in conv_head from round 2:
    stop the server after round 3 trained but before it was checkpointed, start it again, compare with
    an uninterrupted run. The checkpoint holds trained adapters; the resumed server draws the same LoRA A."""
    private = ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.target_epsilon=null",
               "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.reproducible=true",
               "train.adapter=lora", "train.unfreeze=[{from_round: 2, trainable_blocks: 1}]"]
    uninterrupted = simulate(_config(tmp_path / "a", *private))

    cfg = _config(tmp_path / "b", *private)
    run_dir = crash_in_round(monkeypatch, cfg, crashed_round=3)
    assert any(".lora_B." in key for key in Checkpoint.load(run_dir / CHECKPOINT_FILE).model)  # round 2's adapters

    resumed = simulate(cfg)

    assert resumed.run_dir == run_dir and resumed.rounds_completed == 3
    assert not (run_dir / CHECKPOINT_FILE).exists()  # the finished run keeps only its model
    final, expected = load_file(resumed.run_dir / "model.safetensors"), load_file(uninterrupted.run_dir /
                                                                                   "model.safetensors")
    assert final.keys() == expected.keys()
    different = [key for key in final if not torch.equal(final[key], expected[key])]
    assert not different, f"tensors differ after the resume: {different[:5]}"
    history = RunDirectory.load_history(run_dir / "history.json")
    assert [r.round for r in history] == [0, 1, 2, 3]
    # The clients' ledgers span the restart (one per client, keyed by the run, not by Flower's run):
    # round 3 ran twice on the clients, and both count, so epsilon is at least the uninterrupted one.
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "completed 3 rounds"
    epsilon_resumed = max(v for k, v in history[-1].extra.items() if k.startswith("epsilon_client_"))
    reference = RunDirectory.load_history(uninterrupted.run_dir / "history.json")[-1]
    epsilon_reference = max(v for k, v in reference.extra.items() if k.startswith("epsilon_client_"))
    assert epsilon_resumed > epsilon_reference


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ({"stages.head.9.weight": torch.zeros(2)}, "tensor keys the model lacks: \\['stages.head.9.weight'\\]"),
        ({"stages.head.1.weight": torch.zeros(3, 3)}, "stages.head.1.weight: shape \\(3, 3\\) does not match"),
        ({"evil": torch.zeros(1)}, "'evil' is not a key of a staged model"),
    ],
)
def test_a_checkpoint_whose_model_tensors_do_not_fit_is_refused_naming_them(
    tmp_path: Path, model: dict[str, torch.Tensor], problem: str
) -> None:
    """A checkpoint holds the tensors training changed (the head here); they go over a model built afresh."""
    from fedtune.backbones import build_model
    from fedtune.params import state_hash
    from fedtune.server.run import run_federation

    cfg = _config(tmp_path)
    torch.manual_seed(cfg.seed)  # as run_federation builds it: the new head's initial weights are drawn
    initial = build_model(cfg.model.backbone, num_classes=10, weights=cfg.model.weights,
                          head_dropout=cfg.model.head_dropout)
    run_dir = RunDirectory.create(cfg.output.dir, cfg.name)
    run_dir.write_config(cfg.to_json())
    Checkpoint(
        round=1, run_key="exp-0123456789ab", model_hash=state_hash(initial.state_dict()), elapsed_seconds=1.0,
        model=model, strategy_tensors={}, strategy_scalars={}, random_state=RandomState.capture(),
        early_stopping={"best": None, "best_round": 0, "stale": 0}, at_budget=[], privacy={}, deliveries={},
    ).save(run_dir.path)
    before = (run_dir.path / CHECKPOINT_FILE).read_bytes()

    with pytest.raises(CheckpointError, match=f"the checkpoint's model tensors do not fit this model \\({problem}"):
        run_federation(object(), cfg)  # type: ignore[arg-type]  # refused before any node is asked anything
    assert (run_dir.path / CHECKPOINT_FILE).read_bytes() == before
