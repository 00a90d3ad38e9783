"""A node's disk cache: the full model by content hash, and frozen-prefix features by input identity."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import TensorDataset

from fedtune.params import state_hash

CACHE_ENV = "FEDTUNE_CACHE_DIR"


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedtune")


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    # Write beside the target and rename: a crash mid-write never leaves a truncated cache entry.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelCache:
    """Full models the server sent once, keyed (and verified) by their content hash."""

    def __init__(self, root: Path) -> None:
        self.root = root / "models"

    def path(self, model_hash: str) -> Path:
        return self.root / f"{model_hash}.safetensors"

    def has(self, model_hash: str) -> bool:
        return self.path(model_hash).is_file()

    def load(self, model_hash: str) -> dict[str, Tensor]:
        # A damaged entry (unreadable, or not what its name promises) must not become the base of
        # training, nor keep telling the server the model is here: drop it so it is sent again.
        try:
            tensors = load_file(self.path(model_hash))
            intact = state_hash(tensors) == model_hash
        except Exception:  # safetensors raises its own error type for torn or foreign files
            intact = False
        if not intact:
            self.path(model_hash).unlink(missing_ok=True)
            raise ValueError(f"cached model {model_hash[:12]} is corrupt; it was removed and will be fetched again")
        return tensors

    def store(self, model_hash: str, tensors: dict[str, Tensor]) -> None:
        actual = state_hash(tensors)
        if actual != model_hash:
            raise ValueError(f"the model received hashes to {actual[:12]}, not the announced {model_hash[:12]}")
        _atomic_save(tensors, self.path(model_hash))


class FeatureCache:
    """Outputs of a frozen prefix of the model, computed once per (model, boundary, data)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "features"

    def path(self, *identity: str) -> Path:
        key = hashlib.sha256("|".join(identity).encode()).hexdigest()[:32]
        return self.root / f"{key}.safetensors"

    def get(self, *identity: str) -> TensorDataset | None:
        path = self.path(*identity)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            return TensorDataset(tensors["features"], tensors["labels"])
        except Exception:  # a torn or foreign file: recompute rather than fail the round
            path.unlink(missing_ok=True)
            return None

    def put(self, dataset: TensorDataset, *identity: str) -> None:
        features, labels = dataset.tensors
        _atomic_save({"features": features, "labels": labels.to(torch.long)}, self.path(*identity))
