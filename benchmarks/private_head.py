"""Which DP settings train a head on frozen features best: a grid at one epsilon, in-process.

    python benchmarks/private_head.py configs/quickstart.yaml --out benchmarks/results/private-head-digits
    python benchmarks/private_head.py configs/antsbees.yaml --out benchmarks/results/private-head-antsbees

One client holding all the training data (its validation split set aside, as a client does)
trains the head over the config's rounds with fedtune's own DP-SGD (`train_private_round`: Opacus,
the ledger, noise calibrated once for the whole plan), for each DP batch size (train.batch_size, a
larger one, and the full batch: DP-GD), local epochs and learning rate in the grid; the held-out
split scores it. Medians over seeds. The same features and code path as a federation with one
client, without its messaging, so a grid of a hundred runs takes minutes.

With `--normalise NORM` every feature vector is first scaled to that L2 norm (feature
normalisation, as in Tramèr & Boneh 2021; a fixed function of each example, so the guarantee is
unchanged): it measures whether fedtune should offer it.

What it decides: the DP batch and step count that `benchmarks/privacy.py table` sets beside the
defaults. The grid is tuned on the held-out split, so its best row is optimistic: choosing
hyper-parameters on private data spends privacy that no single run accounts for. Here the data
are public benchmarks; on private data, take settings found on public data like these.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Literal

import torch
from tables import write_results
from torch.utils.data import Subset, TensorDataset

from fedtune.backbones import build_model, preprocessing_for
from fedtune.client.privacy import PrivacyLedger, train_private_round
from fedtune.config import DPSGDConfig, ExperimentConfig, load_config
from fedtune.data import load_split
from fedtune.data.partitions import split_validation
from fedtune.engine import evaluate, extract_features, train_one_round
from fedtune.params import first_trainable_index, trainable_stages

CPU = torch.device("cpu")
LARGE_BATCH = 256
LOCAL_EPOCHS = (1, 2, 4, 8)
RATE_FACTORS = (1.0, 3.0, 10.0)  # learning rates tried: the config's, times these


def _features(cfg: ExperimentConfig) -> tuple[TensorDataset, TensorDataset, int]:
    """(train features with the validation split set aside, held-out features, classes)."""
    preprocessing = preprocessing_for(cfg.model.backbone).at_size(cfg.data.image_size).transform(augment=False)
    splits = {split: load_split(cfg.data.source, split, root=cfg.data.root, download=False, seed=cfg.seed)
              for split in ("train", "test")}
    classes = len(splits["train"].classes)
    model = build_model(cfg.model.backbone, num_classes=classes, weights=cfg.model.weights)
    start = first_trainable_index(model, trainable_stages(model, 0))
    train = splits["train"]
    kept, _ = split_validation(range(len(train)), train.targets, fraction=cfg.data.val_fraction, seed=cfg.seed)
    cached = [extract_features(model, Subset(train.with_transform(preprocessing), kept), stop=start, batch_size=64,
                               device=CPU),
              extract_features(model, splits["test"].with_transform(preprocessing), stop=start, batch_size=64,
                               device=CPU)]
    return cached[0], cached[1], classes


def _run(cfg: ExperimentConfig, data: TensorDataset, held_out: TensorDataset, classes: int, *,
         dp: DPSGDConfig | None, local_epochs: int, lr: float, seed: int) -> tuple[float, PrivacyLedger]:
    """Final held-out accuracy of the config's rounds of head training on `data`, and the DP ledger."""
    torch.manual_seed(seed)
    model = build_model(cfg.model.backbone, num_classes=classes, weights=cfg.model.weights)
    stages = trainable_stages(model, 0)
    start = first_trainable_index(model, stages)
    train_cfg = cfg.train.model_copy(update={"local_epochs": local_epochs, "lr": lr, "unfreeze": ()})
    ledger = PrivacyLedger()
    for server_round in range(1, cfg.federation.rounds + 1):
        round_seed = seed * 1000 + server_round
        if dp is None:
            train_one_round(model, data, stages=stages, cfg=train_cfg, start=start, freeze_statistics=True,
                            seed=round_seed, device=CPU)
        else:
            train_private_round(model, data, stages=stages, cfg=train_cfg, dp=dp, ledger=ledger,
                                planned_rounds=cfg.federation.rounds, start=start, seed=round_seed, device=CPU)
    return evaluate(model, held_out, start=start, device=CPU).accuracy, ledger


def _scaled_to_norm(features: TensorDataset, norm: float) -> TensorDataset:
    """Each feature vector scaled to L2 norm `norm`: a fixed function of each example, so DP-SGD on it
    gives the same guarantee."""
    vectors, labels = features.tensors
    return TensorDataset(norm * vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12), labels)


def study(config: Path, out: Path, *, epsilon: float, seeds: int, normalise: float | None) -> None:
    cfg = load_config(config, overrides=["train.trainable_blocks=0", "train.unfreeze=[]"])
    data, held_out, classes = _features(cfg)
    if normalise is not None:
        data, held_out = _scaled_to_norm(data, normalise), _scaled_to_norm(held_out, normalise)
    batches: list[int | Literal["full"]] = [size for size in (cfg.train.batch_size, LARGE_BATCH) if size < len(data)]
    batches.append("full")
    rows = []
    for lr_factor in RATE_FACTORS:
        lr = cfg.train.lr * lr_factor
        accuracies = [_run(cfg, data, held_out, classes, dp=None, local_epochs=cfg.train.local_epochs, lr=lr,
                           seed=seed)[0] for seed in range(seeds)]
        rows.append({"DP batch": "non-private", "local epochs": cfg.train.local_epochs, "lr": lr,
                     "steps": "-", "noise multiplier": "-",
                     "accuracy (median)": statistics.median(accuracies)})
    for batch, local_epochs, lr_factor in itertools.product(batches, LOCAL_EPOCHS, RATE_FACTORS):
        lr = cfg.train.lr * lr_factor
        # Reproducible noise: public data, and figures anyone can regenerate exactly.
        dp = DPSGDConfig(enabled=True, target_epsilon=epsilon, target_delta=1e-5, batch_size=batch, reproducible=True)
        runs = [_run(cfg, data, held_out, classes, dp=dp, local_epochs=local_epochs, lr=lr, seed=seed)
                for seed in range(seeds)]
        ledger = runs[0][1]
        steps = sum(count for _, _, count in ledger.history)
        noise = ledger.noise_multiplier
        accuracies = [accuracy for accuracy, _ in runs]
        rows.append({"DP batch": batch, "local epochs": local_epochs, "lr": lr, "steps": steps,
                     "noise multiplier": noise, "accuracy (median)": statistics.median(accuracies)})
        print(rows[-1], flush=True)
    note = (f"{config.name}: one client with all {len(data)} training examples (validation split set aside), "
            f"{cfg.federation.rounds} rounds, head only, epsilon {epsilon:g} (delta 1e-5, RDP), median of {seeds} "
            f"seeds, accuracy on the {len(held_out)} held-out examples after the last round."
            + ("" if normalise is None else f" Every feature vector scaled to L2 norm {normalise:g}."))
    print(write_results(out, rows, note))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--normalise", type=float, metavar="NORM",
                        help="scale every feature vector to this L2 norm (feature normalisation)")
    args = parser.parse_args()
    study(args.config, args.out, epsilon=args.epsilon, seeds=args.seeds, normalise=args.normalise)


if __name__ == "__main__":
    main()
