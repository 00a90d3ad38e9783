"""Checks of an experiment that need more than its schema (files, data, the backbone's blocks), before anything starts.

The schema (fedtune/config.py) knows the keys and their ranges; whether data.root holds the data,
whether trainable_blocks fits the backbone, or whether the checkpoint to resume from is intact
needs the files and the model. `fedtune check`, `fedtune simulate` and `fedtune server` run these
checks before Ray or Flower starts, so such a mistake costs a second rather than a cluster start,
and nothing is written; the run itself repeats the ones that concern the model it builds.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from fedtune.adapters import AdapterPlan, add_adapters
from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ExperimentConfig, shown
from fedtune.data import DOWNLOADING_SOURCES, ImageDataset, Split, load_split, partitioning
from fedtune.monitoring import mlflow_problem
from fedtune.params import personal_keys, trainable_stages
from fedtune.server.checkpoint import Checkpoint, CheckpointError, find_resumable


class PreflightError(ValueError):
    """The experiment cannot run as configured; the message is one line naming the key or the file."""


def preflight(cfg: ExperimentConfig, *, simulation: bool) -> None:
    """Raise PreflightError for anything that would stop the run once started and can be seen now.

    The server's side always: output.dir, output.mlflow, the test split (every image decoded), the model and
    its weights file, trainable_blocks and lr_multipliers against the backbone, and the checkpoint
    a run would resume from. With `simulation`, also the clients' side, which then reads the same
    data.root: the train split and its partitioning into federation.num_clients parts.
    """
    _check_output_dir(Path(cfg.output.dir))
    check_monitoring(cfg)
    test_set = _load(cfg, "test", decode_now=True)  # the server decodes all of it in round 0 anyway
    if test_set is not None and len(test_set.classes) < 2:
        raise PreflightError(f"data: the test split of {cfg.data.source} has {len(test_set.classes)} class; "
                             "a classifier needs at least 2")
    if simulation:
        train_set = _load(cfg, "train", decode_now=False)
        if train_set is not None:
            _check_partitioning(cfg, train_set)
    check_model_fits(cfg, _model(cfg, num_classes=len(test_set.classes) if test_set is not None else 2))
    _check_resumable(cfg)


def preflight_model(cfg: ExperimentConfig) -> None:
    """The model check of `preflight` alone (a `fedtune select` candidate: the rest is its experiment's):
    it builds (a cut that is a block, a readable weights file), the training settings fit it, and it
    takes an image of data.image_size (ViT-B/16 takes 224 px only)."""
    model = _model(cfg, num_classes=2)
    check_model_fits(cfg, model)
    size = cfg.data.image_size or preprocessing_for(cfg.model.backbone).crop_size
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as error:  # what torch and torchvision raise for a size
        raise PreflightError(f"data.image_size: {cfg.model.backbone} cannot take {size} px images: "
                             f"{str(error)[:200]}") from None


def check_model_fits(cfg: ExperimentConfig, model: StagedModel) -> None:
    """trainable_blocks (now and in every unfreeze step) and lr_multipliers' stages exist in the model,
    train.adapter finds layers to adapt, and fedbn finds BatchNorm layers that train."""
    blocks = model.block_names
    settings = [("train.trainable_blocks", cfg.train.trainable_blocks)]
    settings += [(f"train.unfreeze[{i}].trainable_blocks", step.trainable_blocks)
                 for i, step in enumerate(cfg.train.unfreeze)]
    for key, value in settings:
        if value != "all" and value > len(blocks):
            raise PreflightError(f"{key}: {value} is more than the {len(blocks)} blocks of {cfg.model.backbone} "
                                 f"({', '.join(blocks)}); use at most {len(blocks)}, or all")
    unknown = sorted(set(cfg.train.lr_multipliers) - set(model.stages))
    if unknown:
        raise PreflightError(f"train.lr_multipliers: {cfg.model.backbone} has no stage named "
                             f"{', '.join(shown(name) for name in unknown[:5])}; its stages: {', '.join(model.stages)}")
    widest = cfg.train.widest_blocks
    if cfg.train.adapter != "none" and not model.adapted_stages:
        try:  # a copy: the caller's model stays as built
            model = add_adapters(copy.deepcopy(model), AdapterPlan.of(cfg.train))
        except ValueError as error:
            raise PreflightError(str(error)) from None
    if cfg.personalization.method == "fedbn":
        if not personal_keys(model, trainable_stages(model, widest), cfg.personalization):
            raise PreflightError(f"personalization.method: fedbn keeps the BatchNorm layers of the trainable stages "
                                 f"local, and none of {cfg.model.backbone}'s trains with trainable_blocks up to "
                                 f"{widest} (train.adapter: {cfg.train.adapter}; an adapter keeps them frozen): "
                                 "train more blocks, or choose another method")


def check_monitoring(cfg: ExperimentConfig) -> None:
    """output.mlflow can log from here: MLflow is installed and takes the tracking URI's kind of store."""
    if cfg.output.mlflow is not None and (problem := mlflow_problem(cfg.output.mlflow)):
        raise PreflightError(problem)


def _check_output_dir(root: Path) -> None:
    # The nearest folder that exists must be one, and writable: else the run would fail only when
    # it makes its run directory, after the data, the model and the clients are ready.
    existing = next(path for path in (root, *root.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == root else f"cannot be made: {existing} is a file"
        raise PreflightError(f"output.dir: {root} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"output.dir: {root} cannot be written: no write permission in {existing}")


def _load(cfg: ExperimentConfig, split: Split, *, decode_now: bool) -> ImageDataset | None:
    """The split, or None where it is absent but data.download will fetch it when the run starts."""
    data = cfg.data
    try:
        return load_split(data.source, split, root=data.root, download=False, seed=cfg.seed,
                          bad_images=data.bad_images, decode_now=decode_now)
    except FileNotFoundError as error:
        if data.download and data.source.partition(":")[0] in DOWNLOADING_SOURCES:
            return None
        raise PreflightError(f"data: {error}") from None
    except (ValueError, OSError) as error:  # a bad image (BadImageError) names its file
        raise PreflightError(f"data: {error}") from None


def _check_partitioning(cfg: ExperimentConfig, train_set: ImageDataset) -> None:
    # As every virtual client computes it (fedtune/client/task.py); infeasible settings would fail them all.
    scheme, clients, examples = cfg.data.partition, cfg.federation.num_clients, len(train_set)
    # The common impossible request, said in the experiment's own keys before anything is drawn
    # (a federation larger than the data is named by partitioning itself).
    if clients <= examples < clients * scheme.min_examples:
        raise PreflightError(f"data.partition.min_examples={scheme.min_examples} x federation.num_clients={clients} "
                             f"needs {clients * scheme.min_examples} examples; {cfg.data.source} has {examples} "
                             "for training")
    try:
        partitioning(train_set.targets, scheme=scheme.scheme, num_partitions=clients, seed=cfg.seed,
                     alpha=scheme.alpha, shards_per_partition=scheme.shards_per_client,
                     min_examples=scheme.min_examples)
    except ValueError as error:
        raise PreflightError(f"data.partition: {error}") from None


def _model(cfg: ExperimentConfig, *, num_classes: int) -> StagedModel:
    # Published weights may need a download and are checked by their publisher; a weights file is
    # read here in full (format, shapes, finite values). Only the stages matter for the rest.
    weights = "none" if cfg.model.weights in ("imagenet", "none") else cfg.model.weights
    try:
        return build_model(cfg.model.backbone, num_classes=num_classes, weights=weights,
                           head_dropout=cfg.model.head_dropout, cut=cfg.model.cut)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)  # a bad cut names itself (model.cut: ...)
        raise PreflightError(message if message.startswith("model.cut") else f"model.weights: {message}") from None


def _check_resumable(cfg: ExperimentConfig) -> None:
    # A run resumes from the checkpoint find_resumable picks; a damaged one must stop it before
    # anything starts, and must not be passed over for an older one or a fresh run.
    if not cfg.output.resume:
        return
    found = find_resumable(cfg)
    if found is None:
        return
    try:
        Checkpoint.load(found)
    except CheckpointError as error:
        raise PreflightError(str(error)) from None
