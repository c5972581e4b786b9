"""Evaluation on the evaluation side's own data (its copy of the real splits), never on a
client's: sample grids for both model families; for the VQ-VAE, reconstruction MSE, PSNR,
codebook usage and perplexity, with a PNG of originals above reconstructions; and, for
anything that generates, the quality metrics of `fedgen.quality` (Frechet distance in the
evaluator's feature space, label consistency, downstream accuracy, optional Inception FID);
and `format_evaluation_table`, those figures as `fedgen evaluate` prints them.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedgen import quality
from fedgen.config import FedgenConfig
from fedgen.console import detail, plural
from fedgen.data import NUM_CLASSES, load_dataset, to_tensors
from fedgen.plots import save_image_grid

__all__ = [
    "Evaluator",
    "class_grid_labels",
    "format_evaluation_table",
    "reconstruction_metrics",
]


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


def _print(message: str) -> None:
    detail(f"[fedgen] {message}")


class Evaluator:
    """Evaluates a global model: after a round (server side) or from a checkpoint
    (`fedgen evaluate`)."""

    def __init__(self, cfg: FedgenConfig, log: quality.Log | None = _print) -> None:
        self.cfg = cfg
        self.log = log
        self._inception_notice_given = False

    @cached_property
    def real_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(load_dataset(self.cfg.data, "train", seed=self.cfg.seed))

    @cached_property
    def real_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensors(load_dataset(self.cfg.data, "test", seed=self.cfg.seed))

    @cached_property
    def test_images(self) -> torch.Tensor:
        """The slice of the test split the per-round reconstruction metrics use."""
        return self.real_test[0][: self.cfg.run.eval_examples]

    @cached_property
    def evaluator(self) -> tuple[quality.Classifier, dict]:
        ev = self.cfg.evaluation
        cache = Path(ev.cache_dir).expanduser() if ev.cache_dir else quality.default_cache_dir()
        recipe = quality.ClassifierRecipe(epochs=ev.evaluator_epochs, seed=self.cfg.seed)
        return quality.load_or_train_evaluator(
            self.real_train, self.real_test, recipe, cache, self.log
        )

    @cached_property
    def _real_features(self) -> np.ndarray:
        classifier, _ = self.evaluator
        return quality.features(classifier, self.real_test[0][: self.cfg.evaluation.samples])

    def quality(self, model: nn.Module, downstream: bool) -> dict:
        """Quality of `model`'s class-conditional samples against the real test split."""
        ev, seed = self.cfg.evaluation, self.cfg.seed
        classifier, info = self.evaluator
        labels = quality.balanced_labels(ev.samples, seed)
        images = quality.generate(model, labels, seed)
        real = self.real_test[0][: ev.samples]
        feats, consistency = quality.features_and_label_consistency(classifier, images, labels)
        metrics: dict = {
            "evaluator_test_accuracy": info["test_accuracy"],
            "frechet_distance": quality.frechet_distance(feats, self._real_features),
            "frechet_generated_samples": len(images),
            "frechet_real_samples": len(real),
            "label_consistency": consistency,
        }
        if ev.inception_weights:
            weights = Path(ev.inception_weights).expanduser()
            metrics["inception_fid"] = quality.frechet_distance(
                quality.inception_features(weights, images),
                quality.inception_features(weights, real),
            )
        else:
            metrics["inception_fid"] = None
            if not self._inception_notice_given and self.log is not None:
                self.log("Inception FID skipped: set evaluation.inception_weights to a local file")
                self._inception_notice_given = True
        if downstream:
            n = ev.downstream_examples or len(self.real_train[1])
            if self.log is not None:
                self.log(
                    f"downstream accuracy: generating {n} labelled images to train a fresh "
                    "classifier on, which is then tested on the real test images"
                )
            down_labels = quality.balanced_labels(n, seed + 1)
            down_images = quality.generate(model, down_labels, seed + 1)
            recipe = quality.ClassifierRecipe(epochs=ev.downstream_epochs, seed=seed)
            metrics |= quality.downstream_accuracy_over_seeds(
                down_images,
                down_labels,
                self.real_test,
                recipe,
                ev.downstream_seeds,
                ev.holdout_fraction,
                self.log,
            )
        return metrics

    def samples(self, model: nn.Module, path: Path) -> None:
        labels = class_grid_labels(self.cfg.run.samples_per_class)
        # The same noise every time, so grids of successive rounds are comparable.
        gen = torch.Generator().manual_seed(self.cfg.seed)
        save_image_grid(model.sample(labels, generator=gen), NUM_CLASSES, path)

    def real_samples(self, path: Path) -> None:
        """Real test images laid out like `samples` (one row per class), to put next to
        the generated grid. The test split is public evaluation data, not a client's."""
        images, labels = self.real_test
        per_class = self.cfg.run.samples_per_class
        rows = [images[labels == c][:per_class] for c in range(NUM_CLASSES)]
        save_image_grid(torch.cat(rows), NUM_CLASSES, path)

    def evaluate(
        self,
        model: nn.Module,
        server_round: int,
        out: Path,
        downstream: bool = False,
        reconstruction_images: torch.Tensor | None = None,
    ) -> dict:
        """Write the round's pictures under `out` and return its metrics."""
        metrics: dict = {}
        stage = self.cfg.stage(server_round)
        if self.cfg.model.type == "vqvae":
            images = self.test_images if reconstruction_images is None else reconstruction_images
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
            if not (out / "real.png").exists():
                self.real_samples(out / "real.png")
            metrics |= self.quality(model, downstream)
        return metrics


