"""Shared fixtures: the real MNIST from ../shared/data/mnist (or FEDGEN_DATA_DIR)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]

# Two test files run at a time on two cores (pytest-xdist): one thread each, and for the
# processes they start, or the workers' math libraries would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


# The files that start real federations, longest first (test-seconds of one idle suite run
# on the 2-core CPU, 2026-12-06: 170 down to 25). pytest-xdist hands each worker its next
# file when it runs low; giving out the longest first (and not, as by default, the files
# with the most tests first) keeps the two workers busy to the end instead of leaving one
# file to run alone while the other core idles. The order changes no result.
LONGEST_FIRST = [
    "test_kill_resume.py", "test_audit.py", "test_deployment.py", "test_mmd.py",
    "test_hostile_server.py", "test_vqvae_federation.py", "test_faults.py", "test_scatter.py",
    "test_verify.py", "test_e2e.py", "test_scale.py", "test_privacy.py", "test_card.py",
    "test_cli.py", "test_quality.py",
]  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # list.sort is stable: a file's tests keep their order (module fixtures rely on it).
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id: str) -> Path:
    """A finished tiny simulation (`helpers.TINY_RUN`), run once for the whole suite: the
    first test to ask runs it, under a lock that the other xdist worker waits on, then
    reads. Tests only read it (copy it to change anything)."""
    from .helpers import TINY_RUN

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # shared by this session's workers, and only by them
    home, done = root / "tiny-run", root / "tiny-run.done"
    out = home / "run"
    with FileLock(str(root / "tiny-run.lock")):
        if not done.exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            cmd = [sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(out)]
            for setting in TINY_RUN:
                cmd += ["--set", setting]
            # A guard against a hung run only: it takes 25-90 s on a 2-core machine.
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done.touch()
    return out


@pytest.fixture(scope="session")
def glyph_evaluator_cache(tmp_path_factory, worker_id: str) -> Path:
    """An evaluator cache holding the classifier of the quickstart's glyphs (the default
    data), trained once for the whole suite under a lock the other xdist worker waits on:
    the quality regressions of both families read it instead of each training its own."""
    from fedgen.config import load_config
    from fedgen.evaluation import Evaluator

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # shared by this session's workers, and only by them
    cache = root / "glyph-evaluator"
    with FileLock(str(root / "glyph-evaluator.lock")):
        _ = Evaluator(load_config(None, [f"evaluation.cache_dir={cache}"]), log=None).evaluator
    return cache
