"""Evaluation on the evaluation side's own data (the real test split), never on a
client's: sample grids for both model families and, for the VQ-VAE, reconstruction MSE,
PSNR, codebook usage and perplexity, with a PNG of originals above reconstructions."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedgen.config import FedgenConfig
from fedgen.data import NUM_CLASSES, load_dataset, to_tensors
from fedgen.reports import save_image_grid

__all__ = ["Evaluator", "class_grid_labels", "reconstruction_metrics"]


def class_grid_labels(per_class: int, label: int | None = None) -> torch.Tensor:
    """Labels for a grid with one row per class (or `per_class` of a single label)."""
    if label is not None:
        return torch.full((per_class,), label, dtype=torch.long)
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


@torch.no_grad()
def reconstruction_metrics(vqvae: nn.Module, images: torch.Tensor, codebook_size: int) -> dict:
    """MSE in [0, 1] pixel units, PSNR of that mean MSE (dB), codebook usage, perplexity."""
    vqvae.eval()
    recon, codes, _ = vqvae(images)
    return _metrics(images, recon, codes, codebook_size)


def _metrics(images: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor, k: int) -> dict:
    from fedgen.vqvae import codebook_stats

    mse = float(((recon - images) / 2).pow(2).mean())  # [-1, 1] -> [0, 1] scale
    stats = codebook_stats(codes, k)
    return {
        "recon_mse": mse,
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "codebook_usage": float(stats["usage"]),
        "codebook_perplexity": float(stats["perplexity"]),
    }


class Evaluator:
    """Evaluates the global model after a round (server side)."""

    def __init__(self, cfg: FedgenConfig) -> None:
        self.cfg = cfg

    @cached_property
    def test_images(self) -> torch.Tensor:
        test = load_dataset(self.cfg.data, "test", seed=self.cfg.seed)
        n = min(self.cfg.run.eval_examples, len(test))
        return to_tensors(test.subset(np.arange(n)))[0]

    def samples(self, model: nn.Module, path: Path) -> None:
        labels = class_grid_labels(self.cfg.run.samples_per_class)
        # The same noise every time, so grids of successive rounds are comparable.
        gen = torch.Generator().manual_seed(self.cfg.seed)
        save_image_grid(model.sample(labels, generator=gen), NUM_CLASSES, path)

    def evaluate(self, model: nn.Module, server_round: int, out: Path) -> dict:
        """Write the round's pictures under `out` and return its metrics."""
        metrics: dict = {}
        stage = self.cfg.stage(server_round)
        if self.cfg.model.type == "vqvae":
            images = self.test_images
            model.vqvae.eval()
            with torch.no_grad():
                recon, codes, _ = model.vqvae(images)
            metrics = _metrics(images, recon, codes, self.cfg.model.codebook_size)
            save_image_grid(
                torch.cat([images[:16], recon[:16]]),
                2,
                out / f"reconstructions_round_{server_round:03d}.png",
            )
        if stage != "vqvae":  # a GAN always samples; a VQ-VAE once its prior trains
            self.samples(model, out / f"round_{server_round:03d}.png")
        return metrics
