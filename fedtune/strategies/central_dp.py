"""Central (user-level) differential privacy: Flower's DP wrappers around a strategy, with uniform weights.

Flower's wrappers clip each client's update and add Gaussian noise of noise_multiplier x
clipping_norm / clients to the average, but leave two things to the user:

- The noise is calibrated to the sensitivity of a *uniform* average of clipped updates (one
  client can move it by at most clipping_norm / clients). FedAvg weights clients by their
  number of examples, which lets a large client move it further; `UniformFedAvg` averages
  uniformly (here).
- Flower 1.41 accounts only without amplification by sampling. The user-level epsilon, with the
  client sampling rate, is fedtune/accounting.py's `user_level_epsilon`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedtune.config import ExperimentConfig

UNIFORM_WEIGHT = "fedtune.uniform-weight"


class UniformFedAvg(FedAvg):
    """FedAvg in which every client's update counts the same, whatever its number of examples.

    Only the updates: evaluation metrics are still weighted by the clients' numbers of examples.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                # Set by the server, never taken from the client: the noise depends on it.
                for metrics in reply.content.metric_records.values():
                    metrics[UNIFORM_WEIGHT] = 1
        by_examples, self.weighted_by_key = self.weighted_by_key, UNIFORM_WEIGHT
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.weighted_by_key = by_examples


def with_central_dp(strategy: Strategy, cfg: ExperimentConfig) -> Strategy:
    """`strategy` wrapped in the configured Flower DP wrapper."""
    central = cfg.privacy.central
    sampled = cfg.federation.sampled_per_round
    if central.clipping == "server":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy, central.noise_multiplier, central.clipping_norm, sampled
        )
    if central.clipping == "client":
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, central.noise_multiplier, central.clipping_norm, sampled
        )
    return DifferentialPrivacyServerSideAdaptiveClipping(
        strategy,
        central.noise_multiplier,
        sampled,
        initial_clipping_norm=central.clipping_norm,
        target_clipped_quantile=central.target_clipped_quantile,
        clip_norm_lr=central.clip_norm_lr,
        clipped_count_stddev=central.clipped_count_stddev,
    )
