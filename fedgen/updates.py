"""Checks on a client's update before the server aggregates it.

A federation that runs for hours meets broken and hostile clients. An update is rejected
(and the rest aggregated) when it does not have exactly the global model's keys, shapes
and dtypes, holds NaN or Inf, or moves a weight further than the configured local
training could: Adam moves a parameter by at most about lr per step (the bound below
leaves a wide margin), so `steps x lr x ADAM_STEP_MARGIN` bounds any honest change."""

from __future__ import annotations

import torch

from fedgen.config import FedgenConfig

__all__ = [
    "max_weight_change",
    "check_update",
    "check_release",
    "release_shape",
    "ADAM_STEP_MARGIN",
    "RELEASE_KEY",
]

# Where an `mmd` client's release sits beside its weights when both are digested or kept
# together (the device's ledger names the digest of what it sent, the server of what it
# received): a key no model's state_dict has.
RELEASE_KEY = "pooled-target/release"
# An honest release is a sum of at most n unit vectors plus Gaussian noise of std at most
# sigma per entry, whose norm exceeds sigma (sqrt(entries) + t) with probability below
# exp(-t^2 / 2): at t = 10, never in practice.
RELEASE_NOISE_MARGIN = 10.0

# |Adam step| <= lr * (1 - b1) / sqrt(1 - b2) / sqrt(1 - b1^2 / b2) after bias correction
# settles, about 18 lr for b1 = 0.5 and 7 lr for b1 = 0.9 (b2 = 0.999); 50 is a margin
# honest clients never approach and scaled or garbage updates always pass.
ADAM_STEP_MARGIN = 50.0


def max_weight_change(cfg: FedgenConfig, stage: str) -> float:
    """The largest change of any one weight a client's round of `stage` can make."""
    tr = cfg.training
    steps = cfg.local_steps_for(stage)
    if stage == "mmd":  # one release, then local_steps generator steps
        return tr.local_steps * tr.lr_generator * ADAM_STEP_MARGIN
    if stage == "gan":
        lr = max(tr.lr_discriminator, tr.lr_generator)
    elif stage == "vqvae":
        lr = tr.lr_vqvae
    else:
        lr = tr.lr_prior
    return steps * lr * ADAM_STEP_MARGIN


def check_update(
    sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor], max_change: float
) -> str | None:
    """Why `received` must not be aggregated, or None when it may."""
    missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
    if missing or extra:
        return f"keys differ from the global model: missing {missing[:3]}, extra {extra[:3]}"
    for key, ref in sent.items():
        new = received[key]
        if new.shape != ref.shape:
            return f"{key}: shape {tuple(new.shape)}, expected {tuple(ref.shape)}"
        # float32 back for float64 sent is fine (server optimisers compute in float64);
        # anything else, float16 included, would change the aggregate's precision.
        if new.dtype != ref.dtype and not (new.dtype == torch.float32 and ref.is_floating_point()):
            return f"{key}: dtype {new.dtype}, expected {ref.dtype}"
        if not new.is_floating_point():
            continue
        if not torch.isfinite(new).all():
            return f"{key}: contains NaN or Inf"
        change = float((new.double() - ref.double()).abs().max()) if new.numel() else 0.0
        if change > max_change:
            return (
                f"{key}: a weight moved by {change:.3g}, more than the {max_change:.3g} the "
                "configured local training allows (steps x learning rate x margin)"
            )
    return None


def release_shape(cfg: FedgenConfig, num_classes: int) -> tuple[int, int]:
    """(classes, embedding entries + the count): the shape of an `mmd` client's release."""
    return (num_classes, 2 * cfg.model.embedding_frequencies + 1)


def check_release(
    release: torch.Tensor, shape: tuple[int, int], num_examples: float, noise_multiplier: float
) -> str | None:
    """Why an `mmd` client's release must not join the pooled target, or None when it may:
    its shape, finite values, and a norm no honest release of `num_examples` examples at
    this noise reaches (a hostile client could otherwise drown every class's target)."""
    if tuple(release.shape) != shape:
        return f"release of shape {tuple(release.shape)}, expected {shape}"
    if not release.is_floating_point() or not torch.isfinite(release).all():
        return "release is not finite floating point"
    # Twice n: under add/remove the server knows only a declared public size.
    bound = 2 * num_examples + noise_multiplier * (release.numel() ** 0.5 + RELEASE_NOISE_MARGIN)
    norm = float(release.double().norm())
    if norm > bound:
        return (
            f"release of norm {norm:.4g}, more than the {bound:.4g} that {num_examples:g} "
            f"examples and noise {noise_multiplier:g} allow"
        )
    return None
