"""DP-SGD from Opacus's layers, with one sample rate and secure randomness.

Opacus's `PrivacyEngine.make_private` derives the sample rate from the data loader's length
and records `1 / int(1 / (1 / m))` in its accountant while its sampler uses `1 / m`; for
some m (93, 99, 105, ...) the two differ, and the epsilon reported is then not the one
spent. Here the pieces are assembled from Opacus's own layers instead, each given the one
planned rate:

- `GradSampleModule` (per-example gradients) and `DPOptimizer` (clip, noise, scale), whose
  noise is drawn from a ChaCha20 stream (`fedgen.secure_random`);
- `PoissonBatches`, which samples each example with probability `sample_rate` from the
  same stream;
- `StepRecord` (in `fedgen.privacy`, which needs no Opacus), the accountant history,
  which counts one (noise, `sample_rate`) step each time the optimizer adds noise.

The averaging denominator is the planned expected batch size (a constant, never the size
of the drawn batch), so the released update does not depend on n beyond what the
neighbouring relation treats as public.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

import fedgen.opacus_logging  # noqa: F401  (undoes its import-time logging setup)
from fedgen.privacy import HistoryEntry, StepRecord
from fedgen.secure_random import SecureRandom

__all__ = ["SecureDPOptimizer", "PoissonBatches", "StepRecord", "make_private"]


class SecureDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise from a `SecureRandom` stream."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, rng: SecureRandom, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        # One draw for every parameter: the stream's cost is per call as much as per value.
        sizes = [p.summed_grad.numel() for p in self.params]
        first = self.params[0].summed_grad
        noise = self.rng.gaussian((sum(sizes),), std, first.dtype, first.device).split(sizes)
        for p, part in zip(self.params, noise, strict=True):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + part.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


class PoissonBatches:
    """Endless Poisson-sampled batches of `tensors` (each row in with `sample_rate`)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], sample_rate: float, rng: SecureRandom):
        self.tensors = tensors
        self.sample_rate = sample_rate
        self.rng = rng

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = self.tensors[0].shape[0]
        while True:
            idx = self.rng.poisson_indices(n, self.sample_rate)
            yield tuple(t[idx] for t in self.tensors)


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: tuple[torch.Tensor, ...],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    expected_batch_size: int,
    history: list[HistoryEntry],
    rng: SecureRandom,
) -> tuple[GradSampleModule, SecureDPOptimizer, PoissonBatches, StepRecord]:
    """Wrap `module` and `optimizer` for DP-SGD on Poisson batches of `tensors`; the
    returned record continues `history` by one entry per noised step."""
    ModuleValidator.validate(module, strict=True)
    private_module = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    dp_optimizer = SecureDPOptimizer(
        optimizer,
        rng=rng,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    record = StepRecord(history, noise_multiplier, sample_rate)
    dp_optimizer.attach_step_hook(record.step)
    return private_module, dp_optimizer, PoissonBatches(tensors, sample_rate, rng), record
