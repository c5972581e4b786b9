"""Is the `mmd` recipe limited by its fit or by its embedding? For a finished run, per
class, the squared MMD in the run's own mean embedding between the generator's images
and real test images, next to the floor: the same distance between real training images
and the same real test images (two samples of one distribution, as many of each).

Columns: the generator against real training images (what it was fitted to), and the
floor for that (training images against other training images); then the same against
real test images, with the floor there (test against test) and the shift between the two
splits (training against test images; MNIST's splits come from different writers).
The last two: the mean kernel between two generated images of a class, and between two
real ones. A generator with too little variety shows a higher one.

A fit at the floor means the embedding cannot tell the generator's images from real
ones any better: a better fit of this embedding cannot improve the images, a different
embedding might. A fit well above it means the generator (or its steps) falls short.

    FEDGEN_DATA_DIR=../shared/data/mnist python simulations/probe_mmd_floor.py runs/RUN
    python simulations/probe_mmd_floor.py probe.pt --config configs/mnist_mmd.yaml [--set ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedgen.config import load_config
from fedgen.data import NUM_CLASSES, Dataset, load_dataset, to_tensors
from fedgen.embedding import pair_similarity
from fedgen.models import build_model
from fedgen.reports import RunDir


def mean_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.embedding(images[i : i + 500]) for i in range(0, len(images), 500)])


def similarity(x: torch.Tensor) -> float:
    """The mean kernel between two different images of a set: higher for a set that
    varies less."""
    return float(pair_similarity(x))


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased squared MMD between two sets of unit-norm feature vectors."""
    return similarity(a) + similarity(b) - 2 * float((a.mean(0) * b.mean(0)).sum())


def as_images(data: Dataset, label: int, n: int, skip: int = 0) -> torch.Tensor:
    """`n` images of class `label`, after the first `skip` of a fixed shuffle."""
    idx = torch.nonzero(torch.from_numpy(data.labels.copy()) == label).flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(label))]
    return to_tensors(data.subset(idx[skip : skip + n].numpy()))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", help="a run directory, or a state_dict saved by probe_quality --save"
    )
    parser.add_argument("--config", help="with a saved state_dict: the probe's YAML config")
    parser.add_argument("--set", action="append", default=[], help="with --config: overrides")
    parser.add_argument("--per-class", type=int, default=1000)
    args = parser.parse_args()
    if Path(args.run).is_dir():
        cfg = load_config(Path(args.run) / "config.yaml")
        _, state = RunDir(args.run).checkpoint()
    else:
        cfg = load_config(args.config, args.set)
        state = torch.load(args.run)
    model = build_model(cfg.model, NUM_CLASSES)
    model.load_state_dict(state)
    model.eval()
    train = load_dataset(cfg.data, "train", seed=cfg.seed)
    test = load_dataset(cfg.data, "test", seed=cfg.seed)
    gen = torch.Generator().manual_seed(0)
    n = args.per_class
    columns = ["gen-train", "train-train", "gen-test", "train-test", "test-test", "k(gen)",
               "k(train)"]  # fmt: skip
    print("class  " + "  ".join(f"{c:>11}" for c in columns))
    rows = []
    for c in range(NUM_CLASSES):
        train_a = mean_embedding(model, as_images(train, c, n))
        train_b = mean_embedding(model, as_images(train, c, n, skip=n))
        test_a = mean_embedding(model, as_images(test, c, n // 2))
        test_b = mean_embedding(model, as_images(test, c, n // 2, skip=n // 2))
        fake = mean_embedding(model, model.sample(torch.full((n,), c), gen))
        rows.append([
            mmd2(fake, train_a), mmd2(train_b, train_a), mmd2(fake[: n // 2], test_a),
            mmd2(train_b[: n // 2], test_a), mmd2(test_b, test_a), similarity(fake),
            similarity(train_a),
        ])  # fmt: skip
        print(f"{c:5d}  " + "  ".join(f"{v:11.5f}" for v in rows[-1]))
    means = torch.tensor(rows).mean(dim=0).tolist()
    print("mean   " + "  ".join(f"{v:11.5f}" for v in means))


if __name__ == "__main__":
    main()
