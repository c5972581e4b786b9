"""What the test suite's tiny federation costs with two Ray actors against one.

The suite runs a dozen small real simulations (Flower + Ray, 2-3 clients, a few DP steps):
start-up, not training, is most of their cost. This runs the suite's tiny run
(`tests.helpers.TINY_RUN`: 3 glyph clients, 3 rounds) with `fedgen simulate`, alternating
two settings, and prints for each the median wall time and the CPU-seconds the whole
machine spent (every process: the CLI, Ray, its actors), with their ratios:

- baseline: `federation.client_cpus=1` (one torch thread per client; two actors on a
  2-core machine, as the suite ran until 2026-12-05);
- `ONE_ACTOR`: `client_cpus=2, client_threads=1` (the suite's setting since 2026-12-06:
  the clients in turn in one actor, one thread).

    python simulations/bench_tiny_run.py --repeats 3

Run it on an otherwise idle machine: the CPU figure is read from /proc/stat, machine-wide.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import ONE_ACTOR, TINY_RUN  # noqa: E402

BASELINE = [s for s in TINY_RUN if s not in ONE_ACTOR] + ["federation.client_cpus=1.0"]


def _busy_seconds() -> float:
    """CPU-seconds of the whole machine since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / 100.0


def run_once(settings: list[str], cache: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedgen.cli", "simulate", "--out", f"{tmp}/run"]
        for s in [*settings, f"evaluation.cache_dir={cache}"]:
            cmd += ["--set", s]
        cpu, wall = _busy_seconds(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - wall, _busy_seconds() - cpu
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = {"two actors (client_cpus=1)": BASELINE, "one actor (ONE_ACTOR)": TINY_RUN}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as cache:
        run_once(TINY_RUN, Path(cache))  # trains the evaluator once, outside the figures
        for i in range(args.repeats):
            for name, chosen in settings.items():
                figures[name].append(run_once(chosen, Path(cache)))
                wall, cpu = figures[name][-1]
                print(f"  {i + 1}/{args.repeats} {name}: wall {wall:.1f} s, cpu {cpu:.1f} s")
    medians = {
        name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for name, v in figures.items()
    }
    (base_wall, base_cpu), (one_wall, one_cpu) = medians.values()
    for name, (wall, cpu) in medians.items():
        print(f"{name:28s} wall {wall:6.1f} s   cpu {cpu:6.1f} s")
    print(
        f"ratio (baseline / one actor): wall {base_wall / one_wall:.2f}x, cpu {base_cpu / one_cpu:.2f}x"
    )


if __name__ == "__main__":
    main()
