"""What a run promised and spent in privacy: the per-round figures and the run's privacy.json.

The figures are the clients' own DP-SGD epsilons, as they report them, and the user-level epsilon of
central DP, which fedtune/accounting.py computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import MetricRecord

from fedtune import messages as keys
from fedtune.accounting import user_level_epsilon
from fedtune.config import ExperimentConfig
from fedtune.records import RoundRecord
from fedtune.strategies.central_dp import split_noise


@dataclass
class PrivacyReport:
    """Collects each round's privacy figures into the history, and the run's summary at the end."""

    cfg: ExperimentConfig
    released_noise: list[float] = field(default_factory=list)  # noise multiplier of each central-DP round
    dp_sgd_clients: dict[int, dict[str, float]] = field(default_factory=dict)  # node -> noise, sample rate

    def state(self) -> dict[str, Any]:
        """The bookkeeping a resumed run needs (JSON)."""
        return {"released_noise": list(self.released_noise),
                "dp_sgd_clients": {str(node): figures for node, figures in self.dp_sgd_clients.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.released_noise = [float(x) for x in state["released_noise"]]
        self.dp_sgd_clients = {int(node): dict(figures) for node, figures in state["dp_sgd_clients"].items()}

    @property
    def sampling_rate(self) -> float:
        return self.cfg.federation.sampled_per_round / self.cfg.federation.num_clients

    def user_level_epsilon(self) -> float:
        return user_level_epsilon(
            self.released_noise, sampling_rate=self.sampling_rate, delta=self.cfg.privacy.central.target_delta
        )

    def round_figures(
        self, client_metrics: dict[int, MetricRecord], *, clipping_norm: float | None
    ) -> dict[str, float]:
        """The history's privacy columns for one round.

        The strategy would average the clients' epsilons; the guarantee is per client, so each
        one is kept, with the maximum.
        """
        figures: dict[str, float] = {}
        for node, metrics in client_metrics.items():
            if keys.EPSILON in metrics:
                # Parsed at the edge (fedtune/strategies/validation.py): these are numbers, never lists.
                figures[f"epsilon_client_{node}"] = float(cast(float, metrics[keys.EPSILON]))
                self.dp_sgd_clients[node] = {
                    "noise_multiplier": float(cast(float, metrics.get(keys.NOISE_MULTIPLIER, 0.0))),
                    "sample_rate": float(cast(float, metrics.get(keys.SAMPLE_RATE, 0.0))),
                }
        if figures:
            figures["epsilon_max"] = max(figures.values())
        central = self.cfg.privacy.central
        if central.enabled:
            # Every round is a step of the mechanism, an empty draw or one whose replies all failed
            # included; with the fixed denominator (fedtune/strategies/central_dp.py) its noise
            # multiplier is the configured one, however many replies were summed.
            self.released_noise.append(central.noise_multiplier)
            figures["epsilon_user"] = self.user_level_epsilon()
            if clipping_norm is not None:
                figures["clipping_norm"] = clipping_norm
        return figures

    def _randomness(self) -> str:
        """Where central DP's client draw and noise came from (fedtune/strategies/central_dp.py, CentralRandomness)."""
        if self.cfg.privacy.central.reproducible:
            return (f"reproducible: the client draw and the noise follow the run's seed ({self.cfg.seed}, in "
                    "config.json; privacy.central.reproducible): the guarantee does NOT hold against anyone who "
                    "knows the seed or can read the run's checkpoint")
        return ("secret: the client draw and the noise come from OS entropy, never from the run's seed, and are "
                "saved nowhere")

    def summary(self, history: list[RoundRecord], *, name_of: Callable[[int], str] = str) -> dict[str, Any]:
        """privacy.json: the mechanisms, their parameters, and epsilon by round. Clients are keyed by
        their ids (in a simulation, their partitions), and `name_of` says who each one is (on real
        nodes, the partition a node gave as its label with its node id)."""
        privacy = self.cfg.privacy
        trained = [r for r in history if r.round > 0]
        report: dict[str, Any] = {}
        if privacy.dp_sgd.enabled:
            dp = privacy.dp_sgd
            clients = sorted(self.dp_sgd_clients.items())
            spent = [r.extra["epsilon_max"] for r in trained if "epsilon_max" in r.extra]
            report["sample_level"] = {
                "guarantee": "(epsilon, delta)-DP for each example of each client's data, over the whole run",
                "mechanism": "DP-SGD (Opacus): per-example gradient clipping and Gaussian noise, "
                + ("Poisson-sampled batches" if dp.poisson_sampling else "shuffled batches"),
                "accountant": dp.accountant,
                "target_epsilon": dp.target_epsilon,
                "delta": dp.target_delta,
                "max_grad_norm": dp.max_grad_norm,
                "clients": {str(node): name_of(node) for node, _ in clients},
                "noise_multiplier_by_client": {str(node): c["noise_multiplier"] for node, c in clients},
                "sample_rate_by_client": {str(node): c["sample_rate"] for node, c in clients},
                "rounds": [r.round for r in trained],
                "epsilon_by_client_by_round": {
                    str(node): [r.extra.get(f"epsilon_client_{node}") for r in trained] for node, _ in clients
                },
                "epsilon_max": max(spent, default=0.0),
            }
        if privacy.central.enabled:
            central = privacy.central
            sampled = self.cfg.federation.sampled_per_round
            summed_securely = privacy.secure_aggregation.enabled
            mechanism = (f"Gaussian noise on the sum of client updates clipped {central.clipping}-side, over "
                         "clients_per_round" + (" (adaptive clipping norm)" if central.clipping == "adaptive" else ""))
            if summed_securely:
                mechanism = ("Gaussian noise, added by the server, on the SecAgg+ sum of client updates each clipped "
                             "client-side and weighted 1: the server never sees a single update")
            report["user_level"] = {
                "guarantee": "(epsilon, delta)-DP for each client's whole dataset, over the whole run",
                "mechanism": mechanism,
                "secure_sum": summed_securely,
                "noise_multiplier": central.noise_multiplier,
                "clipping_norm": central.clipping_norm,
                "noise_stddev": central.noise_multiplier * central.clipping_norm / sampled,
                "clients_per_round": sampled,
                "sampling_rate": self.sampling_rate,
                "delta": central.target_delta,
                "sampling": "Poisson: each client independently with probability sampling_rate every round "
                "(clients_per_round is the expected number); the clipped updates' sum is divided by it",
                "accountant": "RDP of the Poisson-subsampled Gaussian, every round (an empty draw included)",
                "every_round": "every round releases the model plus the noise, a round that drew no client or "
                "whose replies all failed included: an unchanged model would tell that nobody was drawn",
                "randomness": self._randomness(),
                "rounds": [r.round for r in trained],
                "epsilon_by_round": [r.extra.get("epsilon_user") for r in trained],
                "noise_multiplier_by_round": self.released_noise,
                "epsilon": self.user_level_epsilon(),
            }
            if central.clipping == "adaptive":
                report["user_level"]["adaptive_clipping"] = (
                    "the noise multiplier is split between the updates and the count of updates left unclipped "
                    "(Andrew et al. 2021), which together cost what noise_multiplier alone would; noise_stddev is "
                    "then noise_multiplier_on_updates x the round's clipping norm (history's clipping_norm, before "
                    "the round moved it) / clients_per_round")
                on_updates, count_stddev = split_noise(self.cfg)
                report["user_level"]["noise_multiplier_on_updates"] = on_updates
                report["user_level"]["clipped_count_stddev"] = count_stddev
            if summed_securely:
                report["user_level"]["small_draws"] = (
                    "a round that draws no client releases the noise alone; a round that draws one (too few for "
                    "SecAgg+) has that client add noise of noise_multiplier x clipping_norm to its clipped update "
                    "itself, which the server divides by clients_per_round: every round is the accounted mechanism"
                )
        if privacy.secure_aggregation.enabled:
            secure = privacy.secure_aggregation
            report["secure_aggregation"] = {
                "protocol": "SecAgg+ (Flower): the server sees only the sum of the sampled clients' updates",
                "num_shares": secure.num_shares,
                "reconstruction_threshold": secure.reconstruction_threshold,
                "clipping_range": secure.clipping_range,
                "quantization_range": secure.quantization_range,
            }
            if privacy.central.enabled:
                report["secure_aggregation"] |= {
                    "weights": "uniform: every clipped update weighs 1 (max_weight is not used)",
                    "quantization_step": 2 * secure.clipping_range / secure.quantization_range,
                    # the quantisation error's standard deviation, at most, over the central-DP noise's
                    "quantization_error_to_noise": self.cfg.secure_quantization_to_noise,
                }
        return report
