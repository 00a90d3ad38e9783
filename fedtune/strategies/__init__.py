"""Aggregation strategies selectable in the experiment file: Flower's, fitted to partial updates and checkpoints.

FedAvg, FedProx, FedAdam and FedYogi are registered here, the Byzantine-robust ones in `robust.py`;
the registry itself is `registry.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypedDict

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedtune.config import ExperimentConfig
from fedtune.strategies import robust  # noqa: F401 - registers the Byzantine-robust strategies
from fedtune.strategies.central_dp import CentralDP, CentralRandomness, UniformFedAvg
from fedtune.strategies.registry import STRATEGIES, build_strategy, fit_sampling_to, register, sampling

__all__ = ["STRATEGIES", "PartialFedAdam", "PartialFedYogi", "build_strategy", "fit_sampling_to",
           "restore_strategy_state", "strategy_state"]


class _PartialUpdatesMixin:
    """Makes Flower's server optimisers (FedAdam, FedYogi) fit partial, growing updates.

    - When the unfreeze schedule adds tensors, their optimiser moments start at zero instead of
      the strategy failing on keys it has never seen.
    - BatchNorm running statistics are statistics, not parameters: they take the plain weighted
      average; an adaptive step could even make a running variance negative.
    """

    buffer_keys: frozenset[str]
    current_arrays: dict[str, np.ndarray] | None
    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.current_arrays is not None:
            for moments in (self.m_t, self.v_t):
                if moments:
                    for key, value in self.current_arrays.items():
                        moments.setdefault(key, np.zeros_like(value))
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        buffers = self.buffer_keys & set(arrays.keys()) if arrays is not None else set()
        if buffers:
            averaged = aggregate_arrayrecords([r.content for r in replies if not r.has_error()], "num-examples")
            for key in buffers:
                arrays[key] = Array(np.asarray(averaged[key].numpy()))
        return arrays, metrics


class PartialFedAdam(_PartialUpdatesMixin, FedAdam):
    def __init__(self, *, buffer_keys: frozenset[str], **kwargs: Any) -> None:  # FedAdam's or FedYogi's own arguments
        super().__init__(**kwargs)
        self.buffer_keys = buffer_keys


class PartialFedYogi(_PartialUpdatesMixin, FedYogi):
    def __init__(self, *, buffer_keys: frozenset[str], **kwargs: Any) -> None:  # FedAdam's or FedYogi's own arguments
        super().__init__(**kwargs)
        self.buffer_keys = buffer_keys


@register("fedavg")
def _fedavg(cfg: ExperimentConfig, buffer_keys: frozenset[str]) -> Strategy:
    if cfg.privacy.central.enabled:
        federation = cfg.federation
        randomness = CentralRandomness.of(cfg)
        poisson = UniformFedAvg(sampling_rate=federation.sampled_per_round / federation.num_clients,
                                expected_clients=federation.sampled_per_round, draws=randomness.draws, **sampling(cfg))
        return CentralDP(poisson, cfg, randomness)
    return FedAvg(**sampling(cfg))


@register("fedprox")
def _fedprox(cfg: ExperimentConfig, buffer_keys: frozenset[str]) -> Strategy:
    return FedProx(proximal_mu=cfg.strategy.proximal_mu, **sampling(cfg))


class _FedOptArgs(TypedDict):
    eta: float
    eta_l: float
    beta_1: float
    beta_2: float
    tau: float


def _fedopt_args(cfg: ExperimentConfig) -> _FedOptArgs:
    s = cfg.strategy
    return _FedOptArgs(eta=s.eta, eta_l=cfg.train.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)


@register("fedadam")
def _fedadam(cfg: ExperimentConfig, buffer_keys: frozenset[str]) -> Strategy:
    return PartialFedAdam(buffer_keys=buffer_keys, **_fedopt_args(cfg), **sampling(cfg))


@register("fedyogi")
def _fedyogi(cfg: ExperimentConfig, buffer_keys: frozenset[str]) -> Strategy:
    return PartialFedYogi(buffer_keys=buffer_keys, **_fedopt_args(cfg), **sampling(cfg))


# What a strategy learns across rounds, by attribute: a server that resumes a run restores it.
_MOMENTS = ("m_t", "v_t")  # FedAdam's and FedYogi's first and second moments, per tensor
_SCALARS = ("clipping_norm",)  # central DP's clipping norm: adaptive clipping moves it every round
_GENERATORS = "randomness"  # central DP's draw and noise, saved only when reproducible (CentralRandomness)


def _layers(strategy: Strategy) -> list[Strategy]:
    """The strategy and the ones it wraps (the central-DP wrappers hold the aggregating strategy)."""
    layers = [strategy]
    while isinstance(getattr(layers[-1], "strategy", None), Strategy):
        layers.append(layers[-1].strategy)  # type: ignore[attr-defined]
    return layers


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The strategy's learned state: tensors keyed "<layer>/<attribute>/<tensor>", and scalars."""
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for depth, layer in enumerate(_layers(strategy)):
        for name in _MOMENTS:
            moments = getattr(layer, name, None)
            if moments is not None:
                tensors.update({f"{depth}/{name}/{key}": value for key, value in moments.items()})
                scalars[f"{depth}/{name}"] = "present"  # an empty dict is state too (vs None: not started)
        for name in _SCALARS:
            if hasattr(layer, name):
                scalars[f"{depth}/{name}"] = float(getattr(layer, name))
        if isinstance(layer, CentralDP) and (generators := layer.randomness.state()) is not None:
            scalars[f"{depth}/{_GENERATORS}"] = generators
    return tensors, scalars


def restore_strategy_state(strategy: Strategy, tensors: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
    """Put back what `strategy_state` took from a strategy built from the same config."""
    layers = _layers(strategy)
    for path, value in scalars.items():
        depth, name = path.split("/")
        layer = layers[int(depth)]
        if name in _MOMENTS:
            prefix = f"{path}/"
            setattr(layer, name, {key[len(prefix):]: array for key, array in tensors.items()
                                  if key.startswith(prefix)})
        elif name in _SCALARS:
            setattr(layer, name, float(value))
        elif name == _GENERATORS and isinstance(layer, CentralDP):
            layer.randomness.restore(value)
        else:
            raise ValueError(f"checkpoint holds unknown strategy state {path!r}")
