"""A device's own privacy ledger: its accountant history for one run, on its own disk.

In deployment a SuperNode can restart mid-run and lose everything in memory; the ledger
is what makes its epsilon keep growing from where it was instead of from zero. It is
written after every round, before the reply leaves the device (so no released update is
ever unaccounted), atomically (write, fsync, rename), as plain JSON, keyed by the run and
a fingerprint of the device's data."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedgen.privacy import HistoryEntry, epsilon_of
from fedgen.reports import CheckpointError, fsync_dir, load_checkpoint, save_tensors
from fedgen.rounds import ClientPrivacyState

__all__ = ["LedgerError", "DeviceLedger", "default_ledger_dir", "epsilon_after"]

LEDGER_FORMAT = "fedgen-ledger-1"


class LedgerError(RuntimeError):
    """A ledger that cannot be trusted; training stops rather than restart from zero."""


def default_ledger_dir() -> Path:
    return Path(os.environ.get("FEDGEN_LEDGER_DIR", Path.home() / ".fedgen" / "ledgers"))


def epsilon_after(state: ClientPrivacyState, steps: int, delta: float, accountant: str) -> float:
    """Epsilon the device would have spent after `steps` more steps at its noise."""
    entry: HistoryEntry = (state.noise_multiplier, state.sample_rate, steps)
    return epsilon_of([*state.history, entry], delta, accountant)


@dataclass
class DeviceLedger:
    folder: Path
    run_id: str
    data_fingerprint: str
    client_id: str

    @property
    def path(self) -> Path:
        # Named by run and client, not by the data: a device whose data changed finds its
        # ledger and is refused, instead of starting a fresh history under a new name.
        run = re.sub(r"[^A-Za-z0-9_.-]", "_", self.run_id)[:64]
        client = re.sub(r"[^A-Za-z0-9_.-]", "_", self.client_id)[:64]
        return self.folder / f"{run}-{client}.json"

    def read(self) -> dict[str, Any] | None:
        """The ledger's content, or None when this run has not trained on this data yet."""
        path = self.path
        if not path.exists():
            return None
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise LedgerError(
                f"privacy ledger {path} cannot be read ({err}); this device will not train "
                "without it, since its epsilon would restart from zero. Restore it from a "
                "backup, or start a new run"
            ) from None
        if content.get("format") != LEDGER_FORMAT or content.get("run_id") != self.run_id:
            raise LedgerError(f"{path} is not this run's ledger (format or run id differ)")
        if content.get("data_fingerprint") != self.data_fingerprint:
            raise LedgerError(
                f"{path} accounts for different data than this client holds now (its data "
                "changed mid-run); restore the data, or start a new run"
            )
        return content

    @property
    def reply_path(self) -> Path:
        return self.path.with_suffix(".reply.safetensors")

    def cached_reply(
        self, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """The update this client sent for `server_round`, if that was its last round."""
        content = self.read()
        last = (content or {}).get("last_reply")
        if not last or int(last["round"]) != server_round:
            return None
        try:
            weights, metadata = load_checkpoint(self.reply_path, with_metadata=True)
        except CheckpointError:
            return None  # lost: the round is trained again and counted again (never less)
        if metadata.get("round") != str(server_round):
            return None  # a reply file newer than the ledger (crash between the two writes)
        return weights, {str(k): float(v) for k, v in last["metrics"].items()}

    def state(self) -> ClientPrivacyState | None:
        content = self.read()
        return None if content is None else ClientPrivacyState.from_plain(content)

    def write(
        self,
        state: ClientPrivacyState,
        *,
        client_id: str,
        accountant: str,
        delta: float,
        server_round: int,
        num_examples: int,
        reply: tuple[dict[str, torch.Tensor], dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Record the state after `server_round`; `reply` (weights, metrics) is kept so a
        restarted client asked for the same round sends it again instead of retraining."""
        previous = self.read() or {}
        last_reply = None
        if reply is not None:
            save_tensors(self.reply_path, reply[0], {"round": str(server_round)})
            last_reply = {"round": server_round, "metrics": reply[1]}
        rounds = sorted({*previous.get("rounds", []), server_round})
        content = {
            "format": LEDGER_FORMAT,
            "run_id": self.run_id,
            "data_fingerprint": self.data_fingerprint,
            "client_id": client_id,
            "num_examples": num_examples,
            "accountant": accountant,
            "delta": delta,
            "epsilon": epsilon_of(state.history, delta, accountant),
            "rounds": rounds,
            **state.to_plain(),
            "last_reply": last_reply,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "recompute": "opacus.accountants.create_accountant(accountant); acc.history = "
            "[tuple(h) for h in history]; acc.get_epsilon(delta)",
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write, flush to disk, then rename over the old file: a crash at any point leaves
        # either the old ledger or the new one, never a half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".ledger-", suffix=".tmp")
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
        return content
