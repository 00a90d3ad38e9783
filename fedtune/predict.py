"""Classify images with a model saved by a run: a folder of images, or the run's own test split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ExperimentConfig, config_from_json, read_config_text
from fedtune.data import BadImageError, BadImages, load_split, read_image
from fedtune.model_file import CONFIG_JSON, MODEL_FILE, class_names_of, load_model_file

log = logging.getLogger("fedtune.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SavedRun:
    model: StagedModel
    backbone: str
    classes: list[str]
    image_size: int | None
    config: ExperimentConfig | None  # present when the model sits in its run directory


def load_saved(path: str | Path) -> SavedRun:
    """A run directory or a model.safetensors file -> the model, ready for inference."""
    path = Path(path)
    model_file = path / MODEL_FILE if path.is_dir() else path
    tensors, meta = load_model_file(model_file)
    if "backbone" not in meta:
        raise ValueError(f"{model_file}: metadata lacks 'backbone'; was it saved by fedtune?")
    classes = class_names_of(meta, source=model_file)
    try:
        image_size = int(meta["image_size"]) if meta.get("image_size") else None
        model = build_model(meta["backbone"], num_classes=len(classes), weights="none",
                            head_dropout=float(meta.get("head_dropout", 0.0)), cut=meta.get("cut") or None)
        model.load_state_dict(tensors)
    except (ValueError, RuntimeError) as error:  # RuntimeError: tensors of another model or class count
        problem = " ".join(str(error).split())[:300]
        raise ValueError(f"{model_file}: does not hold a {meta['backbone'][:64]} model with {len(classes)} classes "
                         f"({problem})") from None
    model.eval()
    config_file = model_file.parent / CONFIG_JSON
    config = config_from_json(read_config_text(config_file)) if config_file.is_file() else None
    return SavedRun(model=model, backbone=meta["backbone"], classes=classes, image_size=image_size, config=config)


@dataclass(frozen=True)
class Prediction:
    item: str
    predicted: str
    confidence: float
    label: str | None


def predict_folder(run: SavedRun, folder: str | Path, *, bad_images: BadImages = "error") -> list[Prediction]:
    """Images directly in `folder` (unlabelled), or in `folder/<class>/` (labelled by folder name).

    An image that cannot be decoded safely raises BadImageError naming it, or with bad_images="skip"
    is left out with a warning naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    pre = preprocessing_for(run.backbone).at_size(run.image_size).transform()
    predictions = []
    with torch.no_grad():
        for file in files:
            try:
                batch = pre(read_image(file)).unsqueeze(0)
            except BadImageError as error:
                if bad_images == "error":
                    raise BadImageError(error.where, f"{error.problem} (pass --bad-images skip to leave such "
                                                     "files out)") from None
                log.warning("leaving out image %s: %s", error.where, error.problem)
                continue
            probabilities = run.model(batch).softmax(1)[0]
            confidence, index = probabilities.max(0)
            label = file.parent.name if file.parent != folder and file.parent.name in run.classes else None
            predictions.append(Prediction(str(file), run.classes[int(index)], float(confidence), label))
    return predictions


def predict_test_split(
    run: SavedRun, *, bad_images: BadImages | None = None, batch_size: int = 128
) -> list[Prediction]:
    """The held-out split of the data source the run was trained on; bad images as the run's
    data.bad_images says, unless `bad_images` is given."""
    if run.config is None:
        raise ValueError("the model is not inside its run directory (no config.json): pass --images FOLDER")
    data = run.config.data
    dataset = load_split(data.source, "test", root=data.root, download=data.download, seed=run.config.seed,
                         bad_images=bad_images or data.bad_images)
    if dataset.classes != run.classes:
        raise ValueError(f"the run's test split has classes {dataset.classes[:10]}, the model {run.classes[:10]}: "
                         "the data under data.root changed since the run")
    pre = preprocessing_for(run.backbone).at_size(run.image_size)
    dataset = dataset.with_transform(pre.transform())
    predictions = []
    with torch.no_grad():
        for offset, (images, labels) in enumerate(DataLoader(dataset, batch_size=batch_size)):
            probabilities = run.model(images).softmax(1)
            confidence, index = probabilities.max(1)
            for i in range(len(labels)):
                predictions.append(
                    Prediction(f"test[{offset * batch_size + i}]", run.classes[int(index[i])],
                               float(confidence[i]), run.classes[int(labels[i])])
                )
    return predictions


def accuracy(predictions: list[Prediction]) -> float | None:
    labelled = [p for p in predictions if p.label is not None]
    if not labelled:
        return None
    return sum(p.predicted == p.label for p in labelled) / len(labelled)
