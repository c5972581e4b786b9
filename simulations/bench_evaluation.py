"""The downstream classifier's training (`fedgen.quality.train_classifier`, which also
trains the evaluator), two ways side by side: as it ran before 2026-12-06 (contiguous
tensors, Adam's per-parameter loop) against now (channels-last convolutions, the fused
Adam). Same data, recipe, seeds and number of updates; trials alternate so machine
noise hits both alike, and the medians are compared. Built-in glyphs: no download.

    python simulations/bench_evaluation.py                # 2 threads, as the server has
    python simulations/bench_evaluation.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
import torch.nn.functional as F
from timing import alternating_medians  # simulations/timing.py

from fedgen.data import make_glyphs, to_tensors
from fedgen.quality import Classifier, ClassifierRecipe, train_classifier


def train_as_before(images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe) -> None:
    """`train_classifier`'s loop as it was: the baseline."""
    torch.manual_seed(recipe.seed)
    model = Classifier(num_classes=10, channels=images.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    rng = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(images), generator=rng)
        for i in range(0, len(order), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=6000, help="training images")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = to_tensors(make_glyphs(max(1, args.examples // 10)))
    recipe = ClassifierRecipe(epochs=1)
    ways = {
        "before": lambda: train_as_before(images, labels, recipe),
        "now": lambda: train_classifier(images, labels, recipe),
    }
    before, now = (len(labels) / m for m in alternating_medians(ways, args.trials).values())
    print(f"classifier training, {len(labels)} images, batch {recipe.batch_size}, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"  before (baseline)  {before:7.0f} images/s")
    print(f"  now                {now:7.0f} images/s   x{now / before:.2f}")
    print(json.dumps({
        "date": date.today().isoformat(), "machine": platform.machine(),
        "processor": platform.processor(), "torch": torch.__version__,
        "threads": args.threads, "examples": len(labels),
        "before_images_per_s": round(before), "now_images_per_s": round(now),
        "speedup": round(now / before, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
