"""What a process pays before it does any work, this tree against a baseline tree.

Every `fedgen` command, every Ray actor of a simulation and every ClientApp process a
SuperNode starts per message imports its code first; with torch, Opacus and dp-accounting
that is seconds of CPU, often more than a small round's training. This times, side by
side and alternating (so machine noise hits both alike), the median wall time of fresh
interpreters that import each entry point, in this tree and in `--baseline` (another
checkout, e.g. `git worktree add /tmp/base HEAD~1`), and prints baseline / this tree.

    python simulations/bench_startup.py --baseline /tmp/base --trials 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each kind of process imports before its first piece of work.
ENTRY_POINTS = {
    "ClientApp (a device's message)": "import clients.app",
    "reading a run (sample, evaluate)": "import fedgen.reports, fedgen.evaluation, fedgen.models",
    "fedgen verify": "import fedgen.verify, fedgen.files, fedgen.privacy, fedgen.audit_log",
    "training a round": "import fedgen.rounds",
}


def _time_import(tree: Path, code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout")
    parser.add_argument("--trials", type=int, default=5, help="fresh interpreters per case")
    args = parser.parse_args()
    rows = {}
    for name, code in ENTRY_POINTS.items():
        times: dict[str, list[float]] = {"baseline": [], "this": []}
        for _ in range(args.trials):
            times["baseline"].append(_time_import(args.baseline, code))
            times["this"].append(_time_import(REPO, code))
        base, this = (statistics.median(times[k]) for k in ("baseline", "this"))
        rows[name] = {"baseline_s": round(base, 2), "this_s": round(this, 2)}
        print(
            f"{name:34s} baseline {base:5.2f} s  this tree {this:5.2f} s  ratio {base / this:4.2f}x"
        )
    print(json.dumps({"date": str(date.today()), "machine": platform.processor() or platform.machine(),
                      "python": platform.python_version(), "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
