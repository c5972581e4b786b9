"""How a simulated federation grows with its number of clients: 10, 100 and 1,000.

Each size runs the real `fedgen simulate` path (Flower's simulation engine on Ray, the
product's ClientApp, DP on, every client with its own plan and ledger) in a process of
its own, on MNIST split by Dirichlet(0.5) or label shards, sampling `fraction_train` of
the clients each round. Per size it prints:

  round s       wall time of a steady round (rounds 2..R-1: round 1 also starts the
                Ray workers, round R also runs the final evaluation; both are shown apart)
  outside       share of a steady round's worker time not spent in local DP training:
                1 - sum(training) / (workers x wall)
  per client    that outside time per sampled client (seconds): everything a client
                costs beyond its training, on the client (data slice, model, accounting,
                ledger) and on the server (Ray messages, aggregation, bookkeeping)
  client side   the part of it spent inside the ClientApp, around the training
  accounting    the part of that spent in the privacy accountant (dp-accounting): noise
                calibration on a client's first round, its epsilon after every round
  peak GB       peak memory of the whole process tree (proportional set size: shared
                pages counted once), sampled every 0.2 s
  report        the privacy report's count: clients listed, nodes never taking part,
                and whether listed + never == clients

The training time is measured inside the ClientApp by timing `train_gan_locally` and
`train_mmd_locally` (wrappers this script adds; the product's messages carry no timings).

    python simulations/bench_scale.py                      # 10, 100, 1000 clients
    python simulations/bench_scale.py --sizes 1000 --partition shards
    python simulations/bench_scale.py --recipe quickstart      # the default quickstart
    python simulations/bench_scale.py --recipe mnist --rounds 4  # configs/mnist_gan.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMINGS_ENV = "FEDGEN_BENCH_TIMINGS"  # the file each client process appends its timings to


# --------------------------------------------------------------------------- one size


def _timed_client_app():
    """The product's ClientApp, timing each call and the local training inside it."""
    from flwr.clientapp import ClientApp

    import clients.app as product
    import fedgen.privacy as privacy
    import fedgen.rounds as rounds

    app = ClientApp()
    trained = {"seconds": 0.0, "accounting": 0.0}

    def timed(inner, key: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                trained[key] += time.perf_counter() - start

        return wrapper

    # Local training: the GAN's DP steps, or `mmd`'s release and generator steps.
    timed_gan = timed(rounds.train_gan_locally, "seconds")
    timed_mmd = timed(rounds.train_mmd_locally, "seconds")
    # Every accountant computation a client makes goes through `_epsilon`.
    timed_epsilon = timed(privacy._epsilon, "accounting")

    @app.train()
    def train(msg, context):
        rounds.train_gan_locally = timed_gan  # in this worker process
        rounds.train_mmd_locally = timed_mmd
        privacy._epsilon = timed_epsilon
        trained.update(seconds=0.0, accounting=0.0)
        start = time.perf_counter()
        reply = product.train(msg, context)
        total = time.perf_counter() - start
        line = {
            "round": int(msg.content["config"]["server-round"]),
            "total": total,
            "train": trained["seconds"],
            "accounting": trained["accounting"],
        }
        with open(os.environ[TIMINGS_ENV], "a") as out:
            out.write(json.dumps(line) + "\n")
        return reply

    @app.query()
    def query(msg, context):
        return product.query(msg, context)

    return app


class _RoundClock:
    """fedgen's RoundProgress: when each round's messages went out."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.sampled: dict[int, int] = {}

    def round_started(self, server_round: int, sampled: int) -> None:
        self.started[server_round] = time.perf_counter()
        self.sampled[server_round] = sampled

    def replies(self, finished: int, epsilon: float | None) -> None:
        pass

    def replies_done(self) -> None:
        pass


def _scale_config(args: argparse.Namespace):
    from fedgen.config import load_config

    n = args.clients
    sampled = max(1, round(n * args.fraction))
    return load_config(
        None,
        [
            "model.type=gan",  # the scale figures are DP-SGD rounds of the GAN
            "data.dataset=mnist",
            f"data.root={args.data_root}",
            f"federation.num_clients={n}",
            f"federation.fraction_train={args.fraction}",
            f"federation.min_train_clients={sampled}",
            f"federation.partition={args.partition}",
            f"federation.rounds={args.rounds}",
            f"training.local_steps={args.local_steps}",
            f"training.batch_size={args.batch_size}",
            f"run.eval_every={args.rounds + 1}",  # only after the last round
            "evaluation.downstream=never",
            "evaluation.samples=1000",
            "run.eval_examples=1000",
            f"seed={args.seed}",
        ],
    )


def _recipe_config(args: argparse.Namespace):
    """A shipped recipe as it runs by default (the quickstart), or the MNIST recipe
    shortened to `--rounds` rounds (its evaluation cadence kept)."""
    from fedgen.config import load_config

    if args.recipe == "quickstart":
        return load_config(None, [])
    return load_config(
        ROOT / "configs" / "mnist_gan.yaml",
        [f"data.root={args.data_root}", f"federation.rounds={args.rounds}"],
    )


def run_one(args: argparse.Namespace) -> None:
    """Run one federation in this process and print its figures as one JSON line."""
    from fedgen.console import RunConsole
    from fedgen.reports import RunDir
    from server.simulation import simulate

    if args.recipe != "scale":
        cfg = _recipe_config(args)
        args.rounds = cfg.total_rounds
    else:
        cfg = _scale_config(args)
    n = cfg.federation.num_clients
    run_dir = RunDir.create(cfg, Path(args.out) / f"{args.recipe}-{n}")
    clock = _RoundClock()
    with RunConsole(run_dir.path / "simulation.log", cfg.total_rounds):
        simulate(cfg, run_dir, client=_timed_client_app(), progress=clock)
    end = time.perf_counter()
    timings = [json.loads(x) for x in Path(os.environ[TIMINGS_ENV]).read_text().splitlines()]
    report = json.loads((run_dir.path / "privacy_report.json").read_text())
    workers = max(1, int((os.cpu_count() or 1) // cfg.federation.client_cpus))
    rounds = []
    for r in range(1, args.rounds + 1):
        wall = clock.started.get(r + 1, end) - clock.started[r]
        mine = [t for t in timings if t["round"] == r]
        train = sum(t["train"] for t in mine)
        outside = max(0.0, workers * wall - train)
        rounds.append(
            {
                "round": r,
                "wall": wall,
                "sampled": clock.sampled[r],
                "replies": len(mine),
                "train": train,
                "outside_share": outside / (workers * wall),
                "per_client": outside / max(1, len(mine)),
                "client_side": sum(t["total"] - t["train"] for t in mine) / max(1, len(mine)),
                "accounting": sum(t["accounting"] for t in mine) / max(1, len(mine)),
            }
        )
    population = report.get("population") or {}
    listed = len(report["clients"])
    print(
        json.dumps(
            {
                "clients": n,
                "workers": workers,
                "rounds": rounds,
                "listed": listed,
                "never": population.get("never_took_part"),
                "nodes": population.get("nodes"),
                "max_epsilon": report["max_epsilon"],
                "never_sampled_in_report": [
                    c for c in report["clients"] if report["clients"][c]["steps"] == 0
                ],
            }
        )
    )


# --------------------------------------------------------------------------- driver


def _tree_pss(root: int) -> int:
    """Proportional set size (bytes) of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def measure(args: argparse.Namespace, clients: int, out: Path) -> dict:
    timings = out / f"timings-{clients}.jsonl"
    timings.unlink(missing_ok=True)
    timings.touch()
    cmd = [sys.executable, __file__, "--one", str(clients), *_passthrough(args), "--out", str(out)]
    env = {**os.environ, TIMINGS_ENV: str(timings), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_pss(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{clients} clients: the run failed (exit {proc.returncode}); see {out}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_bytes"] = peak
    return result


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--partition", args.partition, "--fraction", str(args.fraction),
        "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
        "--batch-size", str(args.batch_size), "--data-root", args.data_root,
        "--seed", str(args.seed), "--recipe", args.recipe,
    ]  # fmt: skip


def _steady(result: dict) -> list[dict]:
    rounds = result["rounds"]
    return rounds[1:-1] or rounds


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"\n{date.today()}  {platform.machine()}  {os.cpu_count()} cores  "
        f"{platform.python_version()}  "
        + (
            f"MNIST {args.partition}, fraction_train {args.fraction}, "
            f"{args.rounds} rounds x {args.local_steps} DP steps of batch {args.batch_size}"
            if args.recipe == "scale"
            else f"the {args.recipe} recipe as shipped"
            + (f", {args.rounds} rounds" if args.recipe == "mnist" else "")
        )
    )
    header = (
        f"{'clients':>7} {'sampled':>7} {'round s':>8} {'first s':>8} {'last s':>7} "
        f"{'train s':>8} {'outside':>8} {'per client':>10} {'client side':>11} "
        f"{'accounting':>10} "
        f"{'peak GB':>8}  report"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        steady = _steady(res)
        first, last = res["rounds"][0], res["rounds"][-1]

        def mean(key: str, rows: list[dict] = steady) -> float:
            return statistics.mean(r[key] for r in rows)

        never = res["never"] if res["never"] is not None else "?"
        complete = (
            res["nodes"] == res["clients"]
            and res["listed"] + (res["never"] or 0) == (res["clients"])
        )
        print(
            f"{res['clients']:>7} {round(mean('sampled')):>7} {mean('wall'):>8.1f} "
            f"{first['wall']:>8.1f} {last['wall']:>7.1f} {mean('train'):>8.1f} "
            f"{mean('outside_share'):>8.1%} {mean('per_client'):>10.3f} "
            f"{mean('client_side'):>11.3f} {mean('accounting'):>10.3f} "
            f"{res['peak_bytes'] / 2**30:>8.2f}  "
            f"{res['listed']} listed + {never} never took part"
            f"{' = all' if complete else ' (INCOMPLETE)'}; max epsilon {res['max_epsilon']:.3f}"
        )
    if len(results) > 1:
        base = results[0]
        for res in results[1:]:
            print(
                f"{res['clients']} against {base['clients']} clients: peak memory x"
                f"{res['peak_bytes'] / base['peak_bytes']:.2f}, per-client overhead x"
                f"{statistics.mean(r['per_client'] for r in _steady(res)) / max(1e-9, statistics.mean(r['per_client'] for r in _steady(base))):.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--recipe",
        choices=["scale", "quickstart", "mnist"],
        default="scale",
        help="scale: the sizes above; quickstart or mnist: that recipe's own federation "
        "(mnist shortened to --rounds), for the share of its rounds spent outside training",
    )
    parser.add_argument("--partition", choices=["dirichlet", "shards", "iid"], default="dirichlet")
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction_train")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="small: a 1,000-way Dirichlet split "
        "leaves clients with ten-odd examples, and DP needs n >= batch"
    )  # fmt: skip
    parser.add_argument(
        "--data-root",
        default=os.environ.get("FEDGEN_DATA_DIR", str(ROOT.parent / "shared/data/mnist")),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        args.clients = args.one
        run_one(args)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="fedgen-bench-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.recipe != "scale":
        args.sizes = [0]  # the recipe's own number of clients
    for n in args.sizes:
        print(f"[bench] {n} clients ...", flush=True)
        results.append(measure(args, n, out))
    print_table(args, results)
    print(f"[bench] runs in {out}")


if __name__ == "__main__":
    main()
