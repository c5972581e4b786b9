"""Privacy accounting on top of Opacus's accountants.

A client's whole participation is one accountant history: a list of
(noise_multiplier, sample_rate, steps) entries, plain data that is carried across rounds
(and restarts) and published in the privacy report, so anyone can recompute epsilon.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

# Opacus calls logging.basicConfig() on import, which doubles every line Flower logs;
# take that root handler off again (recognised by Opacus's format string).
for _handler in list(logging.getLogger().handlers):
    if getattr(_handler.formatter, "_fmt", None) == "%(asctime)s:%(levelname)s:%(message)s":
        logging.getLogger().removeHandler(_handler)

__all__ = [
    "HistoryEntry",
    "PlannedBudget",
    "make_accountant",
    "epsilon_of",
    "calibrate_noise",
    "sample_rate_for",
]

HistoryEntry = tuple[float, float, int]

# Calibration stops within this fraction below the target: the spec asks for <= 2%.
CALIBRATION_TOLERANCE = 0.005
MAX_USEFUL_NOISE = 100.0


@dataclass(frozen=True)
class PlannedBudget:
    """What a client plans to spend: enough to recompute the calibrated noise."""

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str


def make_accountant(name: str, history: list[HistoryEntry] | None = None) -> IAccountant:
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
    return accountant


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon of a history, computed by a fresh Opacus accountant."""
    if not history:
        return 0.0
    return float(make_accountant(accountant, history).get_epsilon(delta=delta))


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    if num_examples <= 0:
        raise ValueError("a client has no training examples; it cannot train or be accounted")
    if batch_size > num_examples:
        raise ValueError(
            f"training.batch_size={batch_size} exceeds this client's {num_examples} examples; "
            "lower the batch size or give the client more data"
        )
    # Opacus's convention (make_private: 1 / len(data_loader)), so the rate we calibrate
    # for is exactly the rate its Poisson sampler and accountant use.
    return 1.0 / math.ceil(num_examples / batch_size)


def calibrate_noise(plan: PlannedBudget) -> float:
    """The smallest noise multiplier whose epsilon after `plan.steps` steps is at most the
    target (and within CALIBRATION_TOLERANCE of it)."""
    # Beyond this noise the model learns nothing: refuse at once rather than search on.
    floor = epsilon_of(
        [(MAX_USEFUL_NOISE, plan.sample_rate, plan.steps)], plan.delta, plan.accountant
    )
    if floor > plan.target_epsilon:
        raise ValueError(
            f"cannot reach target_epsilon={plan.target_epsilon} at delta={plan.delta} with "
            f"{plan.steps} steps at sample rate {plan.sample_rate:.4g}: even noise multiplier "
            f"{MAX_USEFUL_NOISE:g} spends epsilon {floor:.3g}; raise the target, or plan fewer "
            "rounds/local steps or a smaller batch"
        )
    sigma = get_noise_multiplier(
        target_epsilon=plan.target_epsilon,
        target_delta=plan.delta,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        accountant=plan.accountant,
        epsilon_tolerance=CALIBRATION_TOLERANCE * plan.target_epsilon,
    )
    # Opacus's search guarantees eps <= target; check it, since the report relies on it.
    spent = epsilon_of([(sigma, plan.sample_rate, plan.steps)], plan.delta, plan.accountant)
    if spent > plan.target_epsilon:
        raise RuntimeError(f"calibration overshot: epsilon {spent} > target {plan.target_epsilon}")
    return float(sigma)
