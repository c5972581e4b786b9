"""Reproduce a row of docs/RESULTS.md with one command.

Each row is a recipe from `configs/` plus overrides, listed in `simulations/results.yaml`. This
script runs the simulated federation (`fedgen simulate`), then the full evaluation
(`fedgen evaluate`: Frechet distance, label consistency, downstream accuracy), and prints
the row as it appears in the table, with the wall time and the machine it ran on.

    python simulations/results.py --list
    python simulations/results.py cpu-gan-eps10-iid          # one row
    python simulations/results.py cpu-gan-eps10-iid --out runs/results/mine
    python simulations/results.py --table runs/results       # rows of finished runs

Set FEDGEN_DATA_DIR (or data.root in the recipe) to the MNIST folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROWS_FILE = Path(__file__).with_name("results.yaml")


def load_rows() -> dict[str, dict]:
    rows = yaml.safe_load(ROWS_FILE.read_text())["rows"]
    return {name: {"set": [], **row} for name, row in rows.items()}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_row(name: str, row: dict, out: Path) -> dict:
    config = REPO / row["config"]
    sets = sum((["--set", s] for s in row["set"]), [])
    started = time.perf_counter()
    simulate = [sys.executable, "-m", "fedgen.cli", "simulate", str(config), "--out", str(out)]
    subprocess.run([*simulate, *sets], check=True, cwd=REPO)
    train_seconds = time.perf_counter() - started
    evaluate = [sys.executable, "-m", "fedgen.cli", "evaluate", str(out)]
    subprocess.run([*evaluate, *row.get("evaluate_set", [])], check=True, cwd=REPO)
    result = json.loads((out / "evaluation.json").read_text())
    summary = {
        "row": name,
        "config": row["config"],
        "set": row["set"],
        "train_seconds": train_seconds,
        "machine": machine(),
        "date": date.today().isoformat(),
        "evaluation": result,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


def markdown_row(summary: dict) -> str:
    ev = summary["evaluation"]
    m, p = ev["metrics"], ev["privacy"]
    split = "IID" if ev["partition"] == "iid" else f"Dirichlet {ev['dirichlet_alpha']:g}"
    eps = f"{p['max_epsilon']:.2f}" if p.get("max_epsilon") is not None else "non-private"
    accountant = p.get("accountant", "-")
    minutes = summary["train_seconds"] / 60
    return (
        f"| {summary['row']} | {ev['dataset']} | {ev['clients']} | {split} | {eps} | "
        f"{accountant} | {ev['rounds']} | {minutes:.0f} min, {summary['machine']}, "
        f"{summary['date']} | {100 * m['downstream_accuracy']:.1f}% | "
        f"{m['frechet_distance']:.2f} | {100 * m['label_consistency']:.1f}% |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", nargs="?", help="row name from simulations/results.yaml")
    parser.add_argument("--out", help="run directory (default: runs/results/ROW)")
    parser.add_argument("--list", action="store_true", help="list the rows")
    parser.add_argument("--table", metavar="DIR", help="print rows of finished runs under DIR")
    args = parser.parse_args()
    rows = load_rows()
    if args.list:
        for name, row in rows.items():
            print(f"{name:28s} {row['config']} {' '.join(row['set'])}")
        return 0
    if args.table:
        for path in sorted(Path(args.table).glob("*/result.json")):
            print(markdown_row(json.loads(path.read_text())))
        return 0
    if args.row not in rows:
        parser.error(f"unknown row {args.row!r}; --list shows them")
    out = Path(args.out) if args.out else REPO / "runs" / "results" / args.row
    print(markdown_row(run_row(args.row, rows[args.row], out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
