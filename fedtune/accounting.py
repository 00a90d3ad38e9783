"""Every epsilon fedtune reports and every noise multiplier it calibrates, on Opacus's accountants.

Both guarantees are compositions of the subsampled Gaussian mechanism:

- sample-level (DP-SGD on a client): each optimizer step adds noise to a Poisson-sampled batch's
  clipped per-example gradients; a client's ledger holds the steps of every round it trained, as
  Opacus's accountants keep them (noise multiplier, sample rate, steps), and is composed with the
  run's accountant (`rdp` or `prv`);
- user-level (central DP on the server): each released round adds noise to the average of the
  sampled clients' clipped updates; the rounds so far are composed with RDP.

RDP uses one set of orders, Opacus's default, for both (epsilon is the minimum over them).
Google's dp-accounting stays out of the runtime: its PLD accountant's epsilon is within 0.01 of
Opacus's PRV, and calibrated to the same target it takes 0.3-0.5% more off the noise than PRV
(`benchmarks/accounting.py`). The tests use it as the independent check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from numbers import Integral, Real

import numpy as np

# Opacus is imported by the functions that use it: importing any of it imports all of Opacus (0.9 s
# of CPU here), which a process that never accounts for privacy (a simulation's worker without
# DP-SGD, the CLI) should not pay.

# The accountants a DP-SGD run may name (DPSGDConfig.accountant): Opacus's registry names.
SAMPLE_LEVEL_ACCOUNTANTS = ("rdp", "prv")
# Opacus's default RDP orders (RDPAccountant.DEFAULT_ALPHAS in opacus/accountants/rdp.py; a test
# checks they are equal), for both guarantees and for the noise calibration (which runs Opacus's
# RDPAccountant, whose default they are).
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

# One entry of an Opacus accountant's history: (noise multiplier, sample rate, steps).
Steps = tuple[float, float, int]


def sample_level_epsilon(history: Sequence[Steps], *, delta: float, accountant: str) -> float:
    """Epsilon (at `delta`) of DP-SGD's steps in `history`, composed by Opacus's `accountant`.

    What the accountant's get_epsilon computes; for RDP, each (noise, rate)'s per-step RDP is
    computed once, since it was most of the cost of a head-only DP round.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    checked = check_history(history)
    if not checked:
        return 0.0
    if accountant == "rdp":
        rdp = sum(steps * _rdp_per_step(noise, rate) for noise, rate, steps in checked)
        return _rdp_epsilon(rdp, delta)
    from opacus.accountants import create_accountant

    counter = create_accountant(accountant)
    counter.history = checked
    return float(counter.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier with which `steps` DP-SGD steps at `sample_rate` spend `target_epsilon`.

    Opacus's binary search: the result spends at most target_epsilon, and within 0.01 of it.
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(delta)
    _check_rate("sample_rate", sample_rate)
    _check_count("steps", steps)
    _check_accountant(accountant)
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as error:  # Opacus's search gave up: opacus/accountants/utils.py, get_noise_multiplier
        raise ValueError(f"target_epsilon: {target_epsilon:g} (delta {delta:g}) over {steps} steps at sample rate "
                         f"{sample_rate:g} needs a noise multiplier above {MAX_SIGMA:g} ({error})") from None


def user_level_epsilon(noise_multipliers: Sequence[float], *, sampling_rate: float, delta: float) -> float:
    """Epsilon (at `delta`) of one subsampled Gaussian release per round, composed with RDP.

    `noise_multipliers` holds each round's noise multiplier. Each round draws every client
    independently with probability `sampling_rate` (Poisson sampling, as the central-DP strategy
    does: fedtune/strategies/central_dp.py). With adaptive clipping, the noise_multiplier is the
    overall one: Flower splits it between the update and the clipped count so that the two
    together compose to it (Andrew et al., 2021).
    """
    _check_rate("sampling_rate", sampling_rate)
    _check_delta(delta)
    for index, noise in enumerate(noise_multipliers):
        _check_positive(f"noise_multipliers[{index}]", noise)
    if not noise_multipliers:
        return 0.0
    rdp = sum(_rdp_per_step(noise, sampling_rate) for noise in noise_multipliers)
    return _rdp_epsilon(rdp, delta)


def check_history(history: Sequence[Steps]) -> list[Steps]:
    """`history` as a list, if each entry is a (noise multiplier, sample rate, steps) an accountant could have kept.

    Raises ValueError naming the first entry that is not: a ledger read from disk is checked before
    anything is composed from it.
    """
    checked: list[Steps] = []
    for index, entry in enumerate(history):
        if not isinstance(entry, tuple | list) or len(entry) != 3:
            raise ValueError(f"history[{index}]: {entry!r} is not a (noise multiplier, sample rate, steps) triple")
        noise, rate, steps = entry
        _check_positive(f"history[{index}] noise multiplier", noise)
        _check_rate(f"history[{index}] sample rate", rate)
        _check_count(f"history[{index}] steps", steps)
        checked.append((noise, rate, steps))
    return checked


@lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """The RDP of one subsampled Gaussian step at each of RDP_ORDERS (shared: never modified)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS))
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(rdp: np.ndarray | float, delta: float) -> float:
    """Epsilon at `delta` of the composed RDP at each of RDP_ORDERS (a sum of arrays, typed as sum() returns)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_positive(name: str, value: float) -> None:
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name}: {value!r} is not a positive finite number")


def _check_rate(name: str, value: float) -> None:
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{name}: {value!r} is not a probability in (0, 1]")


def _check_delta(delta: float) -> None:
    if not _is_number(delta) or not 0 < delta < 1:
        raise ValueError(f"delta: {delta!r} is not in (0, 1)")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {value!r} is not a whole number of at least 1")


def _check_accountant(accountant: str) -> None:
    if accountant not in SAMPLE_LEVEL_ACCOUNTANTS:
        raise ValueError(f"accountant: {accountant!r} is not one of {', '.join(SAMPLE_LEVEL_ACCOUNTANTS)}")
