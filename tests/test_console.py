"""The command line and what `fedgen simulate` shows: a light `--help` and `--version`,
an example and the defaults in every command's help, fedgen's own lines on the console
and Flower's and Ray's in the run's log, plots with whole-number rounds and nothing cut
off, no folder left behind by a failed download, and a VQ-VAE that trains a prior unless
told otherwise."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from fedgen.cli import build_parser
from fedgen.config import load_config

from .conftest import REPO

HEAVY = {"torch", "opacus", "flwr", "ray", "matplotlib", "numpy", "pydantic", "rich"}


def _run(*args: str, env: dict[str, str] | None = None, timeout: int = 120):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_help_and_version_import_nothing_heavy():
    code = (
        "import contextlib, io, json, sys\n"
        "from fedgen.cli import build_parser\n"
        "for argv in (['--help'], ['--version'], ['simulate', '--help'], ['sample', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        build_parser().parse_args(argv)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert HEAVY.isdisjoint(json.loads(proc.stdout)), json.loads(proc.stdout)


def test_version_is_the_installed_package_version():
    proc = _run("-m", "fedgen.cli", "--version")
    assert proc.returncode == 0 and proc.stdout == f"fedgen {metadata.version('fedgen')}\n"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"fedgen": parser, **sub.choices}


def test_every_command_has_an_example_help_on_every_argument_and_shows_defaults():
    commands = _commands()
    assert {"simulate", "report", "sample", "evaluate", "certs", "config-reference"} <= set(
        commands
    )
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
        if name != "fedgen":
            assert f"examples: fedgen {name}" in text, name
        for action in parser._actions:
            assert action.help, f"fedgen {name}: {action.dest} has no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {default})" in text, f"fedgen {name}: {action.dest}"
    sample = " ".join(commands["sample"].format_help().split())
    assert "(default: 64)" in sample and "(default: samples.png)" in sample


def _quality_lines(rounds: int) -> list[dict]:
    return [
        {
            "round": r,
            "max_epsilon": 2.5 * r,
            "eval": {
                "frechet_distance": 900.0 / r,
                "label_consistency": 0.2 * r,
                "downstream_accuracy": 0.1 * r if r == rounds else None,
            },
        }
        for r in range(1, rounds + 1)
    ]


def _privacy_report(rounds: int, clients: int) -> dict:
    return {
        "private": True,
        "target_epsilon": 10.0,
        "delta": 1e-5,
        "accountant": "pld",
        "rounds": [
            {"round": r, "epsilon": {str(c): 3.0 * r**0.5 for c in range(clients)}}
            for r in range(1, rounds + 1)
        ],
    }


@pytest.mark.parametrize("rounds", [1, 3])
def test_plots_show_whole_rounds_and_nothing_cut_or_overlapping(tmp_path, monkeypatch, rounds):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from fedgen import plots

    figures = []
    save = plots._save_figure

    def keep(fig, path):
        figures.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "_save_figure", keep)
    plots.plot_quality(_quality_lines(rounds), tmp_path / "quality.png")
    plots.plot_epsilon(_privacy_report(rounds, clients=4), tmp_path / "privacy_epsilon.png")
    assert (tmp_path / "quality.png").is_file() and (tmp_path / "privacy_epsilon.png").is_file()
    assert len(figures) == 2
    for fig in figures:
        canvas = FigureCanvasAgg(fig)  # pyplot let go of it once saved
        canvas.draw()
        renderer = canvas.get_renderer()
        page = fig.bbox.padded(1)
        round_axes = [ax for ax in fig.axes if ax.get_xlabel() == "round"]
        assert round_axes
        for ax in round_axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        # Each panel with everything it draws (title, labels, tick labels, legend).
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        if fig._suptitle is not None:
            boxes.append(fig._suptitle.get_window_extent(renderer))
        for box in boxes:
            assert page.contains(box.x0, box.y0) and page.contains(box.x1, box.y1), "cut off"
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_x <= 0 or overlap_y <= 0, "two panels (or the title) overlap"


def test_failed_download_leaves_no_folder_and_says_what_to_do(tmp_path):
    root = tmp_path / "missing" / "mnist"
    proc = _run(
        "-m", "fedgen.cli", "simulate", "configs/mnist_gan.yaml",
        "--set", f"data.root={root}", "--out", str(tmp_path / "run"),
        # Nothing listens on port 9 of loopback: the download fails at once.
        env={"FEDGEN_MNIST_MIRRORS": "http://127.0.0.1:9/"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "could not download" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert str(root) in proc.stderr and "FEDGEN_DATA_DIR" in proc.stderr
    assert not (tmp_path / "missing").exists() and not (tmp_path / "run").exists()


def test_vqvae_trains_a_prior_unless_told_not_to():
    vq = load_config(None, ["model.type=vqvae", "federation.rounds=5"])
    assert vq.federation.prior_rounds == 2 and vq.total_rounds == 7
    assert vq.stage(vq.total_rounds) == "prior"
    # The resolved number is what the run directory and the clients' copy record.
    assert "prior_rounds: 2" in vq.to_yaml()
    assert load_config(None, ["model.type=vqvae", "federation.prior_rounds=0"]).total_rounds == 5
    assert load_config(None, []).federation.prior_rounds == 0  # the quickstart has no prior


# What reaches the console from each kind of output inside a RunConsole: a Python print,
# a raw write to fd 2, a child process, a Python warning and Flower's own logger.
CONSOLE_SCRIPT = """
import logging, os, subprocess, sys, warnings
from pathlib import Path
from fedgen.console import RunConsole, say
with RunConsole(Path(sys.argv[1]), total_rounds=2, verbose=sys.argv[2] == "1") as console:
    say("[fedgen] mine")
    print("python print")
    sys.stdout.flush()
    os.write(2, b"raw fd two\\n")
    subprocess.run(["sh", "-c", "echo child process"], check=True)
    warnings.warn("a warning")
    from flwr.supercore.logger import log
    log(logging.WARNING, "DEPRECATED FEATURE: flower")
    console.round_started(1, 3)
    console.replies(2, 4.5)
    console.round_summary("[fedgen] round 1/2: summary")
say("[fedgen] after")
"""
FOREIGN = ("python print", "raw fd two", "child process", "a warning", "DEPRECATED FEATURE")


@pytest.mark.parametrize("verbose", [False, True])
def test_console_shows_fedgens_lines_and_logs_the_rest(tmp_path, verbose):
    log = tmp_path / "simulation.log"
    proc = _run("-c", CONSOLE_SCRIPT, str(log), "1" if verbose else "0")
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    for line in ("[fedgen] mine", "[fedgen] round 1/2: training 3 clients", "summary", "after"):
        assert line in proc.stdout, line
    assert "\r" not in shown and "\x1b[" not in shown  # not a terminal: plain lines
    logged = log.read_text()
    for line in FOREIGN:
        assert line in logged, line
        assert (line in shown) == verbose, line
    assert "[fedgen] mine" in logged and "\x1b[" not in logged


# The simulation with a live bar is in tests/test_scale.py (one run serves both).