_EVALUATION_ROWS = (
    ("evaluator_test_accuracy", "evaluator accuracy on real test images", "{:.4f}"),
    ("frechet_distance", "Frechet distance (evaluator features)", "{:.3f}"),
    ("frechet_generated_samples", "  generated / real samples", None),
    ("label_consistency", "label consistency", "{:.4f}"),
    ("inception_fid", "Inception FID", "{:.2f}"),
    ("downstream_accuracy", "downstream accuracy on real test images", "{:.4f}"),
    ("downstream_train_examples", "  generated images it was trained on", "{}"),
    ("downstream_selected_epoch", "  epoch chosen on held-out generated images", "{}"),
    ("downstream_seeds", "  classifiers averaged (one seed each)", "{}"),
    ("downstream_accuracy_min", "  the lowest of them", "{:.4f}"),
    ("downstream_accuracy_max", "  the highest of them", "{:.4f}"),
    ("recon_mse", "reconstruction MSE", "{:.5f}"),
    ("psnr", "reconstruction PSNR (dB)", "{:.2f}"),
    ("codebook_usage", "codebook usage", "{:.3f}"),
    ("codebook_perplexity", "codebook perplexity", "{:.2f}"),
)


def format_evaluation_table(result: dict[str, Any]) -> str:
    """The figures of an evaluation.json as a two-column table."""
    m, p = result["metrics"], result["privacy"]
    where = f"{result['partition']}" + (
        f" alpha {result['dirichlet_alpha']:g}" if result.get("dirichlet_alpha") else ""
    )
    eps = (
        f"epsilon {p['max_epsilon']:.3f} at delta {p['delta']:g} ({p['accountant']})"
        if p.get("max_epsilon") is not None
        else ("private (no report yet)" if p["private"] else "non-private")
    )
    rows = [
        ("run", f"{result['model']} on {result['dataset']}, round {result['round']}"),
        (
            "federation",
            f"{plural(result['clients'], 'client')}, {where}, {plural(result['rounds'], 'round')}",
        ),
        ("privacy", eps),
    ]
    for key, label, fmt in _EVALUATION_ROWS:
        if key not in m:
            continue
        if key == "frechet_generated_samples":
            rows.append((label, f"{m[key]} / {m['frechet_real_samples']}"))
        else:
            rows.append((label, "skipped" if m[key] is None else fmt.format(m[key])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
