"""An MNIST-format data set of any size, made offline from scikit-learn's digits.

Large federations need more examples than digits' 1,797, and MNIST cannot be downloaded here.
`write_digits_as_mnist` writes the four idx files torchvision's MNIST reads (under
<root>/MNIST/raw), so the set loads through fedtune's real `torchvision:MNIST` source. Each
example is a digits image (8x8, its own label), chosen in a seeded shuffled cycle, with seeded
noise of up to +-8 grey levels so that repeats are not identical. Used by
tests/test_virtual_clients.py and benchmarks/sim_scale.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def _examples(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.float32)  # 0..16 -> 0..255
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-count // len(images)))])[:count]
    noisy = images[order] + rng.uniform(-8, 8, size=(count, 8, 8)).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8), digits.target[order].astype(np.uint8)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def write_digits_as_mnist(root: Path, *, train: int, test: int, seed: int = 0) -> Path:
    """Write `train` and `test` examples in MNIST's layout under `root`; returns `root` (data.root)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images, labels = _examples(count, rng)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", IMAGES_MAGIC, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", LABELS_MAGIC, labels)
    return root
