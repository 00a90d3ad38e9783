"""The input pipeline that belongs to a backbone's weights: resize, crop, normalise (and augment)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained with; images must reach the model normalised the same way."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value

    def at_size(self, crop_size: int | None) -> Preprocessing:
        """The same pipeline at another input size, keeping the weights' resize-to-crop ratio."""
        if crop_size is None or crop_size == self.crop_size:
            return self
        resize = round(crop_size * self.resize_size / self.crop_size)
        return replace(self, crop_size=crop_size, resize_size=resize)

    def transform(self, *, augment: bool = False) -> T.Compose:
        """PIL image or uint8 tensor (C, H, W) -> normalised float tensor (3, crop, crop)."""
        interpolation = T.InterpolationMode(self.interpolation)
        if augment:
            geometry = [
                T.RandomResizedCrop(self.crop_size, scale=(0.6, 1.0), interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
            ]
        else:
            geometry = [
                T.Resize(self.resize_size, interpolation=interpolation, antialias=True),
                T.CenterCrop(self.crop_size),
            ]
        return T.Compose(
            [
                T.ToImage(),
                T.RGB(),
                *geometry,
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )
