"""A device's own privacy ledger: every run it trained in, on its own disk.

One file per device (named by its client id) holds each run's accountant history, and
their composition is the device's lifetime history: a new run id adds a run, it never
starts a fresh ledger. The ledger is written after every round, before the reply leaves the
device (so no released update is ever unaccounted), atomically (write, fsync, rename), as
plain JSON. A file lock held for read, train and write makes rounds on one device strictly
one at a time, so two overlapping messages can never both train on one reading of it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedgen.audit_log import chain_problems, ledger_entry, ledger_genesis, seal
from fedgen.files import (
    CheckpointError,
    fsync_dir,
    load_checkpoint,
    save_tensors,
    tensors_digest,
)
from fedgen.privacy import ClientPrivacyState, HistoryEntry, epsilon_of, recompute_recipe

__all__ = ["LedgerError", "DeviceLedger", "default_ledger_dir", "device_id", "format_ledger"]

LEDGER_FORMAT = "fedgen-device-ledger-2"


class LedgerError(RuntimeError):
    """A ledger that cannot be trusted; training stops rather than restart from zero."""


def default_ledger_dir() -> Path:
    return Path(os.environ.get("FEDGEN_LEDGER_DIR", Path.home() / ".fedgen" / "ledgers"))


def device_id(folder: Path) -> str:
    """A random name for a device that set no client-name, kept in its ledger folder. It
    says nothing about the data (a hash of the data would let a server test guesses)."""
    path = folder / "device-id"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError), open(path, "x") as fh:
            fh.write(f"device-{secrets.token_hex(4)}\n")
    return path.read_text().strip()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class DeviceLedger:
    folder: Path
    client_id: str
    # While the lock is held nobody else writes the file: read it once, not per question.
    _held: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _locked: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.folder / f"{_safe(self.client_id)}.json"

    @property
    def reply_path(self) -> Path:
        return self.folder / f"{_safe(self.client_id)}.reply.safetensors"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the device's lock: one round (read, train, write) at a time; a second
        message waits here until the first has written its ledger."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{_safe(self.client_id)}.lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self._locked = True
            try:
                self._remove_partial_writes()
                yield
            finally:
                self._locked, self._held = False, None
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @property
    def _partial_prefix(self) -> str:
        # Temporary files of this device's ledger writes; the dot after the name keeps
        # device "1" from matching device "10"'s.
        return f".{self.path.name}."

    def _remove_partial_writes(self) -> None:
        """Delete what a writer of this device's files (its ledger, its kept reply and
        optimizer state) left when it was killed before its rename: only the lock holder
        writes them, so under the lock none is in progress. Each file itself is the old
        or the new one, never half of either."""
        for path in self.folder.glob(f".{_safe(self.client_id)}.*.tmp"):
            path.unlink(missing_ok=True)

    def read(self) -> dict[str, Any]:
        """The ledger's content (an empty ledger when this device never trained)."""
        if self._held is not None:
            return copy.deepcopy(self._held)
        content = self._read()
        if self._locked:
            self._held = copy.deepcopy(content)
        return content

    def _read(self) -> dict[str, Any]:
        path = self.path
        if not path.exists():
            return {"format": LEDGER_FORMAT, "client_id": self.client_id, "runs": {}}
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise LedgerError(
                f"privacy ledger {path} cannot be read ({err}); this device will not train "
                "without it, since its epsilon would restart from zero. Restore it from a "
                "backup"
            ) from None
        if content.get("format") != LEDGER_FORMAT or not isinstance(content.get("runs"), dict):
            raise LedgerError(f"{path} is not a fedgen device ledger ({LEDGER_FORMAT})")
        return content

    def run(self, run_id: str, data_fingerprint: str | None = None) -> dict[str, Any] | None:
        """One run's record, or None. With `data_fingerprint`, refuse a run whose data
        changed mid-run (its plan and history were made for other data)."""
        run = self.read()["runs"].get(run_id)
        if (
            run is not None
            and data_fingerprint is not None
            and run["data_fingerprint"] != data_fingerprint
        ):
            raise LedgerError(
                f"{self.path}: run {run_id} accounts for different data than this device "
                "holds now (its data changed mid-run); restore the data, or start a new run"
            )
        return run

    def other_runs_history(self, run_id: str) -> list[HistoryEntry]:
        """The histories of every other run, in the order they started."""
        runs = self.read()["runs"]
        ordered = sorted((r["started"], rid) for rid, r in runs.items() if rid != run_id)
        return [
            (float(s), float(q), int(n)) for _, rid in ordered for s, q, n in runs[rid]["history"]
        ]

    def lifetime_history(self) -> list[HistoryEntry]:
        return self.other_runs_history("")

    def cached_reply(
        self, run_id: str, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """The update this device sent for `server_round` of `run_id`, if that was its last."""
        last = self.read().get("last_reply")
        if not last or last["run_id"] != run_id or int(last["round"]) != server_round:
            return None
        try:
            weights, metadata = load_checkpoint(self.reply_path, with_metadata=True)
        except CheckpointError:
            return None  # lost: the round is trained again and counted again (never less)
        if metadata.get("round") != str(server_round) or metadata.get("run_id") != run_id:
            return None  # a reply file newer than the ledger (crash between the two writes)
        return weights, {str(k): float(v) for k, v in last["metrics"].items()}

    def write_round(
        self,
        run_id: str,
        state: ClientPrivacyState,
        *,
        data_fingerprint: str,
        num_examples: int,
        policy: dict[str, Any],
        epsilon: float,
        lifetime_epsilon: float,
        server_round: int,
        reply: tuple[dict[str, torch.Tensor], dict[str, float]],
        plan_inputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record `run_id`'s state after `server_round`; the reply (weights, metrics) is
        kept so a restarted device asked for the same round sends it again instead of
        training again."""
        content = self.read()
        before = content["runs"].get(run_id, {})
        save_tensors(self.reply_path, reply[0], {"round": str(server_round), "run_id": run_id})
        content["runs"][run_id] = {
            **before,
            "started": before.get("started", _now()),
            "updated": _now(),
            "data_fingerprint": data_fingerprint,
            "num_examples": num_examples,  # stays on the device
            "rounds": sorted({*before.get("rounds", []), server_round}),
            "closed": False,
            "epsilon": epsilon,
            **state.to_plain(),
            **({"plan_inputs": plan_inputs} if plan_inputs is not None else {}),
        }
        content["last_reply"] = {"run_id": run_id, "round": server_round, "metrics": reply[1]}
        content["lifetime"] = {"epsilon": lifetime_epsilon, "policy": policy}
        done_before = sum(int(h[2]) for h in before.get("history", []))
        self._chain(
            content,
            ledger_entry(
                "round",
                run_id=run_id,
                server_round=server_round,
                steps=sum(int(h[2]) for h in state.history) - done_before,
                history=state.history,
                reply_sha256=tensors_digest(reply[0]),
            ),
        )
        return self._write(content)

    def _chain(self, content: dict[str, Any], entry: dict[str, Any]) -> None:
        """Seal `entry` onto the ledger's own hash chain (fedgen.audit_log)."""
        chain = content.setdefault("chain", [])
        chain.append(seal(entry, chain[-1]["hash"] if chain else ledger_genesis(self.client_id)))

    def close_run(self, run_id: str) -> dict[str, Any] | None:
        """Mark `run_id` finished on this device (no later message trains for it) and
        return its record."""
        content = self.read()
        run = content["runs"].get(run_id)
        if run is None:
            return None
        if not run.get("closed"):
            run["closed"] = True
            run["updated"] = _now()
            self._chain(
                content,
                ledger_entry(
                    "close",
                    run_id=run_id,
                    server_round=None,
                    steps=0,
                    history=run["history"],
                    reply_sha256=None,
                ),
            )
            self._write(content)
        return run

    def _write(self, content: dict[str, Any]) -> dict[str, Any]:
        content["format"] = LEDGER_FORMAT
        content["client_id"] = self.client_id
        policy = content.get("lifetime", {}).get("policy", {})
        if policy:
            content["recompute"] = recompute_recipe(policy["accountant"], policy["neighboring"])
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write, flush to disk, then rename over the old file: a crash at any point leaves
        # either the old ledger or the new one, never a half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=self._partial_prefix, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(content, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.folder)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._held = copy.deepcopy(content) if self._locked else None
        return content


def format_ledger(path: Path) -> str:
    """A device ledger as text: each run's epsilon and the lifetime epsilon, recomputed
    here from the histories (not read from the stored figures)."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as a fedgen device ledger: {err}") from None
    if content.get("format") != LEDGER_FORMAT:
        raise ValueError(f"{path} is not a fedgen device ledger ({LEDGER_FORMAT})")
    policy = content.get("lifetime", {}).get("policy")
    if not policy:
        return f"{Path(path).name}: client {content['client_id']}: no run has trained yet"

    def eps(history: list[Any]) -> float:
        return epsilon_of(history, policy["delta"], policy["accountant"], policy["neighboring"])

    runs = sorted(content["runs"].items(), key=lambda kv: kv[1]["started"])
    lines = [
        f"{Path(path).name}: client {content['client_id']}  ({policy['neighboring']}, "
        f"{policy['accountant']}, delta {policy['delta']:g})"
    ]
    lifetime: list[Any] = []
    for run_id, run in runs:
        lifetime += run["history"]
        lines.append(
            f"  run {run_id}: epsilon {eps(run['history']):.4f}  noise "
            f"{run['noise_multiplier']:.4f}  sample rate {run['sample_rate']:.6g}  steps "
            f"{sum(h[2] for h in run['history'])}/{run['planned_steps']}  rounds {run['rounds']}"
            f"{'  closed' if run.get('closed') else ''}  updated {run['updated']}"
        )
    cap = policy.get("lifetime_max_epsilon")
    lines.append(
        f"  lifetime: epsilon {eps(lifetime):.4f} over {len(runs)} run"
        + ("" if len(runs) == 1 else "s")
        + (f" of at most {cap:g}" if cap is not None else "")
    )
    chain = content.get("chain", [])
    broken = chain_problems(chain, ledger_genesis(str(content["client_id"])))
    if not chain:
        lines.append("  chain: none (written before fedgen kept one): cannot be verified")
    else:
        lines.append(
            f"  chain: {len(chain)} entries, "
            + (
                f"BROKEN: {broken[0]} (fedgen verify {path} for every check)"
                if broken
                else "intact"
            )
        )
    return "\n".join(lines)
