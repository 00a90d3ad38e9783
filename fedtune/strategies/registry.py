"""The strategy registry: names in the experiment file, each mapped to a factory of a Flower strategy."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from flwr.serverapp.strategy import Strategy

from fedtune.config import ExperimentConfig
from fedtune.registry import Registry

# name -> factory(cfg, buffer_keys): `buffer_keys` name the non-parameter tensors that may travel.
StrategyFactory = Callable[[ExperimentConfig, frozenset[str]], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")
register = STRATEGIES.register


def build_strategy(cfg: ExperimentConfig, *, buffer_keys: frozenset[str] = frozenset()) -> Strategy:
    """The configured strategy; `buffer_keys` name the non-parameter tensors that may travel."""
    return STRATEGIES.get_known(cfg.strategy.name)(cfg, buffer_keys)


class Sampling(TypedDict):
    """The sampling arguments every Flower strategy takes."""

    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int
    min_available_nodes: int


def sampling(cfg: ExperimentConfig, available: int | None = None) -> Sampling:
    """Flower's sampling settings; with `available`, capped to that many eligible clients."""
    clients = cfg.federation.num_clients
    per_round = cfg.federation.sampled_per_round
    # Flower's configure_evaluate sends nothing at fraction 0; the rounds without federated
    # evaluation (federation.evaluation.every) do not call it at all (fedtune/server/round.py).
    evaluate = cfg.federation.evaluated_per_round if cfg.federated_evaluation else 0
    cap = clients if available is None else available
    return Sampling(
        fraction_train=per_round / clients,
        min_train_nodes=min(per_round, cap),
        fraction_evaluate=evaluate / clients,
        min_evaluate_nodes=min(evaluate, cap),
        min_available_nodes=cap,
    )


def fit_sampling_to(strategy: Strategy, cfg: ExperimentConfig, available: int) -> None:
    """Sample from `available` eligible clients from now on (some may have left, at their budget).

    Flower's sampling waits forever for min_available_nodes, so the minimums must shrink with
    the pool. A wrapper (the central-DP ones) samples through the strategy it wraps.
    """
    inner = getattr(strategy, "strategy", strategy)
    for name, value in sampling(cfg, available).items():
        if name.startswith("min_"):
            setattr(inner, name, value)
