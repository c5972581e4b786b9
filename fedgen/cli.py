"""`fedgen` command line.

Only the standard library is imported at the top: torch, opacus, Flower and matplotlib are
imported inside the commands that use them, so `fedgen --help` and `fedgen --version`
answer at once."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedgen.config import FedgenConfig
    from fedgen.reports import RunDir


def _simulate(args: argparse.Namespace) -> int:
    from fedgen.config import load_config, load_run_config, resumable_config
    from fedgen.console import RunConsole, plural
    from fedgen.files import write_atomic
    from fedgen.privacy_report import format_privacy_table, load_privacy_report
    from fedgen.reports import RunDir
    from fedgen.rounds import finish_committed_round, preflight

    if args.resume:
        if args.out:
            raise ValueError("--resume continues the run in its own directory; drop --out")
        requested = None
        if args.config or args.set:
            # --set alone applies to the run's own config, not the quickstart.
            requested = (
                load_config(args.config, args.set)
                if args.config
                else load_run_config(args.resume, args.set)
            )
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
    source = args.config or "built-in quickstart" + (
        f", with {', '.join(s.split('=', 1)[0] for s in args.set)} set" if args.set else " (glyphs)"
    )
    fed = cfg.federation
    print(f"[fedgen] config: {source}")
    sampled = fed.clients_per_round
    print(
        f"[fedgen] {cfg.data.dataset}: {plural(len(sizes), 'client')} ({fed.partition}), "
        f"{min(sizes)}-{max(sizes)} examples each"
        + (
            f", {sampled} {'taking turns' if fed.sampling == 'rotation' else 'sampled'} per round"
            if sampled < len(sizes)
            else ""
        )
        + f"; {plural(cfg.total_rounds, 'round')}"
        + (f" ({fed.prior_rounds} of them the prior's)" if fed.prior_rounds else "")
        + (
            f", {plural(cfg.planned_steps, 'release')} planned per client (1 per round"
            f"{' it is trained in' if cfg.planned_steps < cfg.total_rounds else ''}, then "
            f"{cfg.training.local_steps} generator steps that read no data"
            if cfg.model.type == "mmd"
            else f", {plural(cfg.planned_steps, 'DP step')} planned per client "
            f"({cfg.training.local_steps} per round"
        )
        + (
            f", {cfg.local_steps_for('prior')} per prior round)"
            if fed.prior_rounds and cfg.local_steps_for("prior") != cfg.training.local_steps
            else ")"
        )
    )
    if cfg.privacy.enabled:
        print(
            f"[fedgen] privacy: target epsilon {cfg.privacy.target_epsilon:g} at delta "
            f"{cfg.privacy.delta:g} ({cfg.privacy.accountant}); noise multiplier "
            f"{plan.noise_multiplier:.3f} for the smallest client"
        )
    else:
        print("[fedgen] privacy: DISABLED (non-private baseline)")
    print(f"[fedgen] run directory: {run_dir.path}")
    log_path = run_dir.path / "simulation.log"
    print(
        f"[fedgen] Flower's and Ray's log: {log_path}"
        + ("" if args.verbose else " (--verbose shows it here too)"),
        flush=True,
    )
    failure: Exception | None = None
    with RunConsole(log_path, cfg.total_rounds, verbose=args.verbose) as console:
        # Imported here, not at the top: the library does not depend on Flower, only this
        # command does; and inside the console, so what Flower and Ray print goes to the log.
        from server.simulation import simulate

        # A finished run has nothing left to train: say so without starting Ray (a stop
        # in its last round may have left that round's report or metrics to write).
        if not (args.resume and run_dir.finish_if_done(cfg, finish_committed_round(cfg, run_dir))):
            try:
                simulate(cfg, run_dir, resume=bool(args.resume), progress=console)
            except KeyboardInterrupt:
                console.say(
                    f"[fedgen] interrupted; `fedgen simulate --resume {run_dir.path}` continues "
                    "from the last completed round"
                )
                raise
            except Exception as err:
                console.log_exception(err)
                failure = err
    if failure is not None:
        raise RunFailed(
            f"the simulation stopped: {failure}. The traceback and Flower's and Ray's account "
            f"are in {log_path}; {run_dir.path} holds what was written"
        ) from failure
    report = load_privacy_report(run_dir.path)
    print()
    print(format_privacy_table(report, max_rows=SUMMARY_ROWS))
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


SUMMARY_ROWS = 20  # clients in simulate's closing table; `fedgen report` lists all


class RunFailed(RuntimeError):
    """A simulation that started and did not complete: one line on the console (exit code
    1), the details in its log."""


def _report(args: argparse.Namespace) -> int:
    from fedgen.privacy_report import format_privacy_table, load_privacy_report

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


def _verify(args: argparse.Namespace) -> int:
    from fedgen.verify import format_verification, verify_path

    result = verify_path(args.path, args.ledgers)
    print(json.dumps(result, indent=2) if args.json else format_verification(result))
    return 0 if result["passed"] else 1


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
    from fedgen.plots import save_image_grid

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
    from fedgen.config import load_run_config
    from fedgen.reports import RunDir

    run = RunDir(path)
    return run, load_run_config(run.path, overrides)


def _evaluate(args: argparse.Namespace) -> int:
    import platform
    import time
    from datetime import datetime

    import torch

    from fedgen.evaluation import Evaluator, format_evaluation_table
    from fedgen.files import write_atomic
    from fedgen.models import build_model
    from fedgen.privacy_report import load_privacy_report

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


def _explain(args: argparse.Namespace) -> int:
    from fedgen.explain import ExplainSettings, explain_model
    from fedgen.models import build_model

    run, cfg = _load_run(args.run_dir, args.set)
    round_, state = run.checkpoint(args.checkpoint)
    if cfg.model.type == "vqvae" and round_ <= cfg.federation.rounds:
        raise ValueError(
            f"checkpoint of round {round_} predates the prior's rounds, so the prior is "
            "untrained and there are no codes to explain; "
            + (
                f"pick one of rounds {cfg.federation.rounds + 1}..{cfg.total_rounds}"
                if cfg.federation.prior_rounds
                else "run with federation.prior_rounds >= 1"
            )
        )
    settings = ExplainSettings(columns=args.columns, label=args.label, seed=args.seed)
    settings.check()  # before the evaluator is loaded or trained
    model = build_model(cfg.model)
    model.load_state_dict(state)
    evaluator = None
    if not args.no_evaluator:
        from fedgen.data import DataError
        from fedgen.evaluation import Evaluator

        # The evaluation side's classifier, cached; trained on its own copy of the data
        # the first time (fedgen evaluate uses the same one).
        try:
            evaluator, _ = Evaluator(cfg).evaluator
        except DataError as err:
            raise DataError(f"{err} (the evaluator needs it; or pass --no-evaluator)") from None
    out = Path(args.out) if args.out else run.path / "explain"
    print(f"[fedgen] explaining round {round_} of {run.path} ({cfg.model.type})", flush=True)
    index = explain_model(
        model,
        cfg.model.type,
        round_,
        out,
        settings,
        cfg.data.dataset,
        evaluator,
        {"run_dir": str(run.path)},
    )
    for figure in index["figures"]:
        print(f"[fedgen]   {figure['file']:<30} {figure['title']}")
    print(f"[fedgen] {index['privacy']}")
    print(f"[fedgen] wrote {len(index['figures'])} figures and explain.json to {out}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedgen.audit import (
        AUDIT_FAILED,
        AuditSettings,
        audit_device,
        audit_run,
        compare_runs,
        format_audit,
    )

    settings = AuditSettings(
        generated_per_class=args.generated_per_class,
        reference_per_class=args.reference_per_class,
        mia_examples=args.mia_examples,
        reference_steps=args.reference_steps,
        client=args.client,
        seed=args.seed,
    )
    device_args = {"--weights": args.weights, "--config": args.config, "--data": args.data,
                   "--heldout": args.heldout}  # fmt: skip
    if any(device_args.values()):
        if args.run_dir or args.compare:
            raise ValueError("give either RUN_DIR or --weights/--config/--data/--heldout, not both")
        missing = [flag for flag, value in device_args.items() if not value]
        if missing:
            raise ValueError(
                f"a device's own audit needs {', '.join(missing)} too: the released weights, "
                "the run's config.yaml, the device's data and real images it never trained on"
            )
        out = Path(args.out or "audit")
        print(f"[fedgen] auditing {args.weights} against {args.data} (this device's data)")
        result = audit_device(args.weights, args.config, args.data, args.heldout, out, settings)
    else:
        if not args.run_dir:
            raise ValueError(
                "give a run directory (fedgen audit RUN_DIR), or audit on a device with "
                "--weights, --config, --data and --heldout"
            )
        if args.out:
            raise ValueError("--out is for a device's audit; a run's goes to RUN_DIR/audit")
        print(f"[fedgen] auditing {args.run_dir}", flush=True)
        result = audit_run(args.run_dir, settings, args.checkpoint, args.set)
        out = Path(result["run_dir"]) / "audit"
        if args.compare:
            print(f"[fedgen] auditing {args.compare} to compare", flush=True)
            compare_runs(result, audit_run(args.compare, settings, None, args.set))
    print()
    print(format_audit(result))
    print(f"\n[fedgen] wrote {out / 'audit.json'} and {len(result['figures'])} figures")
    return AUDIT_FAILED if result["verdict"] != "consistent" else 0


def _card(args: argparse.Namespace) -> int:
    from fedgen.card import write_card

    path, card = write_card(
        args.run_dir, args.out, args.ledgers, not args.no_training_images, args.run_missing
    )
    verdict = card["verification"]["verdict"]
    not_run = [k for k in ("quality", "leakage", "explanations") if card[k]["status"] != "done"]
    print(
        f"[fedgen] wrote {path} (verification {verdict}"
        + (f"; not run: {', '.join(not_run)}, see the card or use --run-missing" if not_run else "")
        + ")"
    )
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from fedgen.config import config_reference_markdown

    text = config_reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has one worth showing (not None, False or an
    empty list), and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Version(argparse.Action):
    """`--version`: the installed package's version, read only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib import metadata

        try:
            version = metadata.version("fedgen")
        except metadata.PackageNotFoundError:  # run from a source tree that is not installed
            from fedgen import __version__ as version
        print(f"fedgen {version}")
        parser.exit()


