"""Central (user-level) differential privacy: Flower's DP wrappers around a FedAvg that samples as it is accounted.

Flower's wrappers clip each client's update and add Gaussian noise of noise_multiplier x
clipping_norm / num_sampled_clients to the aggregate, but leave three things to the user, which
`UniformFedAvg` (here) does:

- Weights: the noise is calibrated to the sensitivity of a *uniform* aggregate of clipped updates
  (one client moves it by at most clipping_norm / num_sampled_clients). FedAvg weights clients by
  their number of examples, which lets a large client move it further.
- Sampling: Flower's strategies draw exactly m clients without replacement; the RDP accountant of
  the subsampled Gaussian (fedtune/accounting.py, `user_level_epsilon`) describes Poisson
  sampling, each client independently with probability q. So clients are drawn that way.
- The estimator: with Poisson sampling the number drawn varies, so the clipped updates' sum is
  divided by the *expected* number, q x N (num_sampled_clients), not by the number received
  (DP-FedAvg's fixed denominator, McMahan et al. 2018): the sensitivity stays clipping_norm / qN
  whatever the draw, which is what the wrappers' noise is calibrated to.
Flower 1.41 accounts only without amplification by sampling; the user-level epsilon, with it, is
`user_level_epsilon`.

Under SecAgg+ the server never sees a single update, so Flower's wrappers cannot aggregate (see
`SecureSumNoise`); the mechanism is the same one: each client clips its own update, SecAgg+ sums
them, and `SecureSumNoise` divides the sum by the expected count and adds the noise.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import CLIENTS_DISCREPANCY_WARNING, add_gaussian_noise_inplace, compute_stdv

from fedtune.config import ExperimentConfig

UNIFORM_WEIGHT = "fedtune.uniform-weight"

log = logging.getLogger("fedtune.server")


class UniformFedAvg(FedAvg):
    """FedAvg for central DP: Poisson client sampling at `sampling_rate`, every update counting the
    same, and their sum divided by `expected_clients` (module docstring).

    The draw uses Python's `random`, which the run seeds and its checkpoint saves, so a resumed run
    draws as an uninterrupted one. Evaluation samples and weights as FedAvg does: its metrics are
    not released under the guarantee.
    """

    def __init__(self, *, sampling_rate: float, expected_clients: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampling_rate = sampling_rate
        self.expected_clients = expected_clients
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        eligible = sorted(grid.get_node_ids())
        drawn = [node for node in eligible if random.random() < self.sampling_rate]
        log.info("round %d: Poisson sampling drew %d of %d clients (each with probability %.4g)", server_round,
                 len(drawn), len(eligible), self.sampling_rate)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, drawn, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        for reply in replies:
            # Set by the server, never taken from the client: the noise depends on it.
            for record in reply.content.metric_records.values():
                record[UNIFORM_WEIGHT] = 1
        by_examples, self.weighted_by_key = self.weighted_by_key, UNIFORM_WEIGHT
        try:
            averaged, metrics = super().aggregate_train(server_round, replies)
        finally:
            self.weighted_by_key = by_examples
        if averaged is None or self._global is None:
            return averaged, metrics
        # The mean of the m updates received, as their sum over the expected count.
        scale = len(replies) / self.expected_clients
        return ArrayRecord({key: Array(self._over_expected(averaged[key].numpy(), self._global[key].numpy(), scale))
                            for key in averaged.keys()}), metrics

    @staticmethod
    def _over_expected(mean: np.ndarray, start: np.ndarray, scale: float) -> np.ndarray:
        if not np.issubdtype(mean.dtype, np.floating):  # a counter, if one ever travels: left as averaged
            return mean
        return (start + scale * (mean - start)).astype(mean.dtype)


def _not_the_expected_discrepancy(record: logging.LogRecord) -> bool:
    """Flower's wrappers warn whenever fewer replies than num_sampled_clients arrive, which with
    Poisson sampling and the fixed denominator is every other round and no threat: the noise is
    calibrated to the expected count (flwr/serverapp/strategy/dp_fixed_clipping.py, validate_replies).
    fedtune logs each round's draw instead."""
    return record.msg != CLIENTS_DISCREPANCY_WARNING


def with_central_dp(strategy: Strategy, cfg: ExperimentConfig) -> Strategy:
    """`strategy` wrapped in the configured Flower DP wrapper."""
    logging.getLogger("flwr").addFilter(_not_the_expected_discrepancy)  # added once, however often called
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


@dataclass(frozen=True)
class SecureSumNoise:
    """Central DP on a SecAgg+ sum: the fixed denominator and the Gaussian noise, as `UniformFedAvg` and
    Flower's DifferentialPrivacyClientSideFixedClipping apply them to updates they can see.

    Flower's wrapper cannot be used on the secure path, for either API. The Message-API one
    aggregates the clients' replies itself (flwr/serverapp/strategy/dp_fixed_clipping.py:468-491),
    and under SecAgg+ there are none, only their sum. The legacy one, as a SecAgg+ workflow's
    strategy, receives every failure of every stage of the protocol
    (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py:665-666) and then releases
    nothing (flwr/server/strategy/dp_fixed_clipping.py:307-308): one client dropping out, or
    refusing at its privacy budget, would void the whole round, which SecAgg+ exists to survive and
    which, with the fixed denominator, leaves the sensitivity as it is. Flower's own noise functions
    are used (`compute_stdv`, `add_gaussian_noise_inplace`, drawing from numpy's global generator
    like its wrappers).
    """

    noise_multiplier: float
    clipping_norm: float
    expected_clients: int  # q x N: the sum is divided by it, whatever the draw

    @property
    def stddev(self) -> float:
        """The noise on the released update: noise_multiplier x clipping_norm / expected_clients."""
        return compute_stdv(self.noise_multiplier, self.clipping_norm, self.expected_clients)

    @property
    def lone_client_stddev(self) -> float:
        """The noise a client drawn alone adds to its own clipped update: divided by expected_clients
        on the server, it is the round's noise (`stddev`)."""
        return self.noise_multiplier * self.clipping_norm

    def release(self, mean_update: Sequence[np.ndarray], *, summed: int) -> list[np.ndarray]:
        """The update the round releases: the secure mean of `summed` clipped updates as their sum over
        expected_clients, plus Gaussian noise of `stddev` (with summed 0: the noise alone)."""
        released = [np.asarray(update, dtype=np.float64) * (summed / self.expected_clients) for update in mean_update]
        add_gaussian_noise_inplace(released, self.stddev)
        return released

    def of_lone_client(self, update: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The update the round releases when one client was drawn and noised its update itself."""
        return [np.asarray(part, dtype=np.float64) / self.expected_clients for part in update]

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> SecureSumNoise:
        central = cfg.privacy.central
        return cls(central.noise_multiplier, central.clipping_norm, cfg.federation.sampled_per_round)
