"""A run's model file (model.safetensors): its tensors and metadata, written atomically, read and checked.

`fedtune predict` reads it (fedtune/predict.py); fedtune/report.py writes it into the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from fedtune.atomic import write_bytes_atomically

MODEL_FILE = "model.safetensors"
CONFIG_JSON = "config.json"  # beside it in a run folder: the run's resolved config
# model.safetensors metadata key: the class names, in label order, as a JSON list of strings. (Files
# of earlier fedtune versions joined them with commas under "classes", which a name with a comma broke.)
CLASS_NAMES = "class_names"
_LEGACY_CLASSES = "classes"


def save_model_file(path: Path, state_dict: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write `state_dict` with `metadata` (e.g. the config JSON, backbone name) inside the file."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"model metadata must map str to str; {key!r} -> {type(value).__name__}")
    # safetensors refuses non-contiguous tensors (transposed views, slices) and writes from CPU memory.
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    # Serialised in memory and written by Python: safetensors' own save_file creates its
    # file owner-only (0600), unlike every other file of the run.
    return write_bytes_atomically(path, save(tensors, metadata=metadata))


def load_model_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a model.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from None
    return tensors, metadata


def encode_class_names(classes: list[str]) -> str:
    """The CLASS_NAMES metadata value of a model file."""
    return json.dumps(classes)


def class_names_of(metadata: dict[str, str], *, source: str | Path) -> list[str]:
    """The class names a model file's metadata carries (CLASS_NAMES, or the older comma-joined "classes")."""
    if CLASS_NAMES in metadata:
        try:
            names = json.loads(metadata[CLASS_NAMES])
        except ValueError:
            names = None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{source}: metadata {CLASS_NAMES!r} is not a JSON list of class names")
        return names
    if _LEGACY_CLASSES in metadata:
        return metadata[_LEGACY_CLASSES].split(",")
    raise ValueError(f"{source}: metadata lacks the class names ({CLASS_NAMES!r}); was it saved by fedtune?")
