"""The `mmd` model's local round: a private release of the client's per-class mean
embedding, then generator steps that fit it.

Why this is private (sample level, per client):
- The only computation that reads private data is the per-class sum of embeddings,
  `sum_i e(x_i, y_i)`, where each example contributes one vector of norm exactly 1: its
  features `phi(x_i)` (norm 1, `fedgen.models.MeanEmbedding`) and a count, both scaled by
  1/sqrt(2), in the row of its class. Adding or removing one example moves the sum by
  one unit vector: DP-SGD's case with a clip norm of 1, so one release with noise
  N(0, sigma^2) on every entry is one step of the Gaussian mechanism at sample rate 1,
  accounted by the same accountant as `(sigma, 1.0, 1)`.
- Replacing one example moves the sum by at most sqrt(2), not the 2 that dp-accounting's
  replace-one relation assumes of two unit vectors: within a class the count entries
  cancel (|phi(x) - phi(x')| / sqrt(2) <= sqrt(2)), and rows of different classes are
  orthogonal (sqrt(1 + 1)). Under replace-one the release therefore adds noise of std
  sigma / sqrt(2): the sum scaled by sqrt(2) moves by at most 2 and gets noise sigma,
  exactly the mechanism `(sigma, 1.0, 1)` accounts for (`release_std`).
- The noise comes from the client's ChaCha20 stream.
- Everything after the release is post-processing: the per-class targets (noisy sums over
  noisy counts), the generator's steps (they read generated images and the targets only),
  the running mean of the client's releases kept from round to round, and the loss the
  client reports. With `federation.pooled_target` the client also sends the release
  itself, the mechanism's output, and fits the server's sum of every client's releases
  plus its own new one: other clients' DP outputs and its own, so post-processing too.

One release per round, each with the noise calibrated for all the rounds: k releases at
noise sigma compose exactly like one at sigma / sqrt(k), and a client that keeps the
running mean of its releases fits a target as precise as that single release would give,
while a client that joins fewer rounds spends less.
"""

from __future__ import annotations

import math

import torch

from fedgen.config import PrivacyConfig, TrainingConfig
from fedgen.models import MMDGenerator
from fedgen.privacy import HistoryEntry, StepRecord
from fedgen.secure_random import SecureRandom
from fedgen.training import GeneratorEMA, LocalResult, export_adam, import_adam

__all__ = [
    "embedding_sums",
    "release_std",
    "release",
    "class_targets",
    "mmd_estimate",
    "pair_similarity",
    "pool_releases",
    "train_mmd_locally",
]

KEPT_SUM = "release.sum"
KEPT_COUNT = "release.count"
# A class whose released count is below this is left out of the fit: its target would
# be mostly noise (a noisy sum over a count near zero).
MIN_CLASS_COUNT = 5.0
_CHUNK = 500


