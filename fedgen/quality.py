"""How good generated images are, measured the way the DP generative-model field does,
offline (no Inception weights can be downloaded on most of our machines):

- an *evaluator*: a CNN classifier trained without DP on the evaluation side's own copy of
  the real training split (it is the analyst's tool and never goes to a client), cached on
  disk under a fingerprint of the data and of its training recipe;
- the *Frechet distance* between generated and real test images in that evaluator's
  feature space (as DP-FedAvg-GAN did), and optionally Inception FID from a local weights
  file;
- *label consistency*: how often the evaluator agrees with the class a sample was asked
  for;
- *downstream accuracy*: a fresh CNN trained only on generated, labelled images and tested
  on the real test set, its epoch chosen on held-out *generated* images (choosing it on the
  real test set would inflate the figure and leak the test set into the result).

Everything here works on tensors in [-1, 1] of shape (N, 1, 28, 28); it knows nothing of
Flower or of runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedgen.console import plural
from fedgen.files import CheckpointError, cache_root, load_checkpoint, tensors_digest, write_atomic

__all__ = [
    "Classifier",
    "ClassifierRecipe",
    "data_fingerprint",
    "train_classifier",
    "accuracy",
    "features",
    "load_or_train_evaluator",
    "default_cache_dir",
    "frechet_distance",
    "label_consistency",
    "balanced_labels",
    "generate",
    "downstream_accuracy",
    "downstream_accuracy_over_seeds",
    "features_and_label_consistency",
    "inception_features",
]

Log = Callable[[str], None]


class Classifier(nn.Module):
    """A small CNN (about 99% on MNIST): two conv/pool blocks, a 128-unit feature layer
    (the space the Frechet distance is measured in) and a linear head."""

    FEATURES = 128

    def __init__(self, num_classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, self.FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierRecipe:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return f"classifier-v2:{self.epochs}:{self.batch_size}:{self.lr}:{self.seed}"


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of the images (as 8-bit pixels) and labels: names the data a cached
    evaluator was trained on, so a different split never reuses it."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(pixels.numpy().tobytes())
    h.update(labels.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 1000):
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = _batched(lambda b: model(b).argmax(1), images)
    return float((predictions == labels).float().mean())


@torch.no_grad()
def features(model: Classifier, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return _batched(model.features, images).double().numpy()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: ClassifierRecipe,
    select_on: tuple[torch.Tensor, torch.Tensor] | None = None,
    log: Log | None = None,
    what: str = "classifier",
) -> tuple[Classifier, dict]:
    """Train a fresh Classifier (no DP). With `select_on`, keep the epoch that scores best
    on that held-out set; otherwise the last. Returns the model and a per-epoch history."""
    torch.manual_seed(recipe.seed)
    # Channels-last convolutions and the fused Adam compute the same training about 1.5x
    # faster on the CPU (`simulations/bench_evaluation.py`); only float rounding differs.
    model = Classifier(num_classes=10, channels=images.shape[1])
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, fused=True)
    rng = torch.Generator().manual_seed(recipe.seed)
    history: list[dict] = []
    best_state, best_score, best_epoch = None, -1.0, recipe.epochs
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=rng)
        total = 0.0
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        entry = {"epoch": epoch, "train_loss": total / max(1, len(images))}
        if select_on is not None:
            entry["holdout_accuracy"] = accuracy(model, *select_on)
            if entry["holdout_accuracy"] > best_score:
                best_score, best_epoch = entry["holdout_accuracy"], epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(entry)
        if log is not None:
            extra = (
                f", accuracy on the held-out generated images {entry['holdout_accuracy']:.4f}"
                if "holdout_accuracy" in entry
                else ""
            )
            log(f"{what}: epoch {epoch}/{recipe.epochs}, loss {entry['train_loss']:.4f}{extra}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": history, "selected_epoch": best_epoch}


def default_cache_dir() -> Path:
    return cache_root() / "evaluators"


def load_or_train_evaluator(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    recipe: ClassifierRecipe,
    cache_dir: Path,
    log: Log | None = None,
) -> tuple[Classifier, dict]:
    """The evaluator for this training split: loaded from `cache_dir` when one was trained
    on exactly this data with this recipe, else trained and saved (safetensors, so loading
    it never unpickles code). Returns it with its info (fingerprint, test accuracy)."""
    from safetensors.torch import save as safetensors_bytes

    fingerprint = data_fingerprint(*train)
    key = hashlib.sha256(f"{fingerprint}:{recipe.key()}".encode()).hexdigest()[:20]
    weights, meta = cache_dir / f"evaluator-{key}.safetensors", cache_dir / f"evaluator-{key}.json"
    model = Classifier(num_classes=10, channels=train[0].shape[1])
    if weights.is_file() and meta.is_file():
        try:
            model.load_state_dict(load_checkpoint(weights))
            info = json.loads(meta.read_text())
            model.eval()
            if log is not None:
                log(
                    f"evaluator: cached {weights.name} (accuracy on the real test images "
                    f"{info['test_accuracy']:.4f})"
                )
            return model, info | {"cached": True}
        except (OSError, RuntimeError, ValueError, KeyError, CheckpointError) as err:
            if log is not None:
                log(f"evaluator: cache {weights} unreadable ({err}); training a new one")
    if log is not None:
        log(
            f"evaluator: training on {len(train[1])} real training images "
            f"({plural(recipe.epochs, 'epoch')})"
        )
    model, history = train_classifier(*train, recipe, log=log, what="evaluator")
    info = {
        "data_fingerprint": fingerprint,
        "train_examples": len(train[1]),
        "recipe": recipe.key(),
        "test_accuracy": accuracy(model, *test),
        "test_examples": len(test[1]),
        "history": history["epochs"],
    }
    # Atomic writes: a crash never leaves a half-written evaluator to be loaded. The
    # weights go first, so a reader never finds metadata without the weights it names.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    digest = {"sha256": tensors_digest(tensors)}  # checked by load_checkpoint
    write_atomic(weights, safetensors_bytes(tensors, metadata=digest))
    write_atomic(meta, json.dumps(info, indent=1))
    if log is not None:
        log(
            f"evaluator: accuracy on the real test images {info['test_accuracy']:.4f}; "
            f"cached as {weights}"
        )
    return model, info | {"cached": False}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b,
    so no complex matrix square root (and its round-off) is needed."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D; got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(value, 0.0))


def label_consistency(evaluator: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples the evaluator assigns to the requested class."""
    return accuracy(evaluator, images, labels)


