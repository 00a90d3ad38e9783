"""Central (user-level) differential privacy on the server: Poisson client sampling, clipping, the fixed
denominator and Gaussian noise, every round, as the accountant composes them.

The mechanism (DP-FedAvg, McMahan et al. 2018) is the one fedtune/accounting.py, `user_level_epsilon`,
accounts: the RDP of the Poisson-subsampled Gaussian, one step every round.

- Sampling (`UniformFedAvg`): each client independently with probability q, not the exactly m
  clients without replacement that Flower's strategies draw.
- Weights and the estimator: every clipped update counts the same, and their sum is divided by the
  *expected* number of clients, q x N, not by the number received: one client moves the model by at
  most clipping_norm / qN whatever the draw, which is what the noise is calibrated to.
- Release (`CentralDP`): every round releases the model plus Gaussian noise of noise_multiplier x
  clipping_norm / qN, a round whose draw is empty or whose replies all failed included. An unchanged
  model would not be that mechanism: it would tell that nobody was drawn (a privacy loss of
  ln(1 / (1 - q))).
- Randomness (`CentralRandomness`): the draw and the noise come from OS entropy, never from the run's
  seed, which the run's config records (whoever knows the seed could regenerate the noise and
  subtract it, and amplification by subsampling assumes a secret draw). `privacy.central.reproducible`
  seeds them from the run's seed instead, for tests.

Flower's wrappers (DifferentialPrivacyServerSideFixedClipping and the others) are not used: they
draw their noise from numpy's global generator (flwr/supercore/differential_privacy.py:46,
`add_gaussian_noise_inplace`), release nothing when no reply arrived (the wrapper is never called, or
returns None: flwr/serverapp/strategy/dp_fixed_clipping.py:361 and 397, 481 and 490), and their
adaptive clipping divides the noisy clipped count by the replies received rather than the expected
count (flwr/serverapp/strategy/dp_adaptive_clipping.py:105-106), counts each update 0 or 1 where
compute_adaptive_noise_params assumes a sensitivity of 1/2, noises the aggregate with the norm it
just moved rather than the one the updates were clipped at (lines 213-223), and moves the norm
away from its target (lines 108-111: a clipped fraction above the target shrinks the norm). Their
functions are used: `compute_stdv`, `compute_adaptive_noise_params`.

Under SecAgg+ the server never sees a single update, only their sum: each client clips its own update,
SecAgg+ sums them, and `CentralNoise.release` divides the sum by the expected count and adds the noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_adaptive_noise_params, compute_stdv

from fedtune.config import ExperimentConfig

UNIFORM_WEIGHT = "fedtune.uniform-weight"

log = logging.getLogger("fedtune.server")


class CentralRandomness:
    """The generators of central DP: one for the client draw, one for the noise (and adaptive
    clipping's noisy count), each its own stream, apart from Python's and numpy's global ones, which
    Flower's own threads draw from too (flwr/supercore/heartbeat.py:102,
    flwr/supercore/retry/retry_invoker.py:92).

    By default they are seeded from OS entropy (`np.random.SeedSequence()`), a seed that is written
    nowhere, and their state is never saved: a resumed run draws on from fresh OS entropy, which is
    as good for the guarantee as continuing (each draw and each noise only has to be independent of
    everything else). With `reproducible`, they are seeded from the run's seed, and their state goes
    into the checkpoint so that a resumed run continues the same sequence; the guarantee then does
    not hold against anyone who knows the seed (it is in the run's config.json), nor against anyone
    who can read the checkpoint.
    """

    def __init__(self, *, seed: int | None) -> None:
        self.reproducible = seed is not None
        draws, noise = np.random.SeedSequence(seed).spawn(2)  # seed None: 128 bits of OS entropy
        self.draws = np.random.default_rng(draws)
        self.noise = np.random.default_rng(noise)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> CentralRandomness:
        if not cfg.privacy.central.reproducible:
            return cls(seed=None)
        log.warning("privacy.central.reproducible: the client draw and the noise of central DP follow the run's "
                    "seed (%d, in its config.json): the user-level guarantee does not hold against anyone who "
                    "knows it or can read the run's checkpoint", cfg.seed)
        return cls(seed=cfg.seed)

    def state(self) -> dict[str, Any] | None:
        """What a resumed run needs to continue the same sequence (JSON): only when reproducible."""
        if not self.reproducible:
            return None
        return {"draws": self.draws.bit_generator.state, "noise": self.noise.bit_generator.state}

    def restore(self, state: object) -> None:
        """Back to `state`, as `state()` returned it; ValueError naming what does not fit."""
        if not self.reproducible:
            raise ValueError("the checkpoint holds central DP's generators, but privacy.central.reproducible is off")
        if not isinstance(state, dict) or set(state) != {"draws", "noise"}:
            raise ValueError("central DP's generators: expected the states of 'draws' and 'noise'")
        for name in ("draws", "noise"):
            generator: np.random.Generator = getattr(self, name)
            try:
                generator.bit_generator.state = state[name]
            except (TypeError, ValueError, KeyError) as error:
                raise ValueError(f"central DP's generator {name!r}: {error}") from None


class UniformFedAvg(FedAvg):
    """FedAvg for central DP: Poisson client sampling at `sampling_rate`, every update counting the
    same, and their sum divided by `expected_clients` (module docstring).

    The draw comes from `draws` (`CentralRandomness`). Evaluation samples and weights as FedAvg does:
    its metrics are not released under the guarantee.
    """

    def __init__(self, *, sampling_rate: float, expected_clients: int, draws: np.random.Generator,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampling_rate = sampling_rate
        self.expected_clients = expected_clients
        self.draws = draws
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        eligible = sorted(grid.get_node_ids())
        chances = self.draws.random(len(eligible))
        drawn = [node for node, chance in zip(eligible, chances, strict=True) if chance < self.sampling_rate]
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


@dataclass(frozen=True)
class CentralNoise:
    """The Gaussian noise of central DP, the one place it is drawn, from `generator`: on the aggregate
    the server computed (`add_to`), or on a SecAgg+ mean turned into its sum over the expected count
    (`release`)."""

    noise_multiplier: float  # on the updates (adaptive clipping gives part of the budget to its count)
    clipping_norm: float  # the norm the round's updates were clipped to
    expected_clients: int  # q x N: the sum is divided by it, whatever the draw
    generator: np.random.Generator

    @property
    def stddev(self) -> float:
        """The noise on the released update: noise_multiplier x clipping_norm / expected_clients."""
        return compute_stdv(self.noise_multiplier, self.clipping_norm, self.expected_clients)

    @property
    def lone_client_stddev(self) -> float:
        """The noise a client drawn alone adds to its own clipped update: divided by expected_clients
        on the server, it is the round's noise (`stddev`)."""
        return self.noise_multiplier * self.clipping_norm

    def add_to(self, arrays: ArrayRecord) -> ArrayRecord:
        """`arrays` plus the noise, each in its own dtype (a counter, if one ever travels, is left as it is)."""
        noised = {}
        for name, array in arrays.items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating):
                values = (values.astype(np.float64) + self._draw(values.shape)).astype(values.dtype)
            noised[name] = Array(np.asarray(values))
        return ArrayRecord(noised)

    def release(self, mean_update: Sequence[np.ndarray], *, summed: int) -> list[np.ndarray]:
        """The update the round releases: the secure mean of `summed` clipped updates as their sum over
        expected_clients, plus the noise."""
        return [np.asarray(update, dtype=np.float64) * (summed / self.expected_clients) + self._draw(np.shape(update))
                for update in mean_update]

    def of_lone_client(self, update: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The update the round releases when one client was drawn and noised its update itself."""
        return [np.asarray(part, dtype=np.float64) / self.expected_clients for part in update]

    def _draw(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.generator.normal(0.0, self.stddev, shape)


def split_noise(cfg: ExperimentConfig) -> tuple[float, float]:
    """The noise multiplier on the updates, and the standard deviation of the noise on adaptive
    clipping's count (0 without it): Flower's compute_adaptive_noise_params (Andrew et al. 2021)."""
    central = cfg.privacy.central
    if central.clipping != "adaptive":
        return central.noise_multiplier, 0.0
    count_stddev, on_updates = compute_adaptive_noise_params(
        central.noise_multiplier, cfg.federation.sampled_per_round, central.clipped_count_stddev
    )
    return on_updates, count_stddev


class CentralDP(Strategy):
    """Central DP around `UniformFedAvg`: clips every update it receives to `clipping_norm`, releases
    their aggregate plus `noise` every round (`release_noise_alone` when there is no aggregate), and,
    with adaptive clipping, moves the norm towards the target quantile of the update norms.

    `clipping`: "server" clips here; "client" has each client clip its own update (Flower's
    fixedclipping_mod, fedtune/client/app.py), which the server clips again where it sees the update,
    so that a client that did not clip does not change the sensitivity; "adaptive" clips here with a
    norm that follows a noisy count of the updates left unclipped (Andrew et al. 2021, fixed
    denominator): C <- C exp(-lr (unclipped fraction - target_clipped_quantile)), so that C tracks
    the target quantile of the update norms (Flower's moves it the other way: `_geometric_update`
    shrinks the norm when more updates than the target were clipped). Its noise is
    compute_adaptive_noise_params' larger multiplier on the updates, and clipped_count_stddev on the
    count, which together cost what noise_multiplier alone would (the paper's Theorem 1).
    """

    def __init__(self, strategy: UniformFedAvg, cfg: ExperimentConfig, randomness: CentralRandomness) -> None:
        super().__init__()
        central = cfg.privacy.central
        self.strategy = strategy
        self.randomness = randomness
        self.clipping = central.clipping
        self.clipping_norm = central.clipping_norm  # the current norm; adaptive clipping moves it
        self.expected_clients = cfg.federation.sampled_per_round
        self.noise_multiplier, self.clipped_count_stddev = split_noise(cfg)
        self.target_clipped_quantile = central.target_clipped_quantile
        self.clip_norm_lr = central.clip_norm_lr
        self._sent: ArrayRecord | None = None
        self._counted_in = 0  # the last round adaptive clipping counted: once a round, as accounted

    def __repr__(self) -> str:
        return f"CentralDP({self.clipping} clipping, noise multiplier {self.noise_multiplier:g})"

    @property
    def noise(self) -> CentralNoise:
        """This round's noise, calibrated to the norm the round's updates are clipped to."""
        return CentralNoise(self.noise_multiplier, self.clipping_norm, self.expected_clients, self.randomness.noise)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        if self.clipping == "client":
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The clipped updates' sum over the expected count, plus the noise; None when no reply is usable
        (the round then releases the noise alone: `release_noise_alone`)."""
        replies = [reply for reply in replies if not reply.has_error()]
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train")
        unclipped = sum(self._clip(reply, self._sent) for reply in replies)
        clipped = len(replies) - unclipped
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            return None, metrics
        released = self.noise.add_to(aggregated)
        log.info("round %d: central DP noise of standard deviation %.4g added to the aggregate of %d clipped "
                 "updates (clipping norm %.4g)", server_round, self.noise.stddev, len(replies), self.clipping_norm)
        self._adapt(server_round, unclipped=unclipped, clipped=clipped)
        return released, metrics

    def release_noise_alone(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """What a round without an aggregate releases (its draw was empty, or no reply was usable): the
        model plus the noise, as every round; adaptive clipping counts no update."""
        log.info("round %d: no update to aggregate; the round releases the model plus central DP's noise "
                 "(standard deviation %.4g)", server_round, self.noise.stddev)
        released = self.noise.add_to(arrays)
        self._adapt(server_round, unclipped=0, clipped=0)  # no-op if the round's aggregate was counted, then discarded
        return released

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _clip(self, reply: Message, sent: ArrayRecord) -> bool:
        """Clip the reply's update (its tensors minus those sent) to the norm, in place; True if it was within it."""
        key = self.strategy.arrayrecord_key
        trained = reply.content.array_records[key]
        starts = {name: sent[name].numpy().astype(np.float64) for name in trained.keys()}
        updates = {name: trained[name].numpy().astype(np.float64) - starts[name] for name in trained.keys()}
        norm = math.sqrt(sum(float(np.square(update).sum()) for update in updates.values()))
        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        reply.content[key] = ArrayRecord({
            name: Array(np.asarray((starts[name] + scale * update).astype(trained[name].numpy().dtype)))
            for name, update in updates.items()
        })
        return scale == 1.0

    def _adapt(self, server_round: int, *, unclipped: int, clipped: int) -> None:
        """Adaptive clipping: the norm follows the noisy fraction of updates left unclipped, over the
        expected number of clients. Each update counts +1/2 unclipped, -1/2 clipped, so that one client
        changes the count by 1/2, the sensitivity compute_adaptive_noise_params assumes (TF Privacy's
        QuantileEstimatorQuery does the same); an empty round counts nothing, with the same noise."""
        if self.clipping != "adaptive" or self._counted_in == server_round:
            return
        self._counted_in = server_round
        noisy_count = (unclipped - clipped) / 2 + self.randomness.noise.normal(0.0, self.clipped_count_stddev)
        unclipped_fraction = noisy_count / self.expected_clients + 0.5
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped_fraction - self.target_clipped_quantile))
