"""The run directory and everything written into it.

Layout of a run directory:
    config.yaml            resolved settings (every key, defaults included)
    manifest.json          versions, seed, command, start and end time
    metrics.jsonl          one JSON object per round: stage, losses, round time, epsilon,
                           test-set evaluation on evaluation rounds
    privacy_report.json    the epsilon report (schema in docs/PRIVACY.md)
    privacy_report.md      the privacy statement, with a table per client
    privacy_epsilon.png    epsilon per client against rounds
    samples/round_NNN.png  class-conditional samples, one row per class
    checkpoints/round_NNN.safetensors  global weights after each round
    audit_log.jsonl        hash-chained record of every round (fedgen.audit_log)
    canaries.json          with privacy.canaries: which canaries client 0 trained on
    audit/                 written by `fedgen audit` (fedgen.audit): audit.json and PNGs
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedgen.config import FedgenConfig
from fedgen.console import plural, say
from fedgen.killpoints import kill_point
from fedgen.privacy_report import (
    PrivacyLedger,
    client_sort_key,
    format_privacy_table,
    load_privacy_report,
    privacy_markdown,
)

__all__ = [
    "RunDir",
    "PrivacyLedger",
    "write_atomic",
    "save_image_grid",
    "format_privacy_table",
    "load_privacy_report",
]


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write then rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(payload)
        tmp.flush()
        os.fsync(tmp.fileno())
    _plain_mode(Path(tmp.name))
    os.replace(tmp.name, path)
    fsync_dir(path.parent)


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # once, at import: setting and restoring it is process-wide


def _plain_mode(path: Path) -> None:
    # Temporary files are created 0600; give the file the mode a plain open() would.
    os.chmod(path, 0o666 & ~_UMASK)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def save_image_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Save images in [-1, 1] of shape (rows*cols, 1, H, W) as one PNG grid."""
    arr = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, _, h, w = arr.shape
    cols = math.ceil(n / rows)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 40, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i, 0]
    img = Image.fromarray(grid, mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _round_of(path: Path) -> int:
    # By number, not name: round_1000 comes after round_999.
    return int(path.stem.split("_")[1])


class CheckpointError(RuntimeError):
    """A checkpoint file that is truncated or does not match its checksum."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(
    path: Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Safetensors with a SHA-256 of the tensors in its metadata, written atomically: a
    crash leaves the previous file or the new one, never half a file. `before_rename`
    runs between the two (a test's kill point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "sha256": tensors_digest(tensors)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_checkpoint(path: Path, with_metadata: bool = False) -> Any:
    """Weights from a safetensors checkpoint (no pickle), verified against its checksum;
    with `with_metadata`, (weights, metadata)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {path} is unreadable ({err})") from None
    expected = metadata.get("sha256")
    if expected is not None and tensors_digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its checksum (corrupt)")
    return (tensors, metadata) if with_metadata else tensors


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss cannot undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What the server writes at the top of a run directory by write-and-rename (figures by
# their stem: `.quality.tmp.png`).
_SERVER_FILES = (
    "config.yaml",
    "manifest.json",
    "metrics.jsonl",
    "privacy_report.json",
    "privacy_report.md",
    "privacy_epsilon",
    "quality",
    "audit_log.jsonl",
)


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.samples = self.path / "samples"
        self.checkpoints = self.path / "checkpoints"

    @classmethod
    def create(cls, cfg: FedgenConfig, out: str | Path | None = None) -> RunDir:
        if out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
        run = cls(Path(out).resolve())
        if any((run.path / name).exists() for name in ("manifest.json", "privacy_report.json")):
            raise FileExistsError(
                f"{run.path} already holds a run; continue it with --resume, choose another "
                "--out, or delete it"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.path / "config.yaml", cfg.to_yaml())
        return run

    # --- manifest -----------------------------------------------------------------
    def write_manifest(self, cfg: FedgenConfig, **extra: Any) -> None:
        path = self.path / "manifest.json"
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        if not manifest:
            manifest = {
                "fedgen": _version("fedgen"),
                "torch": torch.__version__,
                "opacus": _version("opacus"),
                "flwr": _version("flwr"),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cuda": torch.version.cuda if torch.cuda.is_available() else None,
                # Names this run on the devices' ledgers (kept when a run is resumed).
                "run_id": uuid.uuid4().hex,
                "seed": cfg.seed,
                "command": " ".join(sys.argv),
                "start_time": _now(),
                "end_time": None,
            }
        manifest.update(extra)
        write_atomic(path, json.dumps(manifest, indent=2))

    @property
    def run_id(self) -> str:
        return str(json.loads((self.path / "manifest.json").read_text())["run_id"])

    def finish(self, cfg: FedgenConfig, status: str = "completed") -> None:
        self.write_manifest(cfg, end_time=_now(), status=status)

    def finish_if_done(self, cfg: FedgenConfig, last_round: int) -> bool:
        """Mark the run completed, and say so, when `last_round` was its last."""
        if last_round < cfg.total_rounds:
            return False
        say(f"[fedgen] {self.path} has finished all {plural(cfg.total_rounds, 'round')}")
        self.finish(cfg, status="completed")
        return True

    # --- per round ----------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> Path:
        path = self.checkpoints / f"round_{server_round:03d}.safetensors"
        save_tensors(
            path,
            state,
            {"round": str(server_round)},
            before_rename=lambda: kill_point("checkpoint", server_round),
        )
        return path

    def checkpoint(self, server_round: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """The global weights after `server_round`, or the latest intact checkpoint. A
        checkpoint that fails its checksum is reported and, without a round asked for,
        passed over for the one before it."""
        found = sorted(self.checkpoints.glob("round_*.safetensors"), key=_round_of)
        if server_round is not None:
            found = [p for p in found if int(p.stem.split("_")[1]) == server_round]
        if not found:
            which = "" if server_round is None else f" of round {server_round}"
            raise FileNotFoundError(f"no checkpoint{which} in {self.checkpoints}")
        problems = []
        for path in reversed(found):
            try:
                return int(path.stem.split("_")[1]), load_checkpoint(path)
            except CheckpointError as err:
                problems.append(str(err))
                say(f"[fedgen] warning: {err}; trying the one before", stderr=True)
        raise CheckpointError("; ".join(problems) + ": no intact checkpoint left")

    # --- resume ---------------------------------------------------------------------
    def save_server_state(
        self, server_round: int, state: dict[str, Any], strategy: dict[str, torch.Tensor]
    ) -> None:
        """What the server needs, besides the round's checkpoint, to continue after
        `server_round`: written after the checkpoint, so a state file always has its
        checkpoint. Its rename commits the round (see `fedgen.rounds.RoundRecorder.record`)."""
        if strategy:
            save_tensors(self.checkpoints / f"strategy_{server_round:03d}.safetensors", strategy)
        write_atomic(
            self.checkpoints / f"server_{server_round:03d}.json",
            json.dumps({"round": server_round, "has_strategy": bool(strategy), **state}),
        )

    def seal_server_state(self, server_round: int, audit_entry: dict[str, Any]) -> None:
        """Add the round's audit log entry to its saved state, once the log holds it."""
        path = self.checkpoints / f"server_{server_round:03d}.json"
        state = json.loads(path.read_text())
        if state.get("audit_entry") != audit_entry:
            write_atomic(path, json.dumps({**state, "audit_entry": audit_entry}))

    def resume_point(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict]:
        """The last round whose checkpoint and server state are both intact: (round,
        weights, server state, strategy tensors). Damaged files are reported and the
        round before is used. No state at all (stopped before its first round was
        committed): round 0 and nothing else, so the run starts again from its first round
        under its own run id."""
        states = sorted(self.checkpoints.glob("server_*.json"), key=_round_of, reverse=True)
        if not states:
            return 0, {}, {}, {}
        for path in states:
            server_round = int(path.stem.split("_")[1])
            try:
                state = json.loads(path.read_text())
                weights = load_checkpoint(
                    self.checkpoints / f"round_{server_round:03d}.safetensors"
                )
                strategy = (
                    load_checkpoint(self.checkpoints / f"strategy_{server_round:03d}.safetensors")
                    if state.get("has_strategy")
                    else {}
                )
            except (ValueError, OSError, CheckpointError) as err:
                say(
                    f"[fedgen] warning: round {server_round} cannot be resumed from ({err}); "
                    "trying the round before",
                    stderr=True,
                )
                continue
            return server_round, weights, state, strategy
        raise CheckpointError(f"no intact round to resume from in {self.checkpoints}")

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temporary files of the server's writes a crash cut short: hidden files
        in checkpoints/ and samples/, and those of the run directory's own files (each is
        renamed over its target only when whole, so none holds anything the run needs).
        Returns what was removed."""
        ours = [p for d in (self.checkpoints, self.samples) if d.is_dir() for p in d.glob(".*")]
        ours += [
            path
            for path in self.path.glob(".*")
            if path.name[1:].startswith(tuple(f"{name}." for name in _SERVER_FILES))
        ]
        removed = []
        for path in ours:
            if path.is_file():
                path.unlink()
                removed.append(path)
        return removed

    def saved_privacy_clients(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.path / "privacy_report.json").read_text())["clients"])
        except (OSError, ValueError, KeyError):
            return {}

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics lines of rounds after `last_round` (a round cut short by a crash)."""
        path = self.path / "metrics.jsonl"
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["round"] <= last_round:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the crash
            write_atomic(path, "".join(x + "\n" for x in keep))

    def write_privacy_report(self, ledger: PrivacyLedger) -> None:
        report = ledger.to_dict()
        write_atomic(self.path / "privacy_report.json", json.dumps(report, indent=2))
        write_atomic(self.path / "privacy_report.md", privacy_markdown(report))
        _plot_epsilon(report, self.path / "privacy_epsilon.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Any) -> None:
    """Rounds are whole numbers: no tick at 1.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save_figure(fig: Any, path: Path) -> None:
    # Written beside the target and renamed: a reader never sees half a PNG.
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def _plot_epsilon(report: dict[str, Any], path: Path) -> None:
    if not report["private"]:
        return
    plt = _pyplot()
    # Constrained layout keeps labels and legend inside the figure at any size.
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100, layout="constrained")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in report["rounds"]:
        for cid, eps in entry["epsilon"].items():
            xs, ys = series.setdefault(cid, ([], []))
            xs.append(entry["round"])
            ys.append(eps)
    for cid, (xs, ys) in sorted(series.items(), key=lambda kv: client_sort_key(kv[0])):
        ax.plot(xs, ys, marker="o", label=f"client {cid}")
    target = report["target_epsilon"]
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", label="target")
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative epsilon (delta {report['delta']:g})")
    ax.set_title(f"Privacy spent per client ({report['accountant']} accountant)")
    last = max((x for xs, _ in series.values() for x in xs), default=1)
    ax.set_xlim(0, last + 0.5)
    top = max([target or 0.0, *(y for _, ys in series.values() for y in ys)])
    ax.set_ylim(0, top * 1.12 or 1.0)  # room above the target line for the legend
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        # Cumulative epsilon rises from the left: the lower right stays clear.
        ax.legend(fontsize="small", loc="lower right")
    _save_figure(fig, path)


QUALITY_PANELS = (
    ("frechet_distance", "Frechet distance", "in the evaluator's features; lower is better"),
    (
        "label_consistency",
        "label consistency",
        "the evaluator recognises the class asked for; higher is better",
    ),
    (
        "downstream_accuracy",
        "downstream accuracy",
        "a classifier trained on generated images, tested on real ones; higher is better",
    ),
)
BOUNDED_QUALITY = ("label_consistency", "downstream_accuracy")  # fractions in [0, 1]


def plot_quality(lines: list[dict[str, Any]], path: Path) -> None:
    """Quality figures of the evaluated rounds against the round and, for a private run,
    against the epsilon spent by then: where the privacy went, and what it bought."""
    plt = _pyplot()
    private = any(line.get("max_epsilon") is not None for line in lines)
    axes_x = [("round", "round")] + (
        [("max_epsilon", "max epsilon over clients")] if private else []
    )
    fig, axes = plt.subplots(
        len(QUALITY_PANELS),
        len(axes_x),
        figsize=(5.5 * len(axes_x), 9),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    for row, (key, name, meaning) in enumerate(QUALITY_PANELS):
        points = [line for line in lines if line.get("eval", {}).get(key) is not None]
        for col, (xkey, xlabel) in enumerate(axes_x):
            ax = axes[row][col]
            xs = [p[xkey] for p in points if p.get(xkey) is not None]
            ys = [p["eval"][key] for p in points if p.get(xkey) is not None]
            ax.plot(xs, ys, marker="o")
            ax.set_title(meaning, fontsize="small")
            ax.set_ylabel(name)
            ax.set_xlabel(xlabel)
            # Both start at nothing spent; a lone point is then not alone on its axis.
            ax.set_xlim(0, max(xs, default=1) * 1.08 + (0.5 if xkey == "round" else 0))
            if xkey == "round":
                _integer_ticks(ax.xaxis)
            if key in BOUNDED_QUALITY:
                ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    fig.suptitle("Sample quality: generated images measured against the real test images")
    _save_figure(fig, path)


_EVALUATION_ROWS = (
    ("evaluator_test_accuracy", "evaluator accuracy on real test images", "{:.4f}"),
    ("frechet_distance", "Frechet distance (evaluator features)", "{:.3f}"),
    ("frechet_generated_samples", "  generated / real samples", None),
    ("label_consistency", "label consistency", "{:.4f}"),
    ("inception_fid", "Inception FID", "{:.2f}"),
    ("downstream_accuracy", "downstream accuracy on real test images", "{:.4f}"),
    ("downstream_train_examples", "  generated images it was trained on", "{}"),
    ("downstream_selected_epoch", "  epoch chosen on held-out generated images", "{}"),
    ("recon_mse", "reconstruction MSE", "{:.5f}"),
    ("psnr", "reconstruction PSNR (dB)", "{:.2f}"),
    ("codebook_usage", "codebook usage", "{:.3f}"),
    ("codebook_perplexity", "codebook perplexity", "{:.2f}"),
)


def format_evaluation_table(result: dict[str, Any]) -> str:
    """The figures of an evaluation.json as a two-column table."""
    m, p = result["metrics"], result["privacy"]
    where = f"{result['partition']}" + (
        f" alpha {result['dirichlet_alpha']:g}" if result.get("dirichlet_alpha") else ""
    )
    eps = (
        f"epsilon {p['max_epsilon']:.3f} at delta {p['delta']:g} ({p['accountant']})"
        if p.get("max_epsilon") is not None
        else ("private (no report yet)" if p["private"] else "non-private")
    )
    rows = [
        ("run", f"{result['model']} on {result['dataset']}, round {result['round']}"),
        (
            "federation",
            f"{plural(result['clients'], 'client')}, {where}, {plural(result['rounds'], 'round')}",
        ),
        ("privacy", eps),
    ]
    for key, label, fmt in _EVALUATION_ROWS:
        if key not in m:
            continue
        if key == "frechet_generated_samples":
            rows.append((label, f"{m[key]} / {m['frechet_real_samples']}"))
        else:
            rows.append((label, "skipped" if m[key] is None else fmt.format(m[key])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
