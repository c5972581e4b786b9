"""Audit canaries and an empirical lower bound on epsilon from one training run.

The method is Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). `privacy.canaries` = m puts m canary *slots* into one simulated client's
training data (client `CANARY_CLIENT`); each canary is included with probability 1/2,
independently, from a stream seeded by the config. After training, the auditor scores
every canary with the released weights, guesses "included" for the highest scores and
"excluded" for the lowest, abstains on the rest, and turns the number of correct guesses
into a lower bound on epsilon: a value of epsilon that the observed guesses reject, at
95% confidence, as the privacy of the training run.

What "excluded" means follows the guarantee's neighbouring relation, so that including
or excluding one canary is exactly one neighbouring step of the accounted guarantee:
- `replace_one`: an excluded canary's slot holds a blank image (the canary's label, every
  pixel background). The client's n is m larger whatever was drawn, and public as always.
- `add_remove`: an excluded canary is absent; n counts only the included ones (n is
  private under add/remove, and the sample rate uses the public size anyway).

Canaries cost privacy like any example (they are training examples: n, and so the sample
rate and the noise calibration, include them), and the privacy report says they were
there. They exist in simulation only: a deployed device declines a request for canaries
(`fedgen.policy`, code `canaries`), and the inclusion draws are written to the run
directory (`canaries.json`) for the audit, never into a message.

Canary images are out of distribution on purpose (bright rectangles on a dark
background, one fixed label), so a discriminator or an autoencoder can remember each one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.config import FedgenConfig
from fedgen.data import IMAGE_SIZE, Dataset

__all__ = [
    "CANARY_CLIENT",
    "CANARY_LABEL",
    "CanarySet",
    "canary_set",
    "canary_slots",
    "add_canaries",
    "canary_statement",
    "write_canary_record",
    "read_canary_record",
    "audit_p_value",
    "epsilon_lower_bound",
    "guess_counts",
    "audit_guesses",
]

CANARY_CLIENT = 0  # the simulated client (partition id) whose data holds the canaries
CANARY_LABEL = 0
RECORD = "canaries.json"
RECORD_FORMAT = "fedgen-canaries-1"
# Fractions of m that are guessed (half "included", half "excluded"); each bound is taken
# at confidence 1 - (1 - confidence) / len(GUESS_FRACTIONS), so the largest of them holds
# at the stated confidence (union bound): choosing the best count after looking is fair.
GUESS_FRACTIONS = (0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class CanarySet:
    """m canaries: images (uint8, m x 28 x 28), their label, and which were included."""

    images: np.ndarray
    label: int
    included: np.ndarray  # bool (m,)

    def __len__(self) -> int:
        return int(self.included.shape[0])

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.packbits(self.included).tobytes())
        h.update(str(self.label).encode())
        return h.hexdigest()


def _draw_canary(rng: np.random.Generator) -> np.ndarray:
    # Four bright rectangles of random size and place: unlike any digit or glyph, and
    # unlike each other, so the model's response to one says little about the others.
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for _ in range(4):
        w, h = rng.integers(2, 7, size=2)
        x0, y0 = rng.integers(0, IMAGE_SIZE - w), rng.integers(0, IMAGE_SIZE - h)
        image[y0 : y0 + h, x0 : x0 + w] = 255
    return image


def canary_set(count: int, seed: int) -> CanarySet:
    """The `count` canaries of a run with this seed, and the draws of which were included
    (independent, probability 1/2): a function of the seed, so the client process and
    the audit agree without the draws ever being sent."""
    images_rng = np.random.default_rng([seed, 14, 1])
    inclusion_rng = np.random.default_rng([seed, 14, 2])
    images = np.stack([_draw_canary(images_rng) for _ in range(count)]) if count else None
    if images is None:
        images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    included = inclusion_rng.random(count) < 0.5
    return CanarySet(images, CANARY_LABEL, included)


def _of(cfg: FedgenConfig) -> CanarySet:
    return canary_set(cfg.privacy.canaries, cfg.seed)


def canary_slots(cfg: FedgenConfig) -> int:
    """How many examples the canaries add to the canary client's data."""
    m = cfg.privacy.canaries
    if m == 0:
        return 0
    if cfg.privacy.neighboring == "replace_one":
        return m
    return int(_of(cfg).included.sum())


def _training_examples(cfg: FedgenConfig) -> Dataset:
    canaries = _of(cfg)
    if cfg.privacy.neighboring == "replace_one":
        blank = np.zeros_like(canaries.images)
        images = np.where(canaries.included[:, None, None], canaries.images, blank)
    else:
        images = canaries.images[canaries.included]
    labels = np.full(len(images), canaries.label, dtype=np.int64)
    return Dataset(images, labels, "canaries")


def add_canaries(cfg: FedgenConfig, data: Dataset, partition_id: int) -> Dataset:
    """A simulated client's data with the run's canaries appended when it is the canary
    client and `privacy.canaries` > 0; otherwise `data` unchanged."""
    if cfg.privacy.canaries == 0 or partition_id != CANARY_CLIENT:
        return data
    extra = _training_examples(cfg)
    return Dataset(
        np.concatenate([data.images, extra.images]),
        np.concatenate([data.labels, extra.labels]),
        data.name,
    )


