"""Which accountant: fedtune's epsilons by Opacus's RDP and PRV against Google's dp-accounting (PLD and RDP).

    python benchmarks/accounting.py --out benchmarks/results/accounting

For the mechanisms fedtune's runs compose (DP-SGD plans of the README's privacy table, central DP
over rounds), it prints the epsilon each accountant gives at the same noise, with its time, and
the noise multiplier each would calibrate for epsilon 3: a tighter accountant is worth what it
takes off the noise. fedtune reports Opacus's RDP (and PRV for DP-SGD runs that choose it); the
question is whether dp-accounting's PLD accountant would buy anything over Opacus's PRV, enough to
make dp-accounting a runtime dependency rather than the tests' independent check.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dp_accounting import calibrate_dp_mechanism, dp_event, rdp
from dp_accounting.pld import pld_privacy_accountant

from fedtune.accounting import calibrate_noise_multiplier, sample_level_epsilon, user_level_epsilon
from fedtune.console import compare_table

DELTA = 1e-5
TARGET = 3.0
# (what, sample rate, steps): each DP-SGD plan of the README's privacy table (batches per epoch x
# local epochs x rounds), and central DP's client sampling over rounds (one step per round).
SETTINGS: list[tuple[str, float, int]] = [
    ("DP-SGD, digits, 10 clients (4 batches x 2 epochs x 8 rounds)", 1 / 4, 64),
    ("DP-SGD, ants/bees, 10 clients (2 x 4 x 10)", 1 / 2, 80),
    ("DP-SGD, digits, 1 client (36 x 2 x 8)", 1 / 36, 576),
    ("DP-SGD, ants/bees, 1 client (25 x 4 x 10)", 1 / 25, 1000),
    ("central DP, 2 of 3 clients, 3 rounds", 2 / 3, 3),
    ("central DP, 10 of 100 clients, 50 rounds", 1 / 10, 50),
    ("central DP, 100 of 1000 clients, 200 rounds", 1 / 10, 200),
]
PLD_DISCRETIZATION = 1e-4  # what tests/test_privacy.py uses: epsilon within about 0.01


def _pld() -> pld_privacy_accountant.PLDAccountant:
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _event(noise: float, rate: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)), steps)


def _timed(compute: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - started


def _dp_accounting_epsilon(make: Callable[[], Any], noise: float, rate: float, steps: int) -> float:
    accountant = make()
    accountant.compose(_event(noise, rate, steps))
    return float(accountant.get_epsilon(DELTA))


def row(what: str, rate: float, steps: int) -> dict[str, Any]:
    """One setting: epsilons at the RDP-calibrated noise for TARGET, and each accountant's own calibration."""
    noise = calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=rate, steps=steps,
                                       accountant="rdp")
    if what.startswith("central"):
        opacus_rdp, rdp_seconds = _timed(lambda: user_level_epsilon([noise] * steps, sampling_rate=rate, delta=DELTA))
    else:
        opacus_rdp, rdp_seconds = _timed(
            lambda: sample_level_epsilon([(noise, rate, steps)], delta=DELTA, accountant="rdp"))
    prv, prv_seconds = _timed(lambda: sample_level_epsilon([(noise, rate, steps)], delta=DELTA, accountant="prv"))
    pld, pld_seconds = _timed(lambda: _dp_accounting_epsilon(_pld, noise, rate, steps))
    google_rdp = _dp_accounting_epsilon(rdp.RdpAccountant, noise, rate, steps)
    prv_noise = calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=rate, steps=steps,
                                           accountant="prv")
    pld_noise = calibrate_dp_mechanism(_pld, lambda z: _event(z, rate, steps), TARGET, DELTA, tol=1e-3)
    return {
        "setting": what,
        "sample rate": rate,
        "steps": steps,
        "noise (RDP, eps 3)": noise,
        "eps Opacus RDP": opacus_rdp,
        "eps Opacus PRV": prv,
        "eps dp-acc. PLD": pld,
        "eps dp-acc. RDP": google_rdp,
        "ms RDP": 1000 * rdp_seconds,
        "ms PRV": 1000 * prv_seconds,
        "ms PLD": 1000 * pld_seconds,
        "noise PRV": prv_noise,
        "noise PLD": float(pld_noise),
        "noise saved PRV %": 100 * (1 - prv_noise / noise),
        "noise saved PLD %": 100 * (1 - pld_noise / noise),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Also write table.md and table.json into this folder.")
    args = parser.parse_args()
    # Opacus warns when the best RDP order is the largest one (high noise, few steps): the figure stands.
    warnings.filterwarnings("ignore", message="Optimal order is the")
    rows = []
    for what, rate, steps in SETTINGS:
        rows.append(row(what, rate, steps))
        print(f"done: {what}", flush=True)
    text = compare_table(rows, list(rows[0]))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text + "\n")
        (args.out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
