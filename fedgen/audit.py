"""`fedgen audit`: leakage measured on a run's released weights, written to
`RUN_DIR/audit/audit.json` with a PNG per plot.

Three checks (their meaning, and what they do not mean, in docs/PRIVACY.md, "Measuring
leakage"):
1. memorisation (`fedgen.leakage.memorisation`): generated images against the training
   images and held-out real images;
2. membership inference (`fedgen.leakage.membership_inference`): one client's training
   examples against real examples no client saw;
3. canaries (`fedgen.canaries`): an empirical lower bound on epsilon from the run's
   audit canaries, next to the accountant's upper bound; a lower bound above the upper
   bound is a bug, and the audit fails (exit code 3).

Which data plays which part. In a simulation every client's partition is a function of
the config (`fedgen.data.federated_partitions`), so the audit rebuilds it: *training
images* are the training split the clients shared out, *members* are the audited client's
own examples, and *unseen* real images are the training examples beyond
`data.num_examples` when there are any (same split as the members), else the test split.
The unseen images are cut in two at random: one half is the held-out set of the
memorisation check and the non-members of the attack, the other trains the reference
model of the calibrated attack, so the reference saw none of the scored examples.

A deployed run's directory holds no private data, so on the server these checks cannot
run: `audit.json` then says so and names the command a data owner runs on its own device,
`fedgen audit --weights CHECKPOINT --config CONFIG --data ITS_DATA --heldout UNSEEN`,
which runs checks 1 and 2 with the device's data as training images and members.
Canaries exist only in simulation.

The audit directory shows training images (the closest pairs): it is as private as the
data and stays with whoever may see the data.

audit.json (`format`: fedgen-audit-1) holds: the run, round, model family and whether
it was private; `accountant` (epsilon of every client and of the audited one, delta,
accountant, relation); `memorisation`, `membership_inference` and `canaries`, each with a
`status` (`done`, `skipped` or `needs-data`, with a `reason` unless done), its
`settings` and its figures; `figures` (file, title, caption of every PNG); `settings`;
`machine`, `date`, `seconds`; `verdict` (`consistent` or `LOWER BOUND ABOVE UPPER
BOUND`); and, with `--compare`, `compare` (the other run's summary).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedgen.canaries import CANARY_CLIENT, audit_guesses, read_canary_record
from fedgen.config import FedgenConfig, load_config, load_run_config
from fedgen.data import Dataset, federated_partitions, load_dataset, load_mnist, to_tensors
from fedgen.leakage import (
    MMD_SCORE_SAMPLES,
    REFERENCE_FAMILIES,
    MemorisationResult,
    Scorer,
    example_scorer,
    membership_inference,
    memorisation,
    roc_auc,
    train_reference,
)
from fedgen.models import build_model

__all__ = [
    "AUDIT_FORMAT",
    "AUDIT_FAILED",
    "AuditSettings",
    "audit_run",
    "audit_device",
    "compare_runs",
    "format_audit",
]

AUDIT_FORMAT = "fedgen-audit-1"
AUDIT_FAILED = 3  # exit code when the empirical lower bound exceeds the accountant's epsilon


@dataclass(frozen=True)
class AuditSettings:
    """Sizes of the audit (small enough for a CPU: about a minute on MNIST)."""

    generated_per_class: int = 50  # generated images per class (memorisation)
    reference_per_class: int = 300  # training and held-out images per class (each)
    mia_examples: int = 1000  # members, and as many non-members
    reference_steps: int = 300  # steps of the calibrated attack's reference model; 0: off
    client: int = CANARY_CLIENT  # whose examples are the members
    confidence: float = 0.95  # of the lower bound on epsilon
    seed: int = 0

    def check(self) -> None:
        for key in ("generated_per_class", "reference_per_class", "mia_examples"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
        if self.reference_steps < 0:
            raise ValueError("--reference-steps must be 0 (off) or more")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence {self.confidence} must lie strictly between 0 and 1")


# --------------------------------------------------------------------------- data


def _unseen(cfg: FedgenConfig) -> tuple[Dataset, str]:
    """Real images no simulated client trained on, and where they come from."""
    if cfg.data.dataset == "mnist" and cfg.data.num_examples is not None:
        full = load_mnist(cfg.data.root, "train", download=cfg.data.download)
        if len(full) > cfg.data.num_examples:
            rest = full.subset(np.arange(cfg.data.num_examples, len(full)))
            return rest, f"training split beyond data.num_examples={cfg.data.num_examples}"
    return load_dataset(cfg.data, "test", seed=cfg.seed), "test split"


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, 2]).choice(n, min(n, k), replace=False))


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return to_tensors(data)


def _can_generate(cfg: FedgenConfig, round_: int) -> bool:
    return cfg.model.type in ("gan", "mmd") or round_ > cfg.federation.rounds


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def _plot_ratios(results: list[tuple[str, MemorisationResult]], path: Path) -> None:
    plt = _pyplot()
    spaces = [s for s in ("pixel", "features") if s in results[0][1].ratios]
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.5 * len(spaces), 4), dpi=100, squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        top = max(2.0, max(float(np.quantile(r.ratios[space], 0.99)) for _, r in results))
        bins = np.linspace(0, top, 41)
        for name, result in results:
            share = result.summary[space]["share_closer_to_training"]
            ax.hist(
                np.clip(result.ratios[space], 0, top),
                bins=bins,
                alpha=0.55,
                label=f"{name}: closer to training {share:.0%}",
            )
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.axvline(1 / 3, color="red", linestyle=":", linewidth=1, label="near copy (< 1/3)")
        ax.set_xlabel("d(nearest training) / d(nearest held-out)")
        ax.set_ylabel("generated images")
        ax.set_title(f"{space} space")
        ax.legend(fontsize="small")
    fig.suptitle("Memorisation: below 1 = closer to a training image than to any held-out one")
    fig.tight_layout()
    _save(fig, path)


def _plot_pairs(
    generated: torch.Tensor,
    train_x: torch.Tensor,
    heldout_x: torch.Tensor,
    result: MemorisationResult,
    path: Path,
    count: int = 12,
) -> None:
    """The generated images nearest to a training image (searched in the whole training
    set), each with that image and its nearest held-out image."""
    plt = _pyplot()
    ratios = result.copy_distance / np.maximum(result.d_heldout["pixel"], 1e-12)
    picks = np.argsort(ratios, kind="stable")[:count]
    per_row = 4
    rows = math.ceil(len(picks) / per_row)
    fig, axes = plt.subplots(
        rows, 3 * per_row, figsize=(3.75 * per_row, 2.2 * rows), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for k, g in enumerate(picks):
        r, c = divmod(k, per_row)
        triple = (
            (generated[g], f"generated, ratio {ratios[g]:.2f}"),
            (train_x[result.copy_nearest[g]], "nearest training"),
            (heldout_x[result.nearest_heldout["pixel"][g]], "nearest held-out"),
        )
        for j, (image, title) in enumerate(triple):
            ax = axes[r][3 * c + j]
            ax.imshow(image[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=7)
    fig.suptitle(
        "Generated images closest to a training image (pixel space, whole training set): "
        "generated | nearest training | nearest held-out"
    )
    fig.tight_layout()
    _save(fig, path)


def _plot_roc(curves: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """`curves`: (run label, membership_inference summary per attack)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    styles = ["-", "--", ":", "-."]
    smallest = 1.0
    for i, (name, attacks) in enumerate(curves):
        for attack, summary in attacks.items():
            fpr, tpr = np.array(summary["roc"]["fpr"]), np.array(summary["roc"]["tpr"])
            smallest = min(smallest, float(fpr[0]))
            ax.step(
                fpr,
                np.maximum(tpr, 1e-4),
                where="post",
                linestyle=styles[i % len(styles)],
                label=f"{name} {attack.replace('_', ' ')} (AUC {summary['auc']:.3f})".strip(),
            )
    grid = np.geomspace(smallest, 1, 50)
    ax.plot(grid, grid, color="grey", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(smallest, 1)
    ax.set_ylim(1e-3, 1.05)
    ax.set_xlabel("false positive rate (non-members called members)")
    ax.set_ylabel("true positive rate (members found)")
    ax.set_title("Membership inference on the released weights")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _plot_canaries(scores: np.ndarray, included: np.ndarray, text: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 31)
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"included ({int(included.sum())})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"excluded ({int((~included).sum())})")
    ax.set_xlabel("score under the released weights (higher: guessed included)")
    ax.set_ylabel("canaries")
    ax.set_title(text, fontsize=9)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- checks


def _embedder(cfg: FedgenConfig) -> Any:
    """The evaluator's 128-d features (its cached classifier, as `fedgen evaluate` uses)."""
    from fedgen import quality
    from fedgen.evaluation import Evaluator

    classifier, _ = Evaluator(cfg).evaluator
    return lambda x: quality.features(classifier, x)


def _memorisation_check(
    model: nn.Module,
    cfg: FedgenConfig,
    round_: int,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    settings: AuditSettings,
    out: Path,
    embed: Any,
) -> tuple[dict[str, Any], MemorisationResult | None]:
    if not _can_generate(cfg, round_):
        return {
            "status": "skipped",
            "reason": f"round {round_} is before the VQ-VAE's prior rounds: this model cannot "
            f"generate yet (audit a checkpoint after round {cfg.federation.rounds})",
        }, None
    from fedgen import quality

    labels = torch.arange(10).repeat_interleave(settings.generated_per_class)
    generated = quality.generate(model, labels, settings.seed)
    result = memorisation(
        generated, labels, train, heldout, embed, settings.reference_per_class, settings.seed
    )
    _plot_ratios([("this run", result)], out / "memorisation_ratio.png")
    _plot_pairs(generated, train[0], heldout[0], result, out / "closest_pairs.png")
    summary = {
        "status": "done",
        **result.summary,
        "figures": {
            "ratio_histogram": "memorisation_ratio.png",
            "closest_pairs": "closest_pairs.png",
        },
    }
    return summary, result


SCORES = {
    "gan": "discriminator logit for (image, label)",
    "vqvae": "negative reconstruction error of the VQ-VAE",
    "mmd": "inner product of the example's kernel embedding with the mean embedding of "
    f"{MMD_SCORE_SAMPLES} generated images of its class",
}


def _membership_check(
    score: Scorer,
    cfg: FedgenConfig,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    reference_data: tuple[torch.Tensor, torch.Tensor],
    settings: AuditSettings,
    out: Path,
) -> dict[str, Any]:
    reference = None
    reference_note = "off (--reference-steps 0)"
    # No longer than one client of the run trained: the reference should mimic the run.
    steps = min(settings.reference_steps, cfg.planned_steps)
    if cfg.model.type not in REFERENCE_FAMILIES:
        reference_note = f"off: not defined for model.type={cfg.model.type}"
    elif steps and len(reference_data[1]) >= 2:
        reference = train_reference(cfg, *reference_data, steps, settings.seed)
        reference_note = (
            f"the run's architecture from its initial weights, trained without DP for "
            f"{steps} steps on {len(reference_data[1])} unseen real images "
            "(none of them scored); calibrated score = standardised score of the released "
            "model minus that of the reference"
        )
    elif settings.reference_steps:
        reference_note = "off: too few unseen images left to train a reference model"
    reference_score = example_scorer(reference) if reference is not None else None
    attacks, _ = membership_inference(score, members, non_members, reference_score)
    _plot_roc([("", attacks)], out / "mia_roc.png")
    strongest = max(attacks, key=lambda a: attacks[a]["auc"])
    return {
        "status": "done",
        "score": SCORES[cfg.model.type],
        "reference_model": reference_note,
        "attacks": attacks,
        "strongest": strongest,
        "figures": {"roc": "mia_roc.png"},
    }


def _accountant(run_path: Path, cfg: FedgenConfig) -> dict[str, Any]:
    from fedgen.privacy_report import load_privacy_report

    p = cfg.privacy
    info: dict[str, Any] = {
        "private": p.enabled,
        "delta": p.delta,
        "accountant": p.accountant,
        "neighboring": p.neighboring,
    }
    if not p.enabled:
        return info | {"max_epsilon": None, "client_epsilon": {}}
    report = load_privacy_report(run_path)
    eps = {cid: c.get("epsilon") for cid, c in report.get("clients", {}).items()}
    return info | {"max_epsilon": report.get("max_epsilon"), "client_epsilon": eps}


def _canary_check(
    score: Scorer,
    cfg: FedgenConfig,
    run_path: Path,
    accountant: dict[str, Any],
    settings: AuditSettings,
    out: Path,
) -> dict[str, Any]:
    if cfg.privacy.canaries == 0:
        return {
            "status": "skipped",
            "reason": "the run had no canaries; run it with --set privacy.canaries=M "
            "(e.g. 200) to get an empirical lower bound on epsilon",
        }
    canaries = read_canary_record(cfg, run_path)
    images, labels = to_tensors(
        Dataset(canaries.images, np.full(len(canaries), canaries.label, dtype=np.int64), "c")
    )
    scores = score(images, labels)
    guesses = audit_guesses(scores, canaries.included, cfg.privacy.delta, settings.confidence)
    upper = accountant["client_epsilon"].get(str(CANARY_CLIENT)) if cfg.privacy.enabled else None
    lower = guesses["epsilon_lower_bound"]
    consistent = upper is None or lower <= upper
    both = canaries.included.any() and (~canaries.included).any()
    auc = roc_auc(scores[canaries.included], scores[~canaries.included]) if both else None
    text = f"{len(canaries)} canaries: epsilon >= {lower:.3f} at {settings.confidence:.0%} " + (
        f"(accountant: {upper:.3f})" if upper is not None else "(no DP: no upper bound)"
    )
    _plot_canaries(scores, canaries.included, text, out / "canary_scores.png")
    return {
        "status": "done",
        "client": str(CANARY_CLIENT),
        **guesses,
        "score_auc_included_vs_excluded": auc,
        "epsilon_upper_bound": upper,
        "consistent": consistent,
        "method": "Steinke, Nasr and Jagielski, Privacy Auditing with One (1) Training Run "
        "(NeurIPS 2023): top-k scores guessed included, bottom-k excluded, the rest "
        "abstained; p-value of the correct count under (epsilon, delta)-DP inverted for "
        "epsilon; the largest bound over the guess counts, each at a Bonferroni level",
        "figures": {"scores": "canary_scores.png"},
    }


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


FIGURES = {
    "memorisation_ratio.png": (
        "Memorisation: distance ratio",
        "For each generated image, its distance to the nearest training image over the "
        "distance to the nearest held-out image of its class; below 1 means closer to "
        "training data.",
    ),
    "closest_pairs.png": (
        "Closest pairs",
        "The generated images most like a training image, each next to its nearest "
        "training and held-out image (contains training images).",
    ),
    "mia_roc.png": (
        "Membership inference ROC",
        "True against false positive rate of telling a client's training examples from "
        "unseen real ones with the released weights; the diagonal is chance.",
    ),
    "canary_scores.png": (
        "Canary scores",
        "Scores of included and excluded audit canaries under the released weights; the "
        "better separated, the larger the empirical lower bound on epsilon.",
    ),
    "compare_memorisation.png": (
        "Memorisation compared",
        "The distance-ratio histograms of this run and the compared run.",
    ),
    "compare_roc.png": (
        "Membership inference compared",
        "ROC curves of this run (solid) and the compared run (dashed).",
    ),
}


def _figure_index(out: Path) -> list[dict[str, str]]:
    return [
        {"file": name, "title": title, "caption": caption}
        for name, (title, caption) in FIGURES.items()
        if (out / name).is_file()
    ]


def _finish(result: dict[str, Any], out: Path, started: float) -> dict[str, Any]:
    from fedgen.files import write_atomic

    canary = result.get("canaries", {})
    result["verdict"] = (
        "LOWER BOUND ABOVE UPPER BOUND"
        if canary.get("status") == "done" and not canary["consistent"]
        else "consistent"
    )
    result["figures"] = _figure_index(out)
    result["machine"] = _machine()
    result["date"] = datetime.now().astimezone().isoformat(timespec="seconds")
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_atomic(out / "audit.json", json.dumps(result, indent=2))
    return result


def _audit_model(
    model: nn.Module,
    score: Scorer,
    cfg: FedgenConfig,
    round_: int,
    train: Dataset,
    members: Dataset,
    unseen: Dataset,
    settings: AuditSettings,
    out: Path,
    members_are: str,
) -> dict[str, Any]:
    """Checks 1 and 2 with the given roles of the data (shared by runs and devices)."""
    if len(unseen) < 4:
        raise ValueError(
            f"only {len(unseen)} unseen real images: the audit needs held-out images no "
            "client trained on (give more)"
        )
    heldout_idx, reference_idx = _halves(len(unseen), settings.seed)
    heldout = _tensors(unseen.subset(heldout_idx))
    k = min(len(members), len(heldout_idx), settings.mia_examples)
    member_set = _tensors(members.subset(_sample(len(members), k, settings.seed)))
    non_member_set = (heldout[0][:k], heldout[1][:k])
    # As many as the run trained on, at most: a reference that mimics the run's training.
    reference_set = _tensors(unseen.subset(reference_idx[: len(train)]))
    embed = _embedder(cfg) if _can_generate(cfg, round_) else None
    memo, _ = _memorisation_check(
        model, cfg, round_, _tensors(train), heldout, settings, out, embed
    )
    mia = _membership_check(score, cfg, member_set, non_member_set, reference_set, settings, out)
    memo["settings"] = {
        "generated_per_class": settings.generated_per_class,
        "reference_per_class": settings.reference_per_class,
        "distance": "Euclidean; pixel space: 784 pixels in [-1, 1]; feature space: the "
        "evaluator's 128-unit layer",
    }
    mia["settings"] = {
        "members": f"{k} examples of {members_are}",
        "non_members": f"{k} unseen real examples",
        "reference_steps": settings.reference_steps,
    }
    return {"memorisation": memo, "membership_inference": mia}


def audit_run(
    run_path: str | Path,
    settings: AuditSettings | None = None,
    checkpoint: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Audit a run directory; writes RUN_DIR/audit/audit.json and its PNGs and returns
    the result (its `verdict` says whether the bounds contradict each other)."""
    from fedgen.reports import RunDir

    settings = settings or AuditSettings()
    settings.check()
    started = time.perf_counter()
    run = RunDir(Path(run_path).resolve())
    cfg = load_run_config(run.path, overrides)
    round_, state = run.checkpoint(checkpoint)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    model.eval()
    out = run.path / "audit"
    out.mkdir(parents=True, exist_ok=True)
    accountant = _accountant(run.path, cfg)
    result: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "run_dir": str(run.path),
        "round": round_,
        "model": cfg.model.type,
        "dataset": cfg.data.dataset,
        "clients": cfg.federation.num_clients,
        "private": cfg.privacy.enabled,
        "accountant": accountant,
        "settings": asdict(settings),
        "contains_training_images": True,
    }
    simulated = any((run.path / "client-ledgers").glob("*.json"))
    if not simulated:
        why = (
            "a deployed run: the server holds no client's data. The data owner can run this "
            "check on its own device: fedgen audit --weights CHECKPOINT --config CONFIG "
            "--data ITS_DATA --heldout REAL_IMAGES_IT_NEVER_TRAINED_ON"
        )
        result |= {
            "deployed": True,
            "memorisation": {"status": "needs-data", "reason": why},
            "membership_inference": {"status": "needs-data", "reason": why},
            "canaries": {"status": "needs-data", "reason": "canaries exist in simulation only"},
        }
        return _finish(result, out, started)
    if not 0 <= settings.client < cfg.federation.num_clients:
        raise ValueError(
            f"--client {settings.client} is not a client of this run (0..{cfg.federation.num_clients - 1})"
        )
    train = load_dataset(cfg.data, "train", seed=cfg.seed)
    parts = federated_partitions(cfg, train.labels, cfg.federation.num_clients)
    members = train.subset(parts[settings.client])
    unseen, source = _unseen(cfg)
    result["deployed"] = False
    result["data"] = {
        "training_images": f"{len(train)} examples of the {cfg.data.dataset} training split the "
        "clients shared (canaries excluded)",
        "members": f"client {settings.client}'s {len(members)} real examples",
        "unseen": f"{len(unseen)} images of the {source}; one random half is the held-out set "
        "and the non-members, the other trains the reference model",
    }
    score = example_scorer(model)  # one scorer for members, non-members and canaries
    who = f"client {settings.client}"
    result |= _audit_model(model, score, cfg, round_, train, members, unseen, settings, out, who)
    result["canaries"] = _canary_check(score, cfg, run.path, accountant, settings, out)
    return _finish(result, out, started)


def audit_device(
    weights: str | Path,
    config: str | Path,
    data: str | Path,
    heldout: str | Path,
    out: str | Path,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """A data owner's audit on its own device: the released `weights` against its own
    `data` (training images and members) and `heldout` real images it never trained on."""
    from fedgen.data import load_device_data
    from fedgen.files import load_checkpoint

    settings = settings or AuditSettings()
    settings.check()
    started = time.perf_counter()
    cfg = load_config(config)
    state = load_checkpoint(Path(weights))
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{weights} does not hold a {cfg.model.type} of the shape {config} describes "
            f"({str(err).splitlines()[0]}); give the run's own config.yaml"
        ) from None
    model.eval()
    own = load_device_data(data).data
    unseen = load_device_data(heldout).data
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    round_ = cfg.total_rounds  # a released model is the run's last
    result: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "weights": str(Path(weights).resolve()),
        "round": None,
        "model": cfg.model.type,
        "private": cfg.privacy.enabled,
        "deployed": True,
        "accountant": {"private": cfg.privacy.enabled, "delta": cfg.privacy.delta},
        "settings": asdict(settings),
        "contains_training_images": True,
        "data": {
            "training_images": f"{len(own)} images of {data} (this device's own)",
            "members": f"{len(own)} images of {data}",
            "unseen": f"{len(unseen)} images of {heldout}",
        },
    }
    result |= _audit_model(
        model, example_scorer(model), cfg, round_, own, own, unseen, settings, out, "this device"
    )
    result["canaries"] = {"status": "skipped", "reason": "canaries exist in simulation only"}
    return _finish(result, out, started)


def compare_runs(main: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Side-by-side figures of two audits (e.g. a DP run and the same run without DP):
    writes compare_*.png into the first run's audit folder, returns the `compare` entry."""
    out = Path(main["run_dir"]) / "audit"
    label = {id(main): _label(main), id(other): _label(other)}
    mia = [
        (label[id(r)], r["membership_inference"]["attacks"])
        for r in (main, other)
        if r["membership_inference"].get("status") == "done"
    ]
    if len(mia) == 2:
        _plot_roc(mia, out / "compare_roc.png")
    entry = {"run_dir": other["run_dir"], "label": label[id(other)], "summary": _figures(other)}
    main["compare"] = entry
    main["figures"] = _figure_index(out)
    from fedgen.files import write_atomic

    write_atomic(out / "audit.json", json.dumps(main, indent=2))
    return entry


def _label(result: dict[str, Any]) -> str:
    acc = result["accountant"]
    if not result["private"]:
        return "no DP"
    eps = acc.get("max_epsilon")
    return f"DP eps {eps:.2f}" if eps is not None else "DP"


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an audit, flat, for tables and the comparison."""
    row: dict[str, Any] = {
        "private": result["private"],
        "epsilon": result["accountant"].get("max_epsilon"),
    }
    memo = result.get("memorisation", {})
    if memo.get("status") == "done":
        for space in ("pixel", "features"):
            if space in memo:
                row[f"{space}_share_closer_to_training"] = memo[space]["share_closer_to_training"]
                row[f"{space}_median_ratio"] = memo[space]["median_ratio"]
        copying = memo.get("data_copying")
        if copying:
            row["copying_share_below_threshold"] = copying["share_generated_below"]
    mia = result.get("membership_inference", {})
    if mia.get("status") == "done":
        for attack, s in mia["attacks"].items():
            row[f"mia_{attack}_auc"] = s["auc"]
            row[f"mia_{attack}_tpr_at_1%_fpr"] = s["tpr_at_fpr"]["0.01"]["tpr"]
            row[f"mia_{attack}_tpr_at_0.1%_fpr"] = s["tpr_at_fpr"]["0.001"]["tpr"]
    can = result.get("canaries", {})
    if can.get("status") == "done":
        row["canary_epsilon_lower_bound"] = can["epsilon_lower_bound"]
        row["canary_epsilon_upper_bound"] = can["epsilon_upper_bound"]
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else str(value)
    return str(value)


def format_audit(result: dict[str, Any]) -> str:
    """A short summary of an audit (two columns with --compare)."""
    lines = [
        f"audit of {result.get('run_dir', result.get('weights'))}: {result['model']}, "
        + (f"round {result['round']}, " if result.get("round") else "")
        + _label(result)
    ]
    for key in ("memorisation", "membership_inference", "canaries"):
        check = result.get(key, {})
        if check.get("status") != "done":
            lines.append(f"{key.replace('_', ' ')}: {check.get('status')} ({check.get('reason')})")
    rows = _figures(result)
    other = result.get("compare")
    keys = [k for k in rows if k not in ("private", "epsilon")]
    if other:
        keys += [k for k in other["summary"] if k not in keys and k not in ("private", "epsilon")]
    if keys:
        width = max(len(k) for k in keys)
        head = f"{'':<{width}}  {_label(result):>14}"
        if other:
            head += f"  {other['label']:>14}"
        lines.append(head)
        for k in keys:
            line = f"{k:<{width}}  {_fmt(rows.get(k)):>14}"
            if other:
                line += f"  {_fmt(other['summary'].get(k)):>14}"
            lines.append(line)
    can = result.get("canaries", {})
    if can.get("status") == "done":
        best = can.get("best") or {}
        lines.append(
            f"canaries: {can['canaries']} ({can['included']} included); best guess "
            f"{best.get('correct', 0)}/{best.get('guesses', 0)} correct; epsilon lower bound "
            f"{can['epsilon_lower_bound']:.3f} at {can['confidence']:.0%} confidence; "
            + (
                f"accountant's epsilon {can['epsilon_upper_bound']:.3f}"
                if can["epsilon_upper_bound"] is not None
                else "no accountant bound (DP off)"
            )
        )
    if result.get("verdict") != "consistent":
        lines.append(
            "AUDIT FAILED: the empirical lower bound on epsilon is ABOVE the accountant's "
            "upper bound: the privacy accounting or the DP-SGD implementation is wrong "
            "(or a 1-in-20 event happened); do not trust this run's epsilon"
        )
    return "\n".join(lines)