def canary_statement(cfg: FedgenConfig) -> dict[str, Any] | None:
    """What the privacy report says about canaries (None when there are none)."""
    m = cfg.privacy.canaries
    if m == 0:
        return None
    excluded = (
        "a blank image in its slot (replace-one)"
        if cfg.privacy.neighboring == "replace_one"
        else "absent (add/remove)"
    )
    return {
        "count": m,
        "client": str(CANARY_CLIENT),
        "label": CANARY_LABEL,
        "examples_added": canary_slots(cfg),
        "text": f"client {CANARY_CLIENT} trained on {m} audit canaries (simulation only), each "
        f"included with probability 1/2 (an excluded one is {excluded}); they count as its "
        "training examples, so its n, sample rate, noise and epsilon include them",
    }


def write_canary_record(cfg: FedgenConfig, run_path: Path) -> Path | None:
    """Write RUN_DIR/canaries.json (which canaries were included), for the audit only."""
    if cfg.privacy.canaries == 0:
        return None
    canaries = _of(cfg)
    record = {
        "format": RECORD_FORMAT,
        "client": str(CANARY_CLIENT),
        "count": len(canaries),
        "label": canaries.label,
        "neighboring": cfg.privacy.neighboring,
        "seed": cfg.seed,
        "included": [int(b) for b in canaries.included],
        "sha256": canaries.digest(),
        "note": "simulation only: which canaries client 0 trained on; the audit's secret, "
        "never sent in a message",
    }
    from fedgen.files import write_atomic  # imports torch; only here

    path = Path(run_path) / RECORD
    write_atomic(path, json.dumps(record, indent=1))
    return path


def read_canary_record(cfg: FedgenConfig, run_path: Path) -> CanarySet:
    """The run's canaries, recomputed from its config and checked against canaries.json
    when the run wrote one (a mismatch means the record or the config was changed)."""
    canaries = _of(cfg)
    path = Path(run_path) / RECORD
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("sha256") != canaries.digest():
            raise ValueError(
                f"{path} does not match the canaries of {run_path}/config.yaml (seed "
                f"{cfg.seed}, {cfg.privacy.canaries} canaries): one of them was edited; "
                "restore the run's own files"
            )
    return canaries


# --------------------------------------------------------------------------- the bound


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, if training is (epsilon, delta)-DP, that r guesses about m canaries
    (each included with probability 1/2) get at least v right.

    Steinke, Nasr and Jagielski's bound: with p = e^eps / (1 + e^eps) (the accuracy of
    eps-randomised response), P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta * a, where
    a = max over 1 <= i <= v of P[v - i <= Bin(r, p) < v] / i."""
    from scipy import stats  # imported here: the privacy report imports this module

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon {epsilon} must be >= 0 and delta {delta} in [0, 1]")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[= v-1], P[= v-2], ...
    a = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * a)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct out of r guesses (about m canaries) reject at
    `confidence`: training is not (epsilon', delta)-DP for any epsilon' below it, unless
    an event of probability 1 - confidence happened. 0 when nothing is rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    level = 1.0 - confidence
    if audit_p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) <= level:
        low, high = high, 2 * high
        if high > 1e3:
            return low  # (only with delta = 0 and v = r would this run on)
    for _ in range(100):  # bisection: p-value(low) <= level < p-value(high)
        mid = (low + high) / 2
        if audit_p_value(m, r, v, mid, delta) <= level:
            low = mid
        else:
            high = mid
        if high - low < 1e-9:
            break
    return low


def guess_counts(m: int) -> list[int]:
    """How many canaries are guessed on each side (top k "in", bottom k "out"), per
    fraction in GUESS_FRACTIONS; at least 1, distinct."""
    return sorted({max(1, int(round(f * m / 2))) for f in GUESS_FRACTIONS if m >= 2})


def audit_guesses(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95
) -> dict[str, Any]:
    """Guess from `scores` (higher: more likely included) which canaries were included,
    for each guess count, and the lower bound on epsilon of each; the reported bound is
    the largest, valid at `confidence` overall (each is taken at a Bonferroni-corrected
    level). Ties are broken by canary index, which knows nothing of inclusion."""
    m = len(scores)
    if m != len(included):
        raise ValueError(f"{m} scores for {len(included)} canaries")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores are not all finite; the released weights are broken")
    order = np.argsort(-scores, kind="stable")
    counts = guess_counts(m)
    per_test = 1.0 - (1.0 - confidence) / max(1, len(GUESS_FRACTIONS))
    rows = []
    for k in counts:
        top, bottom = order[:k], order[m - k :]
        if 2 * k > m:  # not enough canaries for disjoint sides
            continue
        correct = int(included[top].sum() + (~included[bottom]).sum())
        rows.append(
            {
                "guessed_in": k,
                "guessed_out": k,
                "guesses": 2 * k,
                "correct": correct,
                "epsilon_lower_bound": epsilon_lower_bound(m, 2 * k, correct, delta, per_test),
            }
        )
    # The largest bound; among equal ones (all 0, say) the most correct beyond chance.
    best = max(
        rows,
        key=lambda row: (row["epsilon_lower_bound"], row["correct"] - row["guesses"] / 2),
        default=None,
    )
    return {
        "canaries": m,
        "included": int(included.sum()),
        "delta": delta,
        "confidence": confidence,
        "per_test_confidence": per_test,
        "tests": rows,
        "epsilon_lower_bound": best["epsilon_lower_bound"] if best else 0.0,
        "best": best,
    }
