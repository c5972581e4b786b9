"""Leakage, measured: memorisation of training images by the generator, and membership
inference against the released weights. Everything here takes weights and tensors (images
in [-1, 1], shape (N, 1, 28, 28), int64 labels) and knows nothing of runs or Flower;
`fedgen.audit` decides which data plays which part.

- Memorisation: for each generated image, the distance to the nearest training image and
  to the nearest held-out real image of the same class, in pixel space and in the
  evaluator's feature space. The two reference sets are subsampled to the same size per
  class, so that a generator that has learnt the distribution without copying is as close
  to one as to the other (ratio d_train / d_heldout near 1, and about half of the
  generated images closer to a training image); a generator that copies its training
  images has ratios near 0 and that share near 1.
- Membership inference: a score per example from the released model (the GAN's
  discriminator logit for the image with its label; the VQ-VAE's negative reconstruction
  error), higher meaning "more likely a training example"; members and non-members are
  told apart by thresholding it. The calibrated variant subtracts the score under a
  reference model trained, with the same recipe, on other real data that contains none
  of the scored examples (difficulty calibration, the offline idea behind LiRA): an
  example that every model finds easy no longer looks like a member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedgen.config import FedgenConfig, PrivacyConfig
from fedgen.models import ConditionalGAN, MMDGenerator, VQVAEWithPrior, build_model

__all__ = [
    "FPR_TARGETS",
    "MemorisationResult",
    "equal_per_class",
    "memorisation",
    "Scorer",
    "example_scorer",
    "example_scores",
    "roc_curve",
    "roc_auc",
    "attack_summary",
    "membership_inference",
    "train_reference",
    "REFERENCE_FAMILIES",
]

FPR_TARGETS = (0.01, 0.001)
NEAR_COPY_RATIO = 1 / 3  # d_train < d_heldout / 3: a near copy of one training image
COPY_QUANTILE = 0.05  # data copying: closer than 95% of held-out images are to training
Embed = Callable[[torch.Tensor], np.ndarray]


# --------------------------------------------------------------------------- memorisation


def equal_per_class(
    labels_a: np.ndarray, labels_b: np.ndarray, cap: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into two labelled sets with the same number of examples of every class
    (the smaller set's count, at most `cap`), drawn at random with `seed`."""
    rng = np.random.default_rng(seed)
    picks_a, picks_b = [], []
    for c in np.union1d(np.unique(labels_a), np.unique(labels_b)):
        in_a, in_b = np.flatnonzero(labels_a == c), np.flatnonzero(labels_b == c)
        k = min(len(in_a), len(in_b), cap)
        picks_a.append(rng.choice(in_a, k, replace=False))
        picks_b.append(rng.choice(in_b, k, replace=False))
    return np.sort(np.concatenate(picks_a)), np.sort(np.concatenate(picks_b))


