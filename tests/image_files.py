"""Image files for tests, made with PIL on the spot: good ones, and each kind of bad one a user's folder may hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 20_000  # 400 million pixels: PIL refuses it at open (DecompressionBombError)


def write_png(path: Path, value: int, size: int = 12) -> Path:
    """A small RGB picture whose colour depends on value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size + 4), (value, 255 - value, 7)).save(path)
    return path


def write_image_folder(root: Path, layout: dict[str, int]) -> None:
    """root/<class>/<i>.png for each class and count of layout."""
    for class_name, count in layout.items():
        for i in range(count):
            write_png(root / class_name / f"{i}.png", 20 * i + 10)


def write_bomb_png(path: Path) -> Path:
    """A valid 20000 x 20000 PNG of about 50 KB: 1 bit per pixel, all black, compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(path, optimize=True)
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG whose header is intact but whose pixel data stops half-way (a copy cut short)."""
    full = write_png(path, 100, size=64)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_gray16_png(path: Path) -> np.ndarray:
    """A 16-bit grey PNG of a horizontal ramp over the whole 0..65535 range; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(path)
    return ramp
