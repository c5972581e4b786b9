"""Shared fixtures: the real MNIST from ../shared/data/mnist (or FEDGEN_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two test files run at a time on two cores (pytest-xdist): one thread each, and for the
# processes they start, or the workers' math libraries would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def mnist_root() -> Path:
    env = os.environ.get("FEDGEN_DATA_DIR")
    return Path(env) if env else (REPO.parent / "shared" / "data" / "mnist").resolve()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    root = mnist_root()
    if (
        not (root / "train-images-idx3-ubyte.gz").exists()
        and not (root / "train-images-idx3-ubyte").exists()
    ):
        pytest.fail(f"MNIST not found at {root}: put it there or set FEDGEN_DATA_DIR")
    return root