def add_command(
    sub: Any, name: str, summary: str, examples: list[str], handler: Any
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows defaults and ends with `examples`."""
    cmd = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=_HelpFormatter,
    )
    cmd.set_defaults(func=handler)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgen",
        description="Federated, differentially private training of image generators "
        "(Flower + Opacus), and the reports that go with it.",
        epilog="Run 'fedgen COMMAND --help' for a command's options and examples.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print fedgen's version and exit")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of these commands"
    )

    sim = add_command(
        sub,
        "simulate",
        "run a simulated federation (Flower + Ray) on this machine",
        [
            "fedgen simulate --out runs/quickstart",
            "fedgen simulate configs/mnist_gan.yaml --set data.root=../shared/data/mnist",
            "fedgen simulate --resume runs/quickstart",
        ],
        _simulate,
    )
    sim.add_argument(
        "config",
        nargs="?",
        help="YAML experiment, e.g. configs/mnist_gan.yaml (default: the built-in quickstart "
        "on drawn glyphs, nothing to download)",
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. training.local_steps=10 (repeatable; every key is "
        "in docs/CONFIG.md)",
    )
    sim.add_argument(
        "--out", help="run directory, exactly (default: run.out_dir/run.name-TIMESTAMP)"
    )
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last intact round (its own config; --set may "
        "change only settings that keep it sound, e.g. run.*, evaluation.*, device)",
    )
    sim.add_argument(
        "--verbose",
        action="store_true",
        help="also show Flower's and Ray's log on the console (it always goes to "
        "RUN_DIR/simulation.log)",
    )

    rep = add_command(
        sub,
        "report",
        "print the epsilon report of a run, or a device's privacy ledger (file or folder)",
        ["fedgen report runs/quickstart", "fedgen report /var/lib/fedgen/ledgers"],
        _report,
    )
    rep.add_argument(
        "run_dir",
        metavar="PATH",
        help="a run directory (its privacy_report.json), or a device's ledger file or "
        "ledger folder (each run's and the lifetime epsilon)",
    )

    smp = add_command(
        sub,
        "sample",
        "generate a class-conditional grid of images from a run's released weights",
        [
            "fedgen sample runs/quickstart --n 20 --out grid.png",
            "fedgen sample runs/quickstart --label 3 --n 16 --out three.png",
        ],
        _sample,
    )
    smp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of fedgen simulate")
    smp.add_argument(
        "--n",
        type=int,
        default=64,
        help="how many images; without --label, ceil(n/10) per class, one row per class",
    )
    smp.add_argument("--out", default="samples.png", help="PNG file to write")
    smp.add_argument("--label", type=int, help="only this class, 0..9 (default: every class)")
    smp.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the latent noise")

    ev = add_command(
        sub,
        "evaluate",
        "measure the sample quality of a run (Frechet distance, label consistency, "
        "downstream accuracy) and write evaluation.json",
        [
            "fedgen evaluate runs/quickstart",
            "fedgen evaluate runs/quickstart --checkpoint 3 --out runs/quickstart/eval3.json",
        ],
        _evaluate,
    )
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of fedgen simulate")
    ev.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the run's config (e.g. evaluation.downstream_epochs=5)",
    )
    ev.add_argument("--out", help="JSON file to write (default: RUN_DIR/evaluation.json)")

    crt = add_command(
        sub,
        "certs",
        "make a CA, a SuperLink TLS certificate and SuperNode key pairs for trying out "
        "a deployment (production: bring your own)",
        ["fedgen certs certificates --supernodes 2 --host superlink.example.org"],
        _certs,
    )
    crt.add_argument("dir", metavar="DIR", help="folder to write them into")
    crt.add_argument(
        "--host",
        action="append",
        default=[],
        help="name or IP address the SuperLink is reached at (repeatable; "
        "default: localhost, 127.0.0.1, ::1)",
    )
    crt.add_argument(
        "--supernodes", type=int, default=0, help="SuperNode authentication key pairs to make"
    )
    crt.add_argument("--overwrite", action="store_true", help="replace files already there")

    ver = add_command(
        sub,
        "verify",
        "check a run's hash-chained audit log and every file it covers (checkpoints, "
        "privacy report, epsilons recomputed), or a device's ledger; exit 1 on any FAIL",
        [
            "fedgen verify runs/quickstart",
            "fedgen verify runs/quickstart --json",
            "fedgen verify /var/lib/fedgen/ledgers",
        ],
        _verify,
    )
    ver.add_argument(
        "path",
        metavar="PATH",
        help="a run directory, or a device's ledger folder or ledger file",
    )
    ver.add_argument(
        "--ledgers",
        metavar="DIR",
        help="devices' ledger folder to compare the run with (default: RUN_DIR/client-ledgers, "
        "where a simulation keeps them)",
    )
    ver.add_argument("--json", action="store_true", help="print the result as JSON")

    exp = add_command(
        sub,
        "explain",
        "draw what a run's released generator does (class grid, interpolations, latent "
        "directions or codebook, saliency) into RUN_DIR/explain; costs no privacy",
        [
            "fedgen explain runs/quickstart",
            "fedgen explain runs/mnist-vqvae --label 3 --out vq-explained",
        ],
        _explain,
    )
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of fedgen simulate")
    exp.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    exp.add_argument(
        "--out", help="folder for the PNGs and explain.json (default: RUN_DIR/explain)"
    )
    exp.add_argument(
        "--label", type=int, default=0, help="class of the per-class figures (traversal, prior)"
    )
    exp.add_argument(
        "--columns", type=int, default=8, help="latents in the class grid, samples shown per class"
    )
    exp.add_argument("--seed", type=int, default=0, help="seed of the latents and samples drawn")
    exp.add_argument(
        "--no-evaluator",
        action="store_true",
        help="skip the evaluator's saliency (it needs the evaluation side's data, data.*)",
    )
    exp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the run's config (e.g. data.root=... for the evaluator)",
    )

    aud = add_command(
        sub,
        "audit",
        "measure leakage from a run's released weights (memorisation, membership "
        "inference, canaries' lower bound on epsilon) into RUN_DIR/audit; exit 3 if the "
        "lower bound exceeds the accountant's epsilon",
        [
            "fedgen audit runs/mnist-dp",
            "fedgen audit runs/mnist-dp --compare runs/mnist-nodp",
            "fedgen audit --weights round_040.safetensors --config config.yaml "
            "--data my-images --heldout my-unused-images --out my-audit",
        ],
        _audit,
    )
    aud.add_argument(
        "run_dir", nargs="?", metavar="RUN_DIR", help="a run directory of fedgen simulate"
    )
    aud.add_argument(
        "--compare", metavar="OTHER_RUN_DIR", help="audit this run too and show both side by side"
    )
    aud.add_argument("--checkpoint", type=int, help="round to load (default: the latest)")
    aud.add_argument(
        "--client", type=int, default=0, help="the client whose examples are the members"
    )
    aud.add_argument(
        "--generated-per-class", type=int, default=50, help="generated images per class"
    )
    aud.add_argument(
        "--reference-per-class",
        type=int,
        default=300,
        help="training and held-out images per class the generated ones are compared with",
    )
    aud.add_argument(
        "--mia-examples", type=int, default=1000, help="members attacked (and as many non-members)"
    )
    aud.add_argument(
        "--reference-steps",
        type=int,
        default=300,
        help="training steps of the calibrated attack's reference model, at most the run's "
        "planned steps per client (0: no calibrated attack)",
    )
    aud.add_argument("--seed", type=int, default=0, help="seed of the audit's own draws")
    aud.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the run's config (e.g. data.root=...)",
    )
    dev = aud.add_argument_group("a data owner's audit on its own device (deployed runs)")
    dev.add_argument("--weights", metavar="CHECKPOINT", help="released weights (.safetensors)")
    dev.add_argument("--config", metavar="CONFIG", help="the run's config.yaml")
    dev.add_argument("--data", metavar="PATH", help="the device's training data")
    dev.add_argument("--heldout", metavar="PATH", help="real images the device never trained on")
    dev.add_argument("--out", metavar="DIR", help="folder for audit.json and PNGs (default: audit)")

    card = add_command(
        sub,
        "card",
        "write one self-contained HTML page about a run for a data owner or auditor: privacy "
        "promise, verification, quality, leakage and explanations (default RUN_DIR/card.html)",
        [
            "fedgen card runs/quickstart",
            "fedgen card runs/mnist-dp --run-missing --out mnist-dp-card.html",
        ],
        _card,
    )
    card.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of fedgen simulate")
    card.add_argument("--out", metavar="FILE", help="where to write the page")
    card.add_argument(
        "--run-missing",
        action="store_true",
        help="run fedgen evaluate, explain and audit first where their output is missing "
        "(verify always runs)",
    )
    card.add_argument(
        "--no-training-images",
        action="store_true",
        help="leave out the audit figures that show training images (the closest pairs)",
    )
    card.add_argument(
        "--ledgers",
        metavar="DIR",
        help="devices' ledger folder (default: RUN_DIR/client-ledgers, where a simulation "
        "keeps them)",
    )

    ref = add_command(
        sub,
        "config-reference",
        "print the reference of every config key (docs/CONFIG.md)",
        ["fedgen config-reference --out docs/CONFIG.md"],
        _config_reference,
    )
    ref.add_argument("--out", help="write to this file instead of stdout")
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input or a bad run directory: one line, exit code 2. Imported
    only when something failed, so the commands that need none of them stay light."""
    from fedgen.config import ConfigError
    from fedgen.data import DataError
    from fedgen.files import CheckpointError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    )


def _exit_if_threads_linger(code: int) -> None:
    """Exit now if threads other than this one would keep the process alive. An
    interrupted Flower simulation leaves its ServerApp thread and its executor's workers
    waiting for each other, so a normal exit would wait for ever. The run directory is
    safe to stop at any point (`--resume` continues it), as after a crash."""
    import logging
    import os
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("fedgen: interrupted", file=sys.stderr)
        _exit_if_threads_linger(130)
        return 130
    except RunFailed as err:
        print(f"fedgen: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"fedgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
