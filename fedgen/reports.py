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

import json
import platform
import sys
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedgen.config import FedgenConfig
from fedgen.console import plural, say
from fedgen.files import CheckpointError, load_checkpoint, save_tensors, write_atomic
from fedgen.killpoints import kill_point
from fedgen.plots import plot_epsilon

if TYPE_CHECKING:  # the report's module imports the accountant, which reading a run needs not
    from fedgen.privacy_report import PrivacyLedger

__all__ = ["RunDir"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _round_of(path: Path) -> int:
    # By number, not name: round_1000 comes after round_999.
    return int(path.stem.split("_")[1])


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
        from fedgen.privacy_report import privacy_markdown

        report = ledger.to_dict()
        write_atomic(self.path / "privacy_report.json", json.dumps(report, indent=2))
        write_atomic(self.path / "privacy_report.md", privacy_markdown(report))
        plot_epsilon(report, self.path / "privacy_epsilon.png")