@torch.no_grad()
def features_and_label_consistency(
    evaluator: Classifier, images: torch.Tensor, labels: torch.Tensor
) -> tuple[np.ndarray, float]:
    """`features` and `label_consistency` of the same images from one pass of the
    evaluator: its class scores are its head applied to those features."""
    evaluator.eval()
    feats = _batched(evaluator.features, images)
    predictions = evaluator.head(feats).argmax(1)
    return feats.double().numpy(), float((predictions == labels).float().mean())


def balanced_labels(n: int, seed: int, num_classes: int = 10) -> torch.Tensor:
    """n labels, as equal a count per class as n allows, in random order."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, seed: int, batch: int = 1000) -> torch.Tensor:
    """Class-conditional samples of any fedgen model family (`model.sample`), on CPU."""
    gen = torch.Generator().manual_seed(seed)
    out = [
        model.sample(labels[i : i + batch], generator=gen).cpu()
        for i in range(0, len(labels), batch)
    ]
    return torch.cat(out).clamp(-1, 1)


def downstream_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    recipe: ClassifierRecipe,
    holdout_fraction: float = 0.1,
    log: Log | None = None,
) -> dict:
    """Train a fresh classifier on (generated) `images`/`labels` only and report its
    accuracy on the real `test` set. A `holdout_fraction` of the generated images is kept
    aside and picks the epoch; the real test set is used once, at the end."""
    n = len(labels)
    n_holdout = max(1, round(n * holdout_fraction))
    if n - n_holdout < 1:
        raise ValueError(f"{n} generated images are too few to split off a held-out set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + 1))
    hold, fit = order[:n_holdout], order[n_holdout:]
    model, history = train_classifier(
        images[fit],
        labels[fit],
        recipe,
        select_on=(images[hold], labels[hold]),
        log=log,
        what="downstream classifier",
    )
    selected = history["selected_epoch"]
    return {
        "downstream_accuracy": accuracy(model, *test),
        "downstream_train_examples": len(fit),
        "downstream_holdout_examples": n_holdout,
        "downstream_selected_epoch": selected,
        "downstream_holdout_accuracy": history["epochs"][selected - 1]["holdout_accuracy"],
    }


def downstream_accuracy_over_seeds(
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    recipe: ClassifierRecipe,
    seeds: int,
    holdout_fraction: float = 0.1,
    log: Log | None = None,
) -> dict:
    """`downstream_accuracy` for `seeds` fresh classifiers (seeds `recipe.seed`,
    `recipe.seed + 1`, ...) on the same images. One seed returns its figures unchanged;
    several return their mean accuracy, lowest and highest (each classifier picks its own
    epoch on its own held-out split, as one does)."""
    if seeds == 1:
        return downstream_accuracy(images, labels, test, recipe, holdout_fraction, log)
    runs = []
    for i in range(seeds):
        if log is not None:
            log(f"downstream classifier {i + 1} of {seeds} (seed {recipe.seed + i})")
        seeded = replace(recipe, seed=recipe.seed + i)
        runs.append(downstream_accuracy(images, labels, test, seeded, holdout_fraction, log))
    each = [r["downstream_accuracy"] for r in runs]
    return {
        "downstream_accuracy": sum(each) / seeds,
        "downstream_accuracy_min": min(each),
        "downstream_accuracy_max": max(each),
        "downstream_seeds": seeds,
        "downstream_train_examples": runs[0]["downstream_train_examples"],
        "downstream_holdout_examples": runs[0]["downstream_holdout_examples"],
    }


@torch.no_grad()
def inception_features(weights: Path, images: torch.Tensor, batch: int = 200) -> np.ndarray:
    """2048-d pool features of the FID Inception network from a local TorchScript file
    (NVIDIA's `inception-2015-12-05.pt`, as used by StyleGAN2-ADA and clean-fid), which
    takes RGB images with values in [0, 255] and resizes them to 299x299 itself.
    TorchScript archives hold code and tensors, not pickled Python objects."""
    if not weights.is_file():
        raise FileNotFoundError(
            f"evaluation.inception_weights={weights} does not exist; point it at a local "
            "copy of inception-2015-12-05.pt or leave it unset to skip Inception FID"
        )
    net = torch.jit.load(str(weights), map_location="cpu").eval()
    out = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch].clamp(-1, 1) + 1) * 127.5
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(net(x, return_features=True).reshape(len(x), -1))
    return torch.cat(out).double().numpy()
