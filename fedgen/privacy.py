"""Privacy accounting with Google's dp-accounting.

A client's whole participation is one accountant history: a list of
(noise_multiplier, sample_rate, steps) entries, plain data that is carried across rounds,
runs and restarts and published in the privacy report, so anyone can recompute epsilon.
Each entry is `steps` compositions of the Poisson-subsampled Gaussian mechanism.

Two neighbouring relations (which datasets the guarantee says are indistinguishable):
- `add_remove`: D and D with one example added or removed. The dataset size n is then
  private: nothing released may depend on it (the sample rate comes from a size the owner
  declares public). Accountants: `rdp` or `pld`.
- `replace_one`: D and D with one example replaced. n may be public (it is released as the
  client's aggregation weight). Accountant: `pld` (dp-accounting's RDP does not cover
  Poisson sampling under replace-one).

The PLD accountant is pessimistic (its discretisation rounds privacy loss up); the interval
is fixed here and named in every report, so a recomputation gives the same number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

__all__ = [
    "HistoryEntry",
    "StepRecord",
    "PlannedBudget",
    "ClientPrivacyState",
    "ACCOUNTANTS",
    "NEIGHBORING",
    "PLD_DISCRETIZATION",
    "check_accounting",
    "epsilon_of",
    "calibrate_noise",
    "sample_rate_for",
    "recompute_recipe",
]

HistoryEntry = tuple[float, float, int]


class StepRecord:
    """The accountant history: (noise multiplier, sample rate, steps) entries, equal
    consecutive entries merged (as Opacus's accountants do). Opacus's optimizer calls
    `step` once per noised step; the `mmd` family's release calls it itself."""

    def __init__(self, history: list[HistoryEntry], noise_multiplier: float, sample_rate: float):
        self.history = [(float(s), float(q), int(n)) for s, q, n in history]
        self.entry = (float(noise_multiplier), float(sample_rate))

    def step(self, _optimizer: object = None) -> None:
        if self.history and self.history[-1][:2] == self.entry:
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + 1)
        else:
            self.history.append((*self.entry, 1))


ACCOUNTANTS = ("rdp", "pld")
NEIGHBORING = ("add_remove", "replace_one")
PLD_DISCRETIZATION = 1e-3  # value_discretization_interval; 1e-4 moves epsilon by < 0.1%

# Calibration stops within this fraction below the target.
CALIBRATION_TOLERANCE = 0.005
COARSE_DISCRETIZATION = 1e-2  # the calibration's search only; never a reported epsilon
MAX_USEFUL_NOISE = 100.0
SECANT_MIN_NOISE = 0.1  # the secant search's floor; below it, the bisection's

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclass
class ClientPrivacyState:
    """Everything a client must keep between rounds to account for its privacy."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[HistoryEntry]
    # DP steps per training stage (`gan`, or `vqvae` and `prior`): the accountant merges
    # equal consecutive entries, so its history alone does not tell the stages apart.
    stage_steps: dict[str, int] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        return d

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> ClientPrivacyState:
        return cls(
            float(d["noise_multiplier"]),
            float(d["sample_rate"]),
            int(d["planned_steps"]),
            [(float(s), float(q), int(n)) for s, q, n in d["history"]],
            {str(k): int(v) for k, v in d.get("stage_steps", {}).items()},
        )


@dataclass(frozen=True)
class PlannedBudget:
    """What a client plans to spend: enough to recompute the calibrated noise."""

    target_epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    neighboring: str


def check_accounting(accountant: str, neighboring: str) -> None:
    """Refuse a pair that dp-accounting cannot account for."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} is not one of {ACCOUNTANTS}")
    if neighboring not in NEIGHBORING:
        raise ValueError(f"neighbouring relation {neighboring!r} is not one of {NEIGHBORING}")
    if neighboring == "replace_one" and accountant != "pld":
        raise ValueError(
            "the rdp accountant cannot account for Poisson sampling under replace_one; "
            "use accountant pld (or the add_remove relation)"
        )


def merge_runs(history: tuple[HistoryEntry, ...]) -> list[HistoryEntry]:
    """Consecutive entries with the same noise and rate as one entry of their summed steps.
    dp-accounting builds a mechanism's privacy loss distribution once per composed event,
    so a history of one entry per round would cost a round's worth more each round; the
    merged history is the same composition (epsilon equal within ~1e-10 relative)."""
    merged: list[HistoryEntry] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + int(steps))
        else:
            merged.append((sigma, q, int(steps)))
    return merged


@lru_cache(maxsize=4096)
def _epsilon(
    history: tuple[HistoryEntry, ...],
    delta: float,
    accountant: str,
    neighboring: str,
    discretization: float = PLD_DISCRETIZATION,
) -> float:
    if any(sigma <= 0 for sigma, _, steps in history if steps > 0):
        return math.inf  # a step without noise has no finite epsilon
    if accountant == "pld":
        epsilon = _pld_epsilon(merge_runs(history), delta, neighboring, discretization)
    else:
        check_accounting(accountant, neighboring)
        acc = rdp.RdpAccountant(neighboring_relation=_RELATIONS[neighboring])
        for sigma, q, steps in merge_runs(history):
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, steps)
        epsilon = acc.get_epsilon(delta)
    # Epsilon is never negative: for a large delta the conversions can go below zero,
    # and (0, delta) is then the honest statement.
    return max(0.0, float(epsilon))