@torch.no_grad()
def embedding_sums(model: MMDGenerator, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(classes, dim + 1): per class, the sum of its examples' unit vectors
    [phi(x), 1] / sqrt(2). Un-noised: it never leaves this module except through
    `release`."""
    embed = model.embedding
    sums = torch.zeros(model.num_classes, embed.dim + 1, dtype=torch.float64)
    device = embed.joint.device
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].to(device)
        y = labels[start : start + _CHUNK].long()
        phi = embed(x).double().cpu()
        # Exactly norm 1 in float64 (float32's rounding could exceed it by ~1e-7): the
        # sensitivity is a bound, not an approximation.
        phi = phi / phi.norm(dim=1, keepdim=True)
        rows = torch.cat([phi, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        sums.index_add_(0, y, rows / math.sqrt(2.0))
    return sums


def release_std(noise_multiplier: float, neighboring: str) -> float:
    """The noise std that the accountant's `(noise_multiplier, 1.0, 1)` covers for these
    sums: the multiplier itself under add/remove (a move of 1), over sqrt(2) under
    replace-one (a move of sqrt(2) where the relation assumes 2; see above)."""
    if neighboring == "replace_one":
        return noise_multiplier / math.sqrt(2.0)
    return noise_multiplier


def release(sums: torch.Tensor, std: float, rng: SecureRandom) -> torch.Tensor:
    """The Gaussian mechanism on the sums: N(0, std^2) on every entry."""
    return sums + rng.gaussian(tuple(sums.shape), std, dtype=torch.float64)


def class_targets(
    released: torch.Tensor, releases: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class mean embeddings from the sum of `releases` releases, a mask of the
    classes whose released count is large enough to fit, and each class's weight in the
    fit: its released share of the fitted examples, times the number of classes (1 for
    every class of a balanced client).

    Why weigh by count: FedAvg weighs each client by its size, so the federation then
    minimises sum over clients and classes of n_kc |mu_kc - mean phi(G(., c))|^2, whose
    optimum is the pooled mean embedding of each class over all clients' data. Unweighted,
    a client with 3 examples of a class would pull on it as hard as one with 3,000, with
    a thousand times the noise (a skewed, non-IID split)."""
    counts = released[:, -1] * math.sqrt(2.0) / releases
    means = released[:, :-1] / released[:, -1:].clamp_min(1e-12)
    fitted = counts >= MIN_CLASS_COUNT
    kept = torch.where(fitted, counts, torch.zeros_like(counts))
    weights = kept * len(counts) / kept.sum().clamp_min(1e-12)
    return means.float(), fitted, weights.float()


def pool_releases(
    pooled: tuple[torch.Tensor, int] | None, releases: list[torch.Tensor]
) -> tuple[torch.Tensor, int] | None:
    """The pool (`federation.pooled_target`) after a round: its sum of releases and their
    count, with `releases` (the round's accepted ones) added."""
    if not releases:
        return pooled
    total = torch.stack([r.double() for r in releases]).sum(dim=0)
    if pooled is None:
        return total, len(releases)
    return pooled[0] + total, pooled[1] + len(releases)


def pair_similarity(phi: torch.Tensor) -> torch.Tensor:
    """The mean of phi_i.phi_j over pairs i != j of the n embeddings in `phi` (..., n,
    dim): the mean kernel between two different members of a set, higher for a set that
    varies less."""
    n = phi.shape[-2]
    total = phi.sum(dim=-2)
    return (total.pow(2).sum(dim=-1) - phi.pow(2).sum(dim=(-2, -1))) / (n * (n - 1))


def mmd_estimate(phi: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, an unbiased estimate of |E phi(G) - target|^2 from n generated
    embeddings `phi` (classes, n, dim): the mean of phi_i.phi_j over pairs i != j, minus
    twice the mean of phi_i.target, plus |target|^2.

    Why not |mean phi - target|^2: that biased estimate weighs the pairs' similarity by
    (n - 1) / n, so with n = 10 it pushes the generated images apart 10% less than the
    target asks for: a pull toward too little variety (docs/RESULTS.md measured the
    difference). Unbiased, it can dip below 0 when the fit is close."""
    pairs = pair_similarity(phi)
    return pairs - 2.0 * (phi.mean(dim=1) * targets).sum(dim=1) + targets.pow(2).sum(dim=1)


def train_mmd_locally(
    model: MMDGenerator,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    history: list[HistoryEntry],
    device: torch.device,
    seed: int,
    sample_rate: float,
    kept: dict[str, torch.Tensor] | None = None,
    pooled: tuple[torch.Tensor, int] | None = None,
) -> LocalResult:
    """One round: release the per-class sums once (accounted), then `training.local_steps`
    generator steps toward the mean of this client's releases so far; or, given
    `pooled` (the sum of every client's earlier releases and how many there were), toward
    the mean of those and this round's release."""
    torch.manual_seed(seed)
    model.to(device).train()
    kept = dict(kept or {})
    sums = embedding_sums(model, images, labels)
    if privacy.enabled:
        rng = SecureRandom.from_seed(seed) if privacy.reproducible_noise else SecureRandom()
        released = release(sums, release_std(noise_multiplier, privacy.neighboring), rng)
        record = StepRecord(history, noise_multiplier, sample_rate)
        record.step()  # one release: one step, merged with the rounds before it like DP-SGD's
        history = record.history
    else:
        released = sums
    total, releases = released, 1
    if pooled is not None:
        if pooled[0].shape != released.shape:
            raise ValueError(
                f"the pooled target has shape {tuple(pooled[0].shape)}, this model's release "
                f"{tuple(released.shape)}: the server and this client build different models"
            )
        total = pooled[0].double() + released
        releases = pooled[1] + 1
    elif KEPT_SUM in kept and kept[KEPT_SUM].shape == released.shape:
        total = kept[KEPT_SUM].double() + released
        releases = int(kept[KEPT_COUNT].item()) + 1
    targets, fitted, weights = class_targets(total, releases)
    targets, weights = targets.to(device), weights.to(device)

    gen = model.generator
    optimizer = torch.optim.Adam(
        gen.parameters(), lr=training.lr_generator, betas=(training.beta1, 0.999)
    )
    if training.keep_optimizer_state:
        import_adam(optimizer, "g", kept)
    per_class = training.mmd_samples_per_class
    classes = torch.nonzero(fitted).flatten().to(device)
    losses = []
    ema = GeneratorEMA(gen, training.generator_ema) if training.generator_ema > 0 else None
    if len(classes):
        y = classes.repeat_interleave(per_class)
        for _ in range(training.local_steps):
            fake = gen(torch.randn(len(y), gen.latent_dim, device=device), y)
            phi = model.embedding(fake).view(len(classes), per_class, -1)
            gaps = mmd_estimate(phi, targets[classes])
            loss = (weights[classes] * gaps).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if ema is not None:
                ema.update(gen)
    if ema is not None:
        ema.copy_to(gen)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    adam = export_adam(optimizer, "g") if training.keep_optimizer_state else {}
    new_kept = adam | {
        KEPT_SUM: total.float(),
        KEPT_COUNT: torch.tensor(float(releases)),
    }
    metrics = {"g_steps": float(len(losses)), "fitted_classes": float(len(classes))}
    if losses:  # a distance to the client's released (noisy) targets: post-processing
        metrics["mmd_loss"] = sum(losses) / len(losses)
    return LocalResult(state, metrics, history, new_kept, released)
