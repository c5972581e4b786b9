"""A short loop for GAN recipes: the product's own client training, a few clients in one
process, then the product's own quality metrics. An idea takes minutes, not a federation.

What runs is what `fedgen simulate` runs on each client (`fedgen.rounds.client_round`:
`build_model`, `train_gan_locally`, DP-SGD with the noise `plan_privacy` calibrates), for
each client in turn; the server's part is a plain FedAvg (weighted by client size) of their
state_dicts and, with `federation.pooled_target`, the sum of their releases, in-process.
No Flower, no Ray, no run directory. Quality is measured with
`fedgen.evaluation.Evaluator` (the evaluator CNN `fedgen evaluate` uses): label
consistency and Frechet distance, downstream accuracy with `--downstream`.

One thread (`torch.set_num_threads(1)`): a probe must leave the machine's other core alone
and time the same on every run.

    OMP_NUM_THREADS=1 python simulations/probe_quality.py                  # the quickstart
    OMP_NUM_THREADS=1 python simulations/probe_quality.py \\
        --set model.discriminator=scatter --set training.batch_size=256 --tag scatter-b256
    OMP_NUM_THREADS=1 FEDGEN_DATA_DIR=../shared/data/mnist python simulations/probe_quality.py \\
        configs/mnist_gan.yaml --set federation.rounds=5 --clients 3 --downstream

Every run prints one line (settings, sigma, epsilon, wall time, quality) and appends it
as JSON to `--log` (default runs/probe_quality.jsonl, which git ignores).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedgen.config import FedgenConfig, load_config
from fedgen.data import NUM_CLASSES, federated_partitions, load_dataset
from fedgen.embedding import pool_releases
from fedgen.evaluation import Evaluator
from fedgen.models import build_model
from fedgen.privacy import ClientPrivacyState
from fedgen.rounds import client_round, client_seed, plan_privacy

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Using a non-full backward hook")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

State = dict[str, torch.Tensor]


def fedavg(states: list[State], weights: list[int]) -> State:
    """Weighted mean of the clients' state_dicts (FedAvg); integer buffers from the first."""
    total = float(sum(weights))
    out: State = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
    return out


def ema_update(ema: State | None, state: State, decay: float) -> State:
    """Server-side EMA of the generator's weights after each round: post-processing of the
    aggregated (already private) weights, so it costs no privacy."""
    if ema is None or decay <= 0:
        return {k: v.clone() for k, v in state.items()}
    out = dict(state)  # the discriminator is never averaged over time
    for k, v in state.items():
        if k.startswith("generator.") and v.is_floating_point():
            out[k] = decay * ema[k] + (1 - decay) * v
    return out


def measure(cfg: FedgenConfig, evaluator: Evaluator, state: State, downstream: bool) -> dict:
    model = build_model(cfg.model, NUM_CLASSES)
    model.load_state_dict(state)
    q = evaluator.quality(model, downstream)
    keys = ("label_consistency", "frechet_distance", "downstream_accuracy")
    return {k: q[k] for k in keys if k in q}


def _samples(cfg: FedgenConfig, rnd: int) -> bool:
    """Whether the model can draw samples after round `rnd` (a VQ-VAE once its prior
    trains)."""
    return cfg.model.type != "vqvae" or cfg.stage(rnd) == "prior"


def _dp_trained_parameters(cfg: FedgenConfig) -> int:
    """Parameters DP-SGD trains: the GAN's discriminator (none for `mmd`, whose only
    private step is its release)."""
    if cfg.model.type != "gan":
        return 0
    disc = build_model(cfg.model, NUM_CLASSES).discriminator
    return sum(p.numel() for p in disc.parameters() if p.requires_grad)


