"""fedtune/accounting.py: every epsilon, checked against Google's dp-accounting; bad inputs named."""

from __future__ import annotations

import math
import typing

import pytest
from dp_accounting import dp_event, rdp
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import RDPAccountant

from fedtune.accounting import (
    RDP_ORDERS,
    SAMPLE_LEVEL_ACCOUNTANTS,
    calibrate_noise_multiplier,
    check_history,
    sample_level_epsilon,
    user_level_epsilon,
)
from fedtune.config import DPSGDConfig

DELTA = 1e-5


def subsampled_gaussian(noise: float, rate: float) -> dp_event.DpEvent:
    return dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise))


def independent_epsilon(events: list[tuple[float, float, int]], *, accountant: str) -> float:
    """dp-accounting's epsilon of (noise, rate, count) subsampled Gaussians: RDP, or the exact PLD for PRV."""
    if accountant == "rdp":
        independent = rdp.RdpAccountant()
    else:
        independent = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for noise, rate, count in events:
        independent.compose(subsampled_gaussian(noise, rate), count)
    return float(independent.get_epsilon(DELTA))


def test_one_order_set_and_the_accountants_a_run_may_name() -> None:
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS  # what get_noise_multiplier's RDP search uses
    assert SAMPLE_LEVEL_ACCOUNTANTS == typing.get_args(DPSGDConfig.model_fields["accountant"].annotation)


@pytest.mark.parametrize("accountant", SAMPLE_LEVEL_ACCOUNTANTS)
def test_a_ledger_of_several_mechanisms_matches_dp_accounting(accountant: str) -> None:
    # A client's history: two rounds at the planned noise, then a round at another rate (a new loader size).
    history = [(1.3, 0.05, 40), (1.3, 0.05, 40), (2.0, 0.1, 25)]
    epsilon = sample_level_epsilon(history, delta=DELTA, accountant=accountant)
    assert epsilon == pytest.approx(independent_epsilon(history, accountant=accountant), rel=0.01)


def test_user_level_epsilon_of_rounds_with_different_noise_matches_dp_accounting() -> None:
    noise = [1.2, 1.2, 0.9, 1.2, 1.2, 0.6, 1.2, 0.9, 1.2, 1.2]
    epsilon = user_level_epsilon(noise, sampling_rate=0.4, delta=DELTA)
    assert epsilon == pytest.approx(independent_epsilon([(z, 0.4, 1) for z in noise], accountant="rdp"), rel=0.01)


def test_nothing_spent_is_epsilon_zero() -> None:
    assert sample_level_epsilon([], delta=DELTA, accountant="rdp") == 0.0
    assert sample_level_epsilon([], delta=DELTA, accountant="prv") == 0.0
    assert user_level_epsilon([], sampling_rate=0.5, delta=DELTA) == 0.0


def test_epsilon_grows_with_steps_rate_and_smaller_delta_and_falls_with_noise() -> None:
    def eps(noise: float = 1.0, rate: float = 0.1, steps: int = 50, delta: float = DELTA) -> float:
        return sample_level_epsilon([(noise, rate, steps)], delta=delta, accountant="rdp")

    by_steps = [eps(steps=s) for s in (1, 10, 50, 200)]
    by_rate = [eps(rate=q) for q in (0.01, 0.1, 0.5, 1.0)]
    by_noise = [eps(noise=z) for z in (0.7, 1.0, 2.0, 5.0)]
    by_delta = [eps(delta=d) for d in (1e-3, 1e-5, 1e-7)]
    for increasing in (by_steps, by_rate, by_delta):
        assert all(a < b for a, b in zip(increasing, increasing[1:], strict=False)), increasing
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False)), by_noise
    rounds = [user_level_epsilon([1.0] * n, sampling_rate=0.3, delta=DELTA) for n in (1, 5, 20)]
    assert rounds == sorted(rounds) and rounds[0] > 0


@pytest.mark.parametrize("accountant", SAMPLE_LEVEL_ACCOUNTANTS)
def test_calibrated_noise_spends_the_target_and_no_more(accountant: str) -> None:
    noise = [calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=0.25, steps=64,
                                        accountant=accountant) for target in (1.0, 8.0)]
    assert noise[0] > noise[1] > 0  # a smaller budget needs more noise
    for target, z in zip((1.0, 8.0), noise, strict=True):
        spent = sample_level_epsilon([(z, 0.25, 64)], delta=DELTA, accountant=accountant)
        assert target - 0.01 <= spent <= target
        # PRV's epsilon is an upper bound within 0.01 (Opacus's eps_error): at epsilon 1 that is 1%, on its own.
        assert spent == pytest.approx(independent_epsilon([(z, 0.25, 64)], accountant=accountant), rel=0.01, abs=0.02)


def test_a_budget_no_noise_can_meet_is_named() -> None:
    # With these RDP orders, epsilon at delta 1e-5 never falls below about 0.1, however large the noise.
    # (Sample rate 1: Opacus's RDP has a closed form there; subsampled, the search takes half a minute.)
    with pytest.raises(ValueError, match=r"target_epsilon: 0\.01 .* needs a noise multiplier above 1e\+06"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=DELTA, sample_rate=1.0, steps=100, accountant="rdp")


@pytest.mark.parametrize(("call", "named"), [
    (lambda: sample_level_epsilon([(1.0, 0.1, 5)], delta=0.0, accountant="rdp"), "delta: 0.0"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 5)], delta=1.0, accountant="rdp"), "delta: 1.0"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 5)], delta=math.nan, accountant="rdp"), "delta: nan"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 5)], delta=DELTA, accountant="gdp"), "accountant: 'gdp'"),
    (lambda: sample_level_epsilon([(0.0, 0.1, 5)], delta=DELTA, accountant="rdp"), r"history\[0\] noise multiplier"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 5), (1.0, 1.5, 5)], delta=DELTA, accountant="rdp"),
     r"history\[1\] sample rate: 1.5"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 0)], delta=DELTA, accountant="rdp"), r"history\[0\] steps: 0"),
    (lambda: sample_level_epsilon([(1.0, 0.1, 2.5)], delta=DELTA, accountant="rdp"), r"history\[0\] steps: 2.5"),
    (lambda: sample_level_epsilon([(1.0, 0.1)], delta=DELTA, accountant="rdp"), r"history\[0\]: \(1.0, 0.1\) is not"),
    (lambda: calibrate_noise_multiplier(target_epsilon=-1.0, delta=DELTA, sample_rate=0.1, steps=5, accountant="rdp"),
     "target_epsilon: -1.0"),
    (lambda: calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.0, steps=5, accountant="rdp"),
     "sample_rate: 0.0"),
    (lambda: calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.1, steps=0, accountant="rdp"),
     "steps: 0"),
    (lambda: user_level_epsilon([1.0], sampling_rate=0.0, delta=DELTA), "sampling_rate: 0.0"),
    (lambda: user_level_epsilon([1.0, -0.5], sampling_rate=0.5, delta=DELTA), r"noise_multipliers\[1\]: -0.5"),
    (lambda: user_level_epsilon([1.0], sampling_rate=0.5, delta=2.0), "delta: 2.0"),
])
def test_bad_inputs_are_refused_naming_the_parameter(call: typing.Callable[[], float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        call()


def test_check_history_returns_the_entries_as_they_were() -> None:
    history = [(1.25, 0.03125, 40), [2, 1.0, 3]]  # an int noise multiplier: Opacus's search can return one
    assert check_history(history) == [(1.25, 0.03125, 40), (2, 1.0, 3)]
