"""`fedgen` command line: simulate, report, sample, evaluate, certs, config-reference."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fedgen.config import (
    ConfigError,
    FedgenConfig,
    config_reference_markdown,
    load_config,
    resumable_config,
)
from fedgen.data import DataError
from fedgen.reports import (
    CheckpointError,
    RunDir,
    format_privacy_table,
    load_privacy_report,
    write_atomic,
)
from fedgen.rounds import preflight


def _simulate(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out:
            raise ValueError("--resume continues the run in its own directory; drop --out")
        requested = None
        if args.config or args.set:
            # --set alone applies to the run's own config, not the quickstart.
            requested = load_config(args.config or Path(args.resume) / "config.yaml", args.set)
        cfg = resumable_config(args.resume, requested)
    else:
        cfg = load_config(args.config, args.set)
    sizes, plan, notices = preflight(cfg)  # fail here, before Ray starts, on bad data or budgets
    for notice in notices:
        print(f"[fedgen] WARNING: {notice}", file=sys.stderr)
    if args.resume:
        run_dir = RunDir(Path(args.resume).resolve())
        write_atomic(run_dir.path / "config.yaml", cfg.to_yaml())
    else:
        run_dir = RunDir.create(cfg, args.out)
    source = args.config or "built-in quickstart (glyphs)"
    print(f"[fedgen] config: {source}")
    print(
        f"[fedgen] {cfg.data.dataset}: {len(sizes)} clients ({cfg.federation.partition}), "
        f"{min(sizes)}-{max(sizes)} examples each; {cfg.total_rounds} rounds"
        + (
            f" ({cfg.federation.prior_rounds} of them the prior's)"
            if cfg.federation.prior_rounds
            else ""
        )
        + f", {cfg.planned_steps} DP steps planned per client"
    )
    if cfg.privacy.enabled:
        print(
            f"[fedgen] privacy: target epsilon {cfg.privacy.target_epsilon:g} at delta "
            f"{cfg.privacy.delta:g} ({cfg.privacy.accountant}); noise multiplier "
            f"{plan.noise_multiplier:.3f} for the smallest client"
        )
    else:
        print("[fedgen] privacy: DISABLED (non-private baseline)")
    print(f"[fedgen] run directory: {run_dir.path}", flush=True)
    # The Flower adapters are imported here, not at the top: the library itself does not
    # depend on Flower, only this command does.
    from server.simulation import simulate

    # A finished run has nothing left to train: say so without starting Ray.
    if not (args.resume and run_dir.finish_if_done(cfg, run_dir.resume_point()[0])):
        simulate(cfg, run_dir, resume=bool(args.resume))
    report = load_privacy_report(run_dir.path)
    print()
    print(format_privacy_table(report))
    print()
    if report["private"]:
        print(
            f"[fedgen] final epsilon: {report['max_epsilon']:.4f} (max over clients, delta "
            f"{report['delta']:g}, {report['accountant']} accountant)"
        )
    else:
        print("[fedgen] final epsilon: none (privacy disabled)")
    print(f"[fedgen] run directory: {run_dir.path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    if path.is_file() and path.suffix == ".json" or (path.is_dir() and _is_ledger_dir(path)):
        return _report_ledgers(path)
    report = load_privacy_report(path)
    print(format_privacy_table(report))
    return 0


def _is_ledger_dir(path: Path) -> bool:
    return not (path / "privacy_report.json").exists() and any(path.glob("*.json"))


def _report_ledgers(path: Path) -> int:
    """A device's own view: what each run, and all of them together, spent."""
    from fedgen.ledger import format_ledger

    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    for file in files:
        print(format_ledger(file))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedgen.certs import make_certificates

    files = make_certificates(args.dir, args.host or None, args.supernodes, args.overwrite)
    print(f"[fedgen] CA certificate      {files.ca_cert}  (give to every SuperNode and flwr)")
    print(f"[fedgen] SuperLink cert/key  {files.server_cert}, {files.server_key}")
    for private, public in files.supernode_keys:
        print(f"[fedgen] SuperNode key pair  {private} (stays on the device), {public}")
    print(f"[fedgen] keep {files.ca_key} offline: whoever holds it can impersonate the SuperLink")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from fedgen.evaluation import class_grid_labels
    from fedgen.models import build_model
    from fedgen.reports import save_image_grid

    run, cfg = _load_run(args.run_dir)
    if cfg.model.type == "vqvae" and cfg.federation.prior_rounds == 0:
        raise ValueError(
            "this VQ-VAE run trained no code prior (federation.prior_rounds=0), so it can "
            "reconstruct but not generate; run with federation.prior_rounds >= 1"
        )
    round_, state = run.checkpoint(args.checkpoint)
    if cfg.model.type == "vqvae" and round_ <= cfg.federation.rounds:
        raise ValueError(
            f"checkpoint of round {round_} predates the prior's rounds "
            f"({cfg.federation.rounds + 1}..{cfg.total_rounds}); pick a later one"
        )
    if args.n < 1:
        raise ValueError(f"--n {args.n}: ask for at least one sample")
    if args.label is not None and not 0 <= args.label < 10:
        raise ValueError(f"--label {args.label} is not a class; use 0..9")
    model = build_model(cfg.model)
    model.load_state_dict(state)
    if args.label is None:
        per_class, rows = max(1, -(-args.n // 10)), 10
    else:
        per_class, rows = args.n, max(1, math.isqrt(args.n))
    labels = class_grid_labels(per_class, args.label)
    gen = torch.Generator().manual_seed(args.seed)
    images = model.sample(labels, generator=gen)
    save_image_grid(images, rows, Path(args.out))
    what = "one row per class" if args.label is None else f"class {args.label}"
    print(f"[fedgen] {len(labels)} samples ({what}) from round {round_} -> {args.out}")
    return 0


def _load_run(path: str, overrides: list[str] | None = None) -> tuple[RunDir, FedgenConfig]:
    run = RunDir(path)
    cfg_path = run.path / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist: is {run.path} a fedgen run directory?")
    return run, load_config(cfg_path, overrides)


def _evaluate(args: argparse.Namespace) -> int:
    import platform
    import time
    from datetime import datetime

    import torch

    from fedgen.evaluation import Evaluator
    from fedgen.models import build_model
    from fedgen.reports import format_evaluation_table, write_atomic

    run, cfg = _load_run(args.run_dir, args.set)
    round_, state = run.checkpoint(args.checkpoint)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    evaluator = Evaluator(cfg)
    downstream = cfg.evaluation.downstream != "never"
    generates = cfg.stage(round_) != "vqvae"
    print(
        f"[fedgen] evaluating round {round_} of {run.path} ({cfg.model.type}, "
        f"{cfg.evaluation.samples} samples for the Frechet distance"
        + (", downstream accuracy" if downstream and generates else "")
        + ")",
        flush=True,
    )
    started = time.perf_counter()
    # The VQ-VAE's reconstructions are measured on the whole test split here.
    recon = evaluator.real_test[0] if cfg.model.type == "vqvae" else None
    metrics = evaluator.evaluate(model, round_, run.path / "evaluation", downstream, recon)
    privacy: dict = {"private": cfg.privacy.enabled}
    report_path = run.path / "privacy_report.json"
    if cfg.privacy.enabled and report_path.is_file():
        report = load_privacy_report(run.path)
        spent = [r for r in report["rounds"] if r["round"] <= round_]
        privacy |= {
            "max_epsilon": max(spent[-1]["epsilon"].values()) if spent else 0.0,
            "delta": report["delta"],
            "accountant": report["accountant"],
            "target_epsilon": report["target_epsilon"],
        }
    result = {
        "run_dir": str(run.path),
        "round": round_,
        "stage": cfg.stage(round_),
        "model": cfg.model.type,
        "dataset": cfg.data.dataset,
        "clients": cfg.federation.num_clients,
        "partition": cfg.federation.partition,
        "dirichlet_alpha": (
            cfg.federation.dirichlet_alpha if cfg.federation.partition == "dirichlet" else None
        ),
        "rounds": cfg.total_rounds,
        "privacy": privacy,
        "metrics": metrics,
        "evaluation_settings": cfg.evaluation.model_dump(mode="json"),
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    out = Path(args.out) if args.out else run.path / "evaluation.json"
    write_atomic(out, json.dumps(result, indent=2))
    print()
    print(format_evaluation_table(result))
    print(f"\n[fedgen] wrote {out}")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    text = config_reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation (Flower + Ray)")
    sim.add_argument("config", nargs="?", help="YAML experiment (default: built-in quickstart)")
    sim.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    sim.add_argument("--out", help="run directory (default: run.out_dir/NAME-TIMESTAMP)")
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last intact round (its own config; --set may "
        "change only settings that keep it sound, e.g. run.*, evaluation.*, device)",
    )
    sim.set_defaults(func=_simulate)

    rep = sub.add_parser(
        "report",
        help="print the epsilon report of a run, or a device's privacy ledger (file or folder)",
    )
    rep.add_argument("run_dir", metavar="PATH")
    rep.set_defaults(func=_report)

    smp = sub.add_parser("sample", help="generate a class-conditional grid from a run")
    smp.add_argument("run_dir")
    smp.add_argument(
        "--n",
        type=int,
        default=64,
        help="samples; without --label, ceil(n/10) per class, one row per class (default 64)",
    )
    smp.add_argument("--out", default="samples.png", help="PNG to write")
    smp.add_argument("--label", type=int, help="only this class (default: one row per class)")
    smp.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    smp.set_defaults(func=_sample)

    ev = sub.add_parser(
        "evaluate",
        help="measure sample quality of a run (Frechet distance, label consistency, "
        "downstream accuracy) and write evaluation.json",
    )
    ev.add_argument("run_dir")
    ev.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the run's config (e.g. evaluation.downstream_epochs=5)",
    )
    ev.add_argument("--out", help="JSON to write (default: RUN_DIR/evaluation.json)")
    ev.set_defaults(func=_evaluate)

    crt = sub.add_parser(
        "certs",
        help="make a CA, a SuperLink TLS certificate and SuperNode key pairs for trying out "
        "a deployment (production: bring your own)",
    )
    crt.add_argument("dir", help="folder to write them into")
    crt.add_argument(
        "--host",
        action="append",
        default=[],
        help="name or IP address the SuperLink is reached at (repeatable; "
        "default localhost, 127.0.0.1, ::1)",
    )
    crt.add_argument(
        "--supernodes", type=int, default=0, help="SuperNode authentication key pairs to make"
    )
    crt.add_argument("--overwrite", action="store_true", help="replace files already there")
    crt.set_defaults(func=_certs)

    ref = sub.add_parser("config-reference", help="print the reference of every config key")
    ref.add_argument("--out", help="write to this file instead of stdout")
    ref.set_defaults(func=_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (
        ConfigError,
        DataError,
        CheckpointError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    ) as err:
        print(f"fedgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