def _nearest(
    queries: torch.Tensor, query_labels: np.ndarray, pool: torch.Tensor, pool_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the Euclidean distance to, and index of, the nearest pool row of the
    same class (inf and -1 when the class has no pool row)."""
    dist = np.full(len(queries), np.inf)
    index = np.full(len(queries), -1, dtype=np.int64)
    for c in np.unique(query_labels):
        rows, cand = np.flatnonzero(query_labels == c), np.flatnonzero(pool_labels == c)
        if len(cand) == 0:
            continue
        d = torch.cdist(queries[rows].float(), pool[cand].float()).double()
        best = d.min(dim=1)
        dist[rows] = best.values.numpy()
        index[rows] = cand[best.indices.numpy()]
    return dist, index


@dataclass
class MemorisationResult:
    """The summary (plain data for audit.json) and, per space, the per-image arrays the
    plots need (kept out of the JSON)."""

    summary: dict[str, Any]
    ratios: dict[str, np.ndarray] = field(default_factory=dict)
    nearest_train: dict[str, np.ndarray] = field(default_factory=dict)
    nearest_heldout: dict[str, np.ndarray] = field(default_factory=dict)
    d_train: dict[str, np.ndarray] = field(default_factory=dict)
    d_heldout: dict[str, np.ndarray] = field(default_factory=dict)
    # Nearest image of the whole training set (index into it) and the distance to it.
    copy_nearest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    copy_distance: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _space_summary(d_train: np.ndarray, d_heldout: np.ndarray, labels: np.ndarray) -> dict:
    ratio = d_train / np.maximum(d_heldout, 1e-12)
    closer = d_train < d_heldout
    quantiles = np.quantile(ratio, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "median_ratio": float(np.median(ratio)),
        "ratio_quantiles": {
            q: float(v) for q, v in zip(("5%", "25%", "50%", "75%", "95%"), quantiles, strict=True)
        },
        "share_closer_to_training": float(closer.mean()),
        "share_near_copies": float((ratio < NEAR_COPY_RATIO).mean()),
        "mean_distance_training": float(d_train.mean()),
        "mean_distance_heldout": float(d_heldout.mean()),
        "share_closer_to_training_per_class": {
            str(int(c)): float(closer[labels == c].mean()) for c in np.unique(labels)
        },
    }


def memorisation(
    generated: torch.Tensor,
    generated_labels: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    embed: Embed | None = None,
    per_class: int = 300,
    seed: int = 0,
) -> MemorisationResult:
    """Nearest training and held-out image (same class) of every generated image, in pixel
    space and, with `embed` (e.g. the evaluator's features), in feature space. Training
    and held-out sets are first cut to the same count per class (at most `per_class`)."""
    gen_labels = generated_labels.numpy()
    ti, hi = equal_per_class(train[1].numpy(), heldout[1].numpy(), per_class, seed)
    tx, ty = train[0][ti], train[1][ti].numpy()
    hx, hy = heldout[0][hi], heldout[1][hi].numpy()
    missing = sorted(set(gen_labels.tolist()) - set(ty.tolist()))
    if missing:
        raise ValueError(
            f"no training or held-out image of class(es) {missing} to compare generated "
            "images with; give both sets every class the generator is asked for"
        )
    spaces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {
        "pixel": (generated.flatten(1), tx.flatten(1), hx.flatten(1))
    }
    if embed is not None:
        spaces["features"] = tuple(  # type: ignore[assignment]
            torch.from_numpy(np.asarray(embed(x), dtype=np.float64)) for x in (generated, tx, hx)
        )
    result = MemorisationResult(
        summary={
            "generated": len(gen_labels),
            "training_compared": len(ty),
            "heldout_compared": len(hy),
            "per_class": int(np.bincount(ty).max()) if len(ty) else 0,
            "equal_sizes": "training and held-out sets cut to the same count per class "
            "(at most per_class), drawn at random, so neither is closer by being larger",
            "near_copy_ratio": NEAR_COPY_RATIO,
        }
    )
    for space, (g, t, h) in spaces.items():
        d_t, i_t = _nearest(g, gen_labels, t, ty)
        d_h, i_h = _nearest(g, gen_labels, h, hy)
        result.summary[space] = _space_summary(d_t, d_h, gen_labels)
        result.ratios[space] = d_t / np.maximum(d_h, 1e-12)
        result.d_train[space], result.d_heldout[space] = d_t, d_h
        # Indices into the caller's sets, for pictures of the pairs.
        result.nearest_train[space] = ti[i_t]
        result.nearest_heldout[space] = hi[i_h]
    result.summary["data_copying"], result.copy_nearest, result.copy_distance = _data_copying(
        generated, gen_labels, train, hx, hy
    )
    return result


def _data_copying(
    generated: torch.Tensor,
    gen_labels: np.ndarray,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout_x: torch.Tensor,
    heldout_y: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Copies of any training image, searched in the *whole* training set (pixel space):
    the distance from each generated image to its nearest training image, against the
    same distance for held-out real images (which were not trained on, so their
    distances are what "not a copy" looks like). The equal-size comparison above only
    finds a copy when the copied image is in its subsample; this one finds every copy."""
    pool, pool_labels = train[0].flatten(1), train[1].numpy()
    d_gen, i_gen = _nearest(generated.flatten(1), gen_labels, pool, pool_labels)
    d_real, _ = _nearest(heldout_x.flatten(1), heldout_y, pool, pool_labels)
    threshold = float(np.quantile(d_real, COPY_QUANTILE))
    summary = {
        "training_searched": len(pool_labels),
        "heldout_reference": len(heldout_y),
        "threshold": threshold,
        "threshold_meaning": f"the {COPY_QUANTILE:.0%} quantile of held-out real images' "
        "distances to their nearest training image (pixel space)",
        "share_generated_below": float((d_gen < threshold).mean()),
        "expected_without_copying": COPY_QUANTILE,
        "median_distance_generated": float(np.median(d_gen)),
        "median_distance_heldout": float(np.median(d_real)),
    }
    return summary, i_gen, d_gen


# --------------------------------------------------------------------------- membership


Scorer = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def example_scorer(model: nn.Module, batch: int = 500) -> Scorer:
    """Per example, how much the released model looks as if it trained on it (higher:
    more): the GAN's discriminator logit for (image, label), the VQ-VAE's negative
    reconstruction error (mean squared, pixels in [-1, 1]), or for `mmd` the inner product
    of the example's embedding with the mean embedding of the generator's images of its
    class (the statistic the generator was fitted to, each example's own term in it).
    Whatever the score needs once per model (`mmd`'s class means) is made here, so one
    scorer serves every set of examples."""
    if isinstance(model, MMDGenerator):
        return _mmd_scorer(model, batch)
    if isinstance(model, ConditionalGAN):
        net: nn.Module = model.discriminator

        def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return net(x, y)

    elif isinstance(model, VQVAEWithPrior):
        net = model.vqvae

        def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            recon, _, _ = net(x)
            return -(recon - x).pow(2).flatten(1).mean(1)

    else:
        raise TypeError(f"no membership score for a {type(model).__name__}")

    @torch.no_grad()
    def scores(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        was_training = net.training
        net.eval()
        out = [
            score(images[i : i + batch], labels[i : i + batch])
            for i in range(0, len(images), batch)
        ]
        net.train(was_training)
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    return scores


def example_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """`example_scorer(model)` applied once: for a single set of examples."""
    return example_scorer(model)(images, labels)


MMD_SCORE_SAMPLES = 500  # generated images per class whose mean embedding scores examples


@torch.no_grad()
def _mmd_scorer(model: MMDGenerator, batch: int) -> Scorer:
    from fedgen.quality import generate

    classes = torch.arange(model.num_classes)
    generated = generate(model, classes.repeat_interleave(MMD_SCORE_SAMPLES), seed=0)
    embed = model.embedding
    device = next(iter(embed.buffers())).device
    was_training = embed.training
    embed.eval()

    def embedded(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [embed(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
        )

    means = embedded(generated).view(model.num_classes, MMD_SCORE_SAMPLES, -1).mean(1)
    embed.train(was_training)

    @torch.no_grad()
    def scores(images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0)
        was = embed.training
        embed.eval()
        out = (embedded(images) * means[labels.long()]).sum(1)
        embed.train(was)
        return out.double().numpy()

    return scores


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of "member if score >= t" over every
    threshold t, from the strictest (0, 0) to (1, 1); tied scores move together."""
    scores = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(is_member)[last_of_tie]
    fp = np.cumsum(1 - is_member)[last_of_tie]
    tpr = np.r_[0.0, tp / max(1, len(members))]
    fpr = np.r_[0.0, fp / max(1, len(non_members))]
    return fpr, tpr


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """Probability that a random member outscores a random non-member (ties count
    half): the area under the ROC curve."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([members, non_members]))
    n1, n0 = len(members), len(non_members)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def attack_summary(members: np.ndarray, non_members: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at each FPR target, with the counts that say whether a target can be
    resolved at all (with N non-members, the smallest non-zero FPR is 1/N)."""
    fpr, tpr = roc_curve(members, non_members)
    n0 = len(non_members)
    at: dict[str, Any] = {}
    for target in FPR_TARGETS:
        allowed = np.flatnonzero(fpr <= target + 1e-12)
        best = allowed[np.argmax(tpr[allowed])]  # the first (lowest-FPR) of the best
        at[f"{target:g}"] = {
            "tpr": float(tpr[best]),
            "fpr_achieved": float(fpr[best]),
            "resolvable": n0 * target >= 1,
            # How many members / non-members that threshold lets through.
            "true_positives": int(round(tpr[best] * len(members))),
            "false_positives": int(round(fpr[best] * n0)),
        }
    # A fixed log-spaced FPR grid (aggregates only, no per-example values) to re-plot.
    grid = np.unique(np.r_[np.geomspace(1.0 / max(n0, 1), 1.0, 40), 1.0])
    curve = [float(tpr[fpr <= g + 1e-12].max()) for g in grid]
    return {
        "auc": roc_auc(members, non_members),
        "members": len(members),
        "non_members": n0,
        "smallest_nonzero_fpr": 1.0 / n0 if n0 else None,
        "tpr_at_fpr": at,
        "roc": {"fpr": [float(g) for g in grid], "tpr": curve},
    }


def _standardise(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / max(float(scores.std()), 1e-12)


def membership_inference(
    score: Scorer,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    reference: Scorer | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Attack with the released model's `score` (`example_scorer(model)`) and, given the
    scorer of a `reference` model that saw none of the scored examples, with the
    calibrated score (each model's scores standardised over all scored examples, then the
    reference's subtracted). Returns the summaries per attack and the ROC curves (fpr,
    tpr) for plotting."""
    if len(members[1]) == 0 or len(non_members[1]) == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    s_in, s_out = score(*members), score(*non_members)
    attacks = {"model_score": (s_in, s_out)}
    if reference is not None:
        n = len(s_in)
        target = _standardise(np.concatenate([s_in, s_out]))
        ref = _standardise(np.concatenate([reference(*members), reference(*non_members)]))
        calibrated = target - ref
        attacks["calibrated"] = (calibrated[:n], calibrated[n:])
    summaries = {name: attack_summary(a, b) for name, (a, b) in attacks.items()}
    curves = {name: roc_curve(a, b) for name, (a, b) in attacks.items()}
    return summaries, curves


# The families whose score comes from a trained network a reference can mimic; `mmd`'s
# score reads the generator's own class means, so there is nothing to calibrate against.
REFERENCE_FAMILIES = ("gan", "vqvae")


def train_reference(
    cfg: FedgenConfig, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int
) -> nn.Module:
    """A reference model for the calibrated attack: the run's architecture from the run's
    initial weights, trained without DP for `steps` steps (batch and learning rates of the
    run) on `images`, which must hold none of the examples to be scored. Defined for the
    families in `REFERENCE_FAMILIES`."""
    from fedgen.training import train_dp_locally, train_gan_locally
    from fedgen.vqvae import vqvae_loss

    if cfg.model.type not in REFERENCE_FAMILIES:
        raise ValueError(
            f"no reference model for model.type={cfg.model.type}: "
            f"defined for {', '.join(REFERENCE_FAMILIES)}"
        )
    if steps < 1:
        raise ValueError(f"a reference model needs at least one step, got {steps}")
    model = build_model(cfg.model, seed=cfg.seed)
    off = PrivacyConfig(enabled=False)
    batch = min(cfg.training.batch_size, len(labels))
    cpu = torch.device("cpu")
    if isinstance(model, ConditionalGAN):
        training = cfg.training.model_copy(
            update={
                "local_steps": steps,
                "batch_size": batch,
                "d_steps_per_g_step": min(cfg.training.d_steps_per_g_step, steps),
                "physical_batch_size": None,
            }
        )
        result = train_gan_locally(model, images, labels, training, off, 0.0, [], cpu, seed)
        model.load_state_dict(result.state_dict)
    else:
        train_dp_locally(
            model.vqvae,
            (images,),
            lambda m, x: vqvae_loss(m, x)[0],
            steps,
            batch,
            cfg.training.lr_vqvae,
            off,
            0.0,
            [],
            cpu,
            seed,
        )
    return model.eval()