def _pld_epsilon(
    history: list[HistoryEntry], delta: float, neighboring: str, discretization: float
) -> float:
    """What `PLDAccountant.compose(...)` then `.get_epsilon(delta)` computes, step for
    step (identity, then each entry's one-step distribution self-composed), but with the
    one-step distribution kept: building it is most of the cost, and a client needs it
    again for its calibration's check and for its epsilon after every round."""
    check_accounting("pld", neighboring)
    total = pld.privacy_loss_distribution.identity(value_discretization_interval=discretization)
    for sigma, q, steps in history:
        if q > 0:  # a zero rate releases nothing (the accountant skips it too)
            one_step = _one_step_pld(sigma, q, neighboring, discretization)
            total = total.compose(one_step.self_compose(steps))
    return float(total.get_epsilon_for_delta(delta))


@lru_cache(maxsize=256)
def _one_step_pld(
    sigma: float, q: float, neighboring: str, discretization: float
) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=discretization,
        sampling_prob=q,
        neighboring_relation=_RELATIONS[neighboring],
    )


def epsilon_of(
    history: list[HistoryEntry] | list[list[float]],
    delta: float,
    accountant: str,
    neighboring: str,
) -> float:
    """Epsilon at `delta` of a history, computed afresh by dp-accounting."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta {delta} must be in (0, 1)")
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history)
    if not entries:
        return 0.0
    return _epsilon(entries, float(delta), accountant, neighboring)


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """The Poisson sample rate that gives batches of `batch_size` on average out of
    `num_examples` (the client's n under replace_one; its declared public size under
    add_remove). The sampler, the accountant, the calibration and the report all use this
    one number."""
    if num_examples <= 0:
        raise ValueError("a client has no training examples; it cannot train or be accounted")
    if batch_size > num_examples:
        raise ValueError(
            f"training.batch_size={batch_size} exceeds this client's {num_examples} examples; "
            "lower the batch size or give the client more data"
        )
    return batch_size / num_examples


@lru_cache(maxsize=256)
def calibrate_noise(plan: PlannedBudget) -> float:
    """The smallest noise multiplier (within CALIBRATION_TOLERANCE of the target) whose
    epsilon after `plan.steps` steps is at most the target; never above it."""

    def spent(sigma: float) -> float:
        return epsilon_of(
            [(sigma, plan.sample_rate, plan.steps)], plan.delta, plan.accountant, plan.neighboring
        )

    target = plan.target_epsilon
    if plan.accountant != "pld":
        return _bisect_noise(spent, target, plan)

    # A PLD ten times coarser costs a tenth. It reads a little high (within ~1e-4 at the
    # quickstart's plan, a few percent at epsilon 1 or with large noise and many steps):
    # search with it for the middle of the tolerance, then check with the fine one (the
    # one reported); where the coarse one read too high, finish with the fine one.
    def rough(sigma: float) -> float:
        history = ((sigma, plan.sample_rate, plan.steps),)
        return _epsilon(history, plan.delta, "pld", plan.neighboring, COARSE_DISCRETIZATION)

    window = (
        target * (1 - 0.75 * CALIBRATION_TOLERANCE),
        target * (1 - CALIBRATION_TOLERANCE / 4),
    )
    guess = _secant_noise(rough, window, _neighbour_guess(plan))
    if guess is None:
        try:
            guess = _bisect_noise(rough, target, plan, CALIBRATION_TOLERANCE / 4)
        except ValueError:  # the coarse one may refuse what the fine one can reach
            guess = None
    settled = _settle_noise(spent, target, guess) if guess is not None else None
    if settled is None and guess is not None:
        settled = _secant_noise(spent, window, guess)
    if settled is None:
        settled = _bisect_noise(spent, target, plan)  # raises if the target is unreachable
    assert spent(settled) <= target  # the report relies on it
    _CALIBRATED.setdefault(_plan_family(plan), []).append((plan.sample_rate, settled))
    return float(settled)


# Noise already calibrated in this process, per plan family, as (sample rate, noise): a
# process serving many simulated clients of different sizes starts each search from its
# neighbours' answers instead of searching the whole range.
_CALIBRATED: dict[tuple[Any, ...], list[tuple[float, float]]] = {}


def _plan_family(plan: PlannedBudget) -> tuple[Any, ...]:
    return (plan.target_epsilon, plan.delta, plan.steps, plan.accountant, plan.neighboring)


def _neighbour_guess(plan: PlannedBudget) -> float | None:
    """The noise for `plan` read off the calibrations of its nearest neighbours in sample
    rate (the line through the two nearest, in log-log), or None with no neighbours."""
    known = sorted(_CALIBRATED.get(_plan_family(plan), []))
    if not known:
        return None
    x = math.log(plan.sample_rate)
    nearest = sorted(known, key=lambda qs: abs(math.log(qs[0]) - x))[:2]
    (q0, s0) = nearest[0]
    # Two rates too close to tell a slope from the tolerance's wobble: the nearest alone.
    if len(nearest) < 2 or abs(math.log(nearest[1][0]) - math.log(q0)) < 0.05:
        return s0
    (q1, s1) = nearest[1]
    slope = (math.log(s1) - math.log(s0)) / (math.log(q1) - math.log(q0))
    slope = min(max(slope, 0.0), 1.0)  # more sampling needs more noise, at most in proportion
    return math.exp(math.log(s0) + slope * (x - math.log(q0)))


def _secant_noise(
    spent: Callable[[float], float],
    window: tuple[float, float],
    guess: float | None,
    max_evaluations: int = 10,
) -> float | None:
    """A noise whose `spent` lies in `window`, by secant steps on log(epsilon) against
    log(noise) from `guess` (epsilon falls as the noise grows, smoothly); None if there is
    no guess or it does not get there within `max_evaluations`."""
    # Below SECANT_MIN_NOISE a PLD is huge (gigabytes near 1e-3): leave it to the bisection.
    if guess is None or not SECANT_MIN_NOISE <= guess < MAX_USEFUL_NOISE:
        return None
    low_target, high_target = window
    aim = math.log(low_target * high_target) / 2
    points: list[tuple[float, float]] = []  # (log noise, log epsilon - aim)
    x = math.log(guess)
    for _ in range(max_evaluations):
        eps = spent(math.exp(x))
        if low_target <= eps <= high_target:
            return math.exp(x)
        if not 0 < eps < math.inf:
            return None
        points.append((x, math.log(eps) - aim))
        if len(points) == 1:
            step = points[0][1] / 2.0  # epsilon ~ 1/noise^2 where the noise matters
        else:
            (x0, f0), (x1, f1) = points[-2], points[-1]
            if f1 == f0:
                return None
            step = -f1 * (x1 - x0) / (f1 - f0)
        x = points[-1][0] + max(-1.0, min(1.0, step))  # at most a factor e per step
        if not math.log(SECANT_MIN_NOISE) <= x < math.log(MAX_USEFUL_NOISE):
            return None
    return None


def _settle_noise(spent: Callable[[float], float], target: float, guess: float) -> float | None:
    """From `guess` (near the answer), a noise within the tolerance whose fine `spent` is
    at most `target`; None if the guess was too far off to settle in a few steps."""
    high = guess
    for _ in range(16):
        if spent(high) <= target:
            break
        high *= 1 + CALIBRATION_TOLERANCE / 4  # the rough search read a little low
    else:
        return None
    if spent(high) >= target * (1 - CALIBRATION_TOLERANCE):
        return float(high)
    low = high * (1 - CALIBRATION_TOLERANCE)
    if spent(low) <= target:
        return None
    return _bisect_between(spent, target, low, high)


def _bisect_noise(
    spent: Callable[[float], float],
    target: float,
    plan: PlannedBudget,
    tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    if spent(MAX_USEFUL_NOISE) > target:
        raise ValueError(
            f"cannot reach target_epsilon={target} at delta={plan.delta} with "
            f"{plan.steps} steps at sample rate {plan.sample_rate:.4g}: even noise multiplier "
            f"{MAX_USEFUL_NOISE:g} spends more; raise the target, or plan fewer rounds/local "
            "steps or a smaller batch"
        )
    high, low = MAX_USEFUL_NOISE, 1.0
    while spent(low) <= target:  # find a noise that is too low
        high, low = low, low / 2
        if low < 1e-3:
            return high
    return _bisect_between(spent, target, low, high, tolerance)


def _bisect_between(
    spent: Callable[[float], float],
    target: float,
    low: float,
    high: float,
    tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    # Bisect in log space: `high` always satisfies the target, `low` never does.
    while True:
        mid = math.sqrt(high * low)
        eps = spent(mid)
        if eps <= target:
            high = mid
            if eps >= target * (1 - tolerance):
                break
        else:
            low = mid
        if high / low < 1 + 1e-6:
            break
    assert spent(high) <= target  # the report relies on it
    return float(high)


def recompute_recipe(accountant: str, neighboring: str) -> str:
    """How anyone recomputes a reported epsilon from the report's own fields."""
    relation = _RELATIONS[neighboring].name
    make = (
        f"dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.{relation})"
        if accountant == "rdp"
        else f"dp_accounting.pld.PLDAccountant(neighboring_relation=NeighboringRelation."
        f"{relation}, value_discretization_interval={PLD_DISCRETIZATION:g})"
    )
    return (
        f"acc = {make}; merge consecutive history entries with equal sigma and q by adding "
        "their steps (the same composition, built once); for sigma, q, steps in merged: "
        "acc.compose("
        "dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps); "
        "epsilon = max(0, acc.get_epsilon(delta))"
    )