def run_probe(cfg: FedgenConfig, args: argparse.Namespace) -> dict[str, Any]:
    clients = args.clients or cfg.federation.num_clients
    data = load_dataset(cfg.data, "train", seed=cfg.seed)
    # Split as the federation would for `num_clients`, train the first `clients` of them.
    parts = federated_partitions(cfg, data.labels, cfg.federation.num_clients)[:clients]
    shards = [data.subset(p) for p in parts]
    plans: list[ClientPrivacyState] = [plan_privacy(cfg, len(s)) for s in shards]
    evaluator = Evaluator(cfg, log=None)
    _ = evaluator.evaluator  # train or load the evaluator CNN before the clock starts
    global_state = build_model(cfg.model, NUM_CLASSES, seed=cfg.seed).state_dict()
    if args.init:  # e.g. a VQ-VAE saved after its autoencoder rounds, to probe priors on
        saved = torch.load(args.init)  # entries of another shape (a new prior) start fresh
        global_state |= {
            k: v for k, v in saved.items() if k in global_state and v.shape == global_state[k].shape
        }
    ema: State | None = None
    epsilons = [0.0] * len(shards)
    curve: list[dict] = []
    train_seconds = 0.0
    kept: list[dict[str, torch.Tensor]] = [{} for _ in shards]  # each client's optimizer
    # `federation.pooled_target` (`mmd`): the server's sum of every release so far.
    pooled: tuple[torch.Tensor, int] | None = None
    # A VQ-VAE's prior rounds follow its autoencoder rounds; --to-round stops early (e.g.
    # after the autoencoder) with the noise still planned for every round of the config.
    last = args.to_round or cfg.total_rounds
    for rnd in range(args.from_round, last + 1):
        started = time.perf_counter()
        states, sizes, releases = [], [], []
        for i, shard in enumerate(shards):
            seed = client_seed(cfg.seed, i, rnd)
            result, plans[i] = client_round(
                cfg,
                global_state,
                shard,
                plans[i],
                seed,
                server_round=rnd,
                optimizer_state=kept[i],
                pooled=pooled,
            )
            kept[i] = result.optimizer_state
            if cfg.federation.pooled_target and result.release is not None:
                releases.append(result.release)
            states.append(result.state_dict)
            # The product's own figure (its accountant and neighbouring relation).
            epsilons[i] = float(result.metrics.get("epsilon", 0.0))
            sizes.append(len(shard))
        global_state = fedavg(states, sizes)
        pooled = pool_releases(pooled, releases)
        ema = ema_update(ema, global_state, args.ema)
        train_seconds += time.perf_counter() - started
        print(f"  round {rnd}/{last} ({cfg.stage(rnd)}): {train_seconds:.1f} s of training "
              "so far", flush=True)  # fmt: skip
        if args.eval_every and rnd % args.eval_every == 0 and rnd < last and _samples(cfg, rnd):
            point = {"round": rnd, "seconds": round(train_seconds, 1)}
            point |= measure(cfg, evaluator, ema if args.ema > 0 else global_state, False)
            curve.append(point)
            print(f"  round {rnd}: {json.dumps(point)}", flush=True)
    started = time.perf_counter()
    final = (  # nothing to measure after a VQ-VAE's autoencoder rounds alone
        measure(cfg, evaluator, ema if args.ema > 0 else global_state, args.downstream)
        if _samples(cfg, last)
        else {}
    )
    eval_seconds = time.perf_counter() - started
    if args.ema > 0 and final:  # the raw (non-EMA) weights too, to see what the EMA buys
        final["raw_label_consistency"] = measure(cfg, evaluator, global_state, False)[
            "label_consistency"
        ]
    eps = max(epsilons) if cfg.privacy.enabled else None
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(ema if args.ema > 0 else global_state, args.save)
        model = build_model(cfg.model, NUM_CLASSES)
        model.load_state_dict(ema if args.ema > 0 else global_state)
        evaluator.samples(model, Path(args.save).with_suffix(".png"))
    return {
        "tag": args.tag,
        "overrides": args.set,
        "clients": clients,
        "client_examples": len(shards[0]),
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.training.local_steps,
        "batch_size": cfg.training.batch_size,
        "sigma": round(plans[0].noise_multiplier, 4),
        "sample_rate": round(plans[0].sample_rate, 5),
        "epsilon": None if eps is None else round(eps, 3),
        "d_params": _dp_trained_parameters(cfg),
        "ema": args.ema,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        **{k: round(v, 4) for k, v in final.items()},
        "curve": curve,
    }


def log_row(row: dict[str, Any], overrides: list[str], log: str) -> None:
    """Append the row to the JSON log and print its one-line summary."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    ds = row.get("downstream_accuracy")
    lc, fd = row.get("label_consistency"), row.get("frechet_distance")
    quality = "no samples" if lc is None else f"LC {lc:.3f} FD {fd:.1f}"
    print(
        f"[probe] {row['tag'] or '-'} | {' '.join(overrides) or 'defaults'} | clients "
        f"{row['clients']}x{row['client_examples']} rounds {row['rounds']}x{row['local_steps']} "
        f"batch {row['batch_size']} sigma {row['sigma']} eps {row['epsilon']} "
        f"D-params {row['d_params']} | train {row['train_seconds']}s eval "
        f"{row['eval_seconds']}s | {quality}" + ("" if ds is None else f" DS {ds:.3f}"),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: the quickstart)")
    parser.add_argument("--set", action="append", default=[], help="key.sub=value override")
    parser.add_argument("--clients", type=int, help="clients to train (default: all)")
    parser.add_argument("--eval-every", type=int, default=0, help="rounds between curve points")
    parser.add_argument("--ema", type=float, default=0.0, help="server EMA decay of G (0: off)")
    parser.add_argument("--downstream", action="store_true", help="measure downstream accuracy")
    parser.add_argument("--tag", default="", help="a name for this try in the log")
    parser.add_argument("--init", help="start from this saved state_dict (from --save)")
    parser.add_argument("--from-round", type=int, default=1,
                        help="first round to run (with --init: e.g. a VQ-VAE's first prior round)")  # fmt: skip
    parser.add_argument("--to-round", type=int, default=0,
                        help="last round to run (default: the config's last)")  # fmt: skip
    parser.add_argument("--save", help="write the final state_dict here (and a .png grid)")
    parser.add_argument("--log", default="runs/probe_quality.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    log_row(run_probe(cfg, args), args.set, args.log)


if __name__ == "__main__":
    main()
