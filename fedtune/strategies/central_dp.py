"""Central (user-level) differential privacy: Flower's DP wrappers, uniform weights, and the epsilon.

Flower's wrappers clip each client's update and add Gaussian noise of noise_multiplier x
clipping_norm / clients to the average, but leave two things to the user, done here:

- The noise is calibrated to the sensitivity of a *uniform* average of clipped updates (one
  client can move it by at most clipping_norm / clients). FedAvg weights clients by their
  number of examples, which lets a large client move it further; `UniformFedAvg` averages
  uniformly.
- Flower 1.41 accounts only without amplification by sampling. `user_level_epsilon` composes
  the subsampled Gaussian mechanism over rounds with the client sampling rate (RDP).
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
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.config import CentralDPConfig, ExperimentConfig

UNIFORM_WEIGHT = "fedtune.uniform-weight"
# RDP orders Opacus uses by default; epsilon is the minimum over them.
_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


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


def effective_noise_multiplier(central: CentralDPConfig, *, averaged: int, sampled: int) -> float:
    """The noise multiplier a round really had.

    Flower's noise is calibrated to an average over all `sampled` clients (sensitivity
    clipping_norm / sampled); when only `averaged` replies are usable, one client moves the
    average by clipping_norm / averaged, so the same noise protects less.
    """
    return central.noise_multiplier * min(1.0, averaged / sampled)


def user_level_epsilon(central: CentralDPConfig, *, sampling_rate: float, noise_multipliers: list[float]) -> float:
    """Epsilon (at central.target_delta) of one subsampled Gaussian release per round.

    `noise_multipliers` holds each released round's (effective) noise multiplier. Each round
    samples clients_per_round of num_clients; Flower samples a fixed number without replacement,
    treated here as Poisson sampling at the same rate, the usual approximation (exact when every
    client takes part, sampling_rate 1). With adaptive clipping, the noise_multiplier is the
    overall one: Flower splits it between the update and the clipped count so that the two
    together compose to it (Andrew et al., 2021).
    """
    if not noise_multipliers:
        return 0.0
    rdp = sum(compute_rdp(q=sampling_rate, noise_multiplier=z, steps=1, orders=_ORDERS) for z in noise_multipliers)
    epsilon, _ = get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=central.target_delta)
    return float(epsilon)
