"""Central evaluation of the global model on the server's held-out set."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fedtune.backbones import StagedModel
from fedtune.engine import Metrics, evaluate, extract_features


class CentralEvaluator:
    """Evaluates on the held-out set; the frozen prefix's output is computed once per boundary."""

    def __init__(self, dataset: Dataset, *, device: torch.device, batch_size: int = 128) -> None:
        self.dataset = dataset
        self.device = device
        self.batch_size = batch_size
        self._features: dict[int, Dataset] = {}

    def __call__(self, model: StagedModel, *, frozen_prefix: int) -> Metrics:
        # The prefix below the lowest trainable stage never changes during a run, so its output
        # can be reused from round to round.
        if frozen_prefix == 0:
            return evaluate(model, self.dataset, batch_size=self.batch_size, device=self.device)
        if frozen_prefix not in self._features:
            self._features[frozen_prefix] = extract_features(
                model, self.dataset, stop=frozen_prefix, batch_size=self.batch_size, device=self.device
            )
        return evaluate(
            model, self._features[frozen_prefix], start=frozen_prefix, batch_size=self.batch_size, device=self.device
        )
