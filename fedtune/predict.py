"""Classify images with a model saved by a run: a folder of images, or the run's own test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from fedtune.backbones import StagedModel, build_model, preprocessing_for
from fedtune.config import ExperimentConfig, config_from_json
from fedtune.data import load_split
from fedtune.results import load_model_file

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
    model_file = path / "model.safetensors" if path.is_dir() else path
    tensors, meta = load_model_file(model_file)
    for key in ("backbone", "num_classes", "classes"):
        if key not in meta:
            raise ValueError(f"{model_file}: metadata lacks {key!r}; was it saved by fedtune?")
    model = build_model(meta["backbone"], num_classes=int(meta["num_classes"]), weights="none",
                        head_dropout=float(meta.get("head_dropout", 0.0)))
    model.load_state_dict(tensors)
    model.eval()
    config_file = model_file.parent / "config.json"
    config = config_from_json(config_file.read_text()) if config_file.is_file() else None
    return SavedRun(
        model=model,
        backbone=meta["backbone"],
        classes=meta["classes"].split(","),
        image_size=int(meta["image_size"]) if meta.get("image_size") else None,
        config=config,
    )


@dataclass(frozen=True)
class Prediction:
    item: str
    predicted: str
    confidence: float
    label: str | None


def predict_folder(run: SavedRun, folder: str | Path) -> list[Prediction]:
    """Images directly in `folder` (unlabelled), or in `folder/<class>/` (labelled by folder name)."""
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
                with Image.open(file) as image:
                    batch = pre(image.convert("RGB")).unsqueeze(0)
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {file}: {error}") from None
            probabilities = run.model(batch).softmax(1)[0]
            confidence, index = probabilities.max(0)
            label = file.parent.name if file.parent != folder and file.parent.name in run.classes else None
            predictions.append(Prediction(str(file), run.classes[int(index)], float(confidence), label))
    return predictions


def predict_test_split(run: SavedRun, *, batch_size: int = 128) -> list[Prediction]:
    """The held-out split of the data source the run was trained on."""
    if run.config is None:
        raise ValueError("the model is not inside its run directory (no config.json): pass --images FOLDER")
    data = run.config.data
    dataset = load_split(data.source, "test", root=data.root, download=data.download, seed=run.config.seed)
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
