"""Tamper-evident records: the run's hash-chained audit log and a device ledger's chain.

Both are chains of JSON entries. Each entry carries the SHA-256 of the entry before it
(`prev_hash`) and its own (`hash`), computed over its canonical JSON: keys sorted, no
whitespace, ASCII only, so one value has exactly one byte string and anyone can recompute
a hash with any JSON library that sorts keys. Editing, inserting or deleting an entry
breaks every link after it; rewriting the whole chain consistently is not caught by the
chain alone (the devices' own ledgers are the independent witness, see docs/PRIVACY.md).

- The server's log, `RUN_DIR/audit_log.jsonl`, has one `round` entry per recorded round
  (`round_entry`): the config digest, the clients that trained and the server's record of
  each client it heard from (plan, history and its digest, epsilon), the digests of the
  updates it received, the round's declines and failures, the digests of the checkpoint,
  sample grids and metrics line written that round. `tally` entries record the end-of-run
  tallies, `resume` entries what a resumed server restored. The first entry chains from
  the digest of the run id (`run_genesis`), which `manifest.json` holds.
- A device's ledger keeps its own chain (`ledger_entry`, in the ledger file's `chain`):
  per round trained, the run id, round, DP steps, the digest of its history after the
  round and of the weights it released; per closed run, a `close` entry.

`fedgen.verify` checks both. This module imports neither torch nor Flower.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AuditLog",
    "AuditLogError",
    "LEDGER_CHAIN_FORMAT",
    "LOG_FORMAT",
    "LOG_NAME",
    "canonical_json",
    "chain_problems",
    "config_digest",
    "digest",
    "entry_hash",
    "file_digest",
    "history_digest",
    "history_extends",
    "latest_clients",
    "ledger_entry",
    "ledger_genesis",
    "plain_history",
    "round_entry",
    "run_genesis",
    "seal",
]

LOG_NAME = "audit_log.jsonl"
LOG_FORMAT = "fedgen-audit-log-1"
LEDGER_CHAIN_FORMAT = "fedgen-ledger-chain-1"


class AuditLogError(RuntimeError):
    """An audit log that cannot be read."""


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value hashes as: sorted keys, no whitespace, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON value's canonical form."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def config_digest(config_yaml: str) -> str:
    """Digest of a run's `config.yaml` as data (what it says, not how it is laid out):
    independent of settings a later fedgen adds to its schema."""
    return digest(yaml.safe_load(config_yaml))


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plain_history(history: Any) -> list[list[float | int]]:
    """An accountant history as `[[noise, rate, steps], ...]` with fixed types, so the
    same history always has the same digest (a steps count is never written as 4.0)."""
    return [[float(s), float(q), int(n)] for s, q, n in history]


def history_digest(history: Any) -> str:
    return digest(plain_history(history))


def history_extends(old: Any, new: Any) -> bool:
    """Whether history `new` continues `old`: the same entries, the last of which may have
    grown (the accountant merges equal consecutive entries), then any new ones."""
    old, new = plain_history(old), plain_history(new)
    if len(new) < len(old):
        return False
    for i, (sigma, q, steps) in enumerate(old):
        n_sigma, n_q, n_steps = new[i]
        if (n_sigma, n_q) != (sigma, q):
            return False
        if n_steps != steps and not (i == len(old) - 1 and n_steps > steps):
            return False
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash an entry must carry: over everything in it but the hash itself."""
    return digest({k: v for k, v in entry.items() if k != "hash"})


def seal(entry: dict[str, Any], prev_hash: str) -> dict[str, Any]:
    """`entry` linked to the entry before it (`prev_hash`) and stamped with its own hash."""
    sealed = {**entry, "prev_hash": prev_hash}
    sealed.pop("hash", None)
    sealed["hash"] = entry_hash(sealed)
    return sealed


def run_genesis(run_id: str | None) -> str:
    """What a run's first log entry chains from: the run id of `manifest.json`."""
    return digest({"format": LOG_FORMAT, "run_id": run_id})


def ledger_genesis(client_id: str) -> str:
    """What a device ledger's first chain entry chains from: the device's name."""
    return digest({"format": LEDGER_CHAIN_FORMAT, "client_id": client_id})


def _where(index: int, entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("round") is None:
        return f"entry {index + 1}"
    kind = entry.get("kind", "round")
    what = f"round {entry['round']}" if kind == "round" else f"{kind} after round {entry['round']}"
    return f"entry {index + 1} ({what})"


def chain_problems(entries: list[Any], genesis: str) -> list[str]:
    """What is wrong with a chain (empty when intact): an entry whose content does not
    match its hash (edited), or whose `prev_hash` is not the hash of the entry before it
    (an entry deleted, inserted or reordered)."""
    problems = []
    expected = genesis
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "hash" not in entry:
            problems.append(f"{_where(i, entry)} is not a chain entry")
            continue
        if entry_hash(entry) != entry["hash"]:
            problems.append(f"{_where(i, entry)}: content does not match its hash (edited)")
        if entry.get("prev_hash") != expected:
            what = "the chain's start" if i == 0 else "the entry before it"
            problems.append(
                f"{_where(i, entry)}: previous hash is not that of {what} "
                "(an entry was deleted, inserted or reordered)"
            )
        expected = entry["hash"]
    return problems


def round_entry(
    *,
    run_id: str | None,
    server_round: int,
    stage: str,
    config_sha256: str,
    privacy: dict[str, Any],
    participants: list[str],
    clients: dict[str, dict[str, Any]],
    updates: dict[str, str],
    report_round: dict[str, Any],
    missing: list[str],
    unidentified: dict[str, list[int]],
    checkpoint: dict[str, str] | None,
    outputs: dict[str, str],
    metrics_sha256: str | None,
) -> dict[str, Any]:
    """One round of the server's log (not yet sealed). `clients`: the server's record of
    every client this round touched, after the round, each with its history's digest;
    `updates`: the SHA-256 of each update's weights as received; `report_round`: the
    round's line of the privacy report (epsilon per client, declines, failure codes)."""
    return {
        "kind": "round",
        "format": LOG_FORMAT,
        "run_id": run_id,
        "round": server_round,
        "stage": stage,
        "time": _now(),
        "config_sha256": config_sha256,
        "privacy": privacy,
        "participants": sorted(participants),
        "clients": {cid: _with_digest(c) for cid, c in clients.items()},
        "updates": updates,
        "report_round": report_round,
        "missing": list(missing),
        "unidentified": unidentified,
        "checkpoint": checkpoint,
        "outputs": outputs,
        "metrics_sha256": metrics_sha256,
    }


def state_entry(
    kind: str,
    *,
    run_id: str | None,
    after_round: int,
    clients: dict[str, dict[str, Any]],
    unidentified: dict[str, list[int]],
) -> dict[str, Any]:
    """A `tally` (end-of-run tallies settled these clients) or `resume` entry (a resumed
    server restored these clients' records) of the server's log, not yet sealed."""
    return {
        "kind": kind,
        "format": LOG_FORMAT,
        "run_id": run_id,
        "round": after_round,
        "time": _now(),
        "clients": {cid: _with_digest(c) for cid, c in clients.items()},
        "unidentified": unidentified,
    }


def _with_digest(client: dict[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(client))  # a copy, in the types a reader will see
    plain["history_sha256"] = history_digest(plain.get("history", []))
    return plain


def ledger_entry(
    kind: str,
    *,
    run_id: str,
    server_round: int | None,
    steps: int,
    history: Any,
    reply_sha256: str | None,
) -> dict[str, Any]:
    """One entry of a device ledger's chain (not yet sealed): `round` (trained and
    released `reply_sha256`, the SHA-256 of its weights) or `close` (the run's tally)."""
    return {
        "kind": kind,
        "run_id": run_id,
        "round": server_round,
        "steps": steps,
        "history_sha256": history_digest(history),
        "reply_sha256": reply_sha256,
        "time": _now(),
    }


class AuditLog:
    """The server's `audit_log.jsonl`: append-only, one canonical JSON entry per line."""

    def __init__(self, run_path: Path) -> None:
        self.path = Path(run_path) / LOG_NAME
        self._head: str | None = None

    def entries(self) -> list[dict[str, Any]]:
        """Every entry; raises AuditLogError on a line that is not JSON."""
        entries = []
        for number, line in enumerate(self._lines(), start=1):
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise AuditLogError(f"{self.path} line {number} is not JSON") from None
        return entries

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [x for x in self.path.read_text().splitlines() if x.strip()]

    def head(self, run_id: str | None) -> str:
        """The hash the next entry chains from."""
        if self._head is None:
            lines = self._lines()
            self._head = json.loads(lines[-1])["hash"] if lines else run_genesis(run_id)
        return self._head

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Seal `entry` onto the chain and append it durably; returns the sealed entry."""
        sealed = seal(entry, self.head(entry.get("run_id")))
        with open(self.path, "ab") as fh:
            fh.write(canonical_json(sealed) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._head = sealed["hash"]
        return sealed

    def resume(self, last_round: int, saved: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Cut the log back to round `last_round`, the round a resumed run continues after
        (its later entries describe rounds that will run again), the way the metrics are
        cut. `saved`: that round's entry as the server state holds it, appended again if a
        crash lost it from the log. Returns the kept entries."""
        from fedgen.files import write_atomic  # the run directory's atomic write

        lines = self._lines()
        total = len(lines)
        parsed: list[dict[str, Any] | None] = []
        for i, line in enumerate(lines):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                if i == total - 1:
                    lines.pop()  # half a line: the crash cut this append short
                    break
                parsed.append(None)  # kept as it is: verify reports it
        keep = len(parsed)
        for i, entry in enumerate(parsed):
            # Entries up to the first round after `last_round`; tally and resume entries
            # before that one describe state the resumed run keeps.
            if (
                entry is not None
                and entry.get("kind") == "round"
                and entry.get("round", 0) > last_round
            ):
                keep = i
                break
        kept_lines, kept = lines[:keep], [e for e in parsed[:keep] if e is not None]
        last = max((int(e.get("round", 0)) for e in kept if e.get("kind") == "round"), default=0)
        if saved is not None and int(saved.get("round", -1)) == last_round and last < last_round:
            head = kept[-1]["hash"] if kept else run_genesis(saved.get("run_id"))
            if saved.get("prev_hash") == head:
                kept_lines.append(canonical_json(saved).decode())
                kept.append(saved)
        if len(kept_lines) != total or keep < len(parsed):
            write_atomic(self.path, "".join(x + "\n" for x in kept_lines))
        self._head = None
        with contextlib.suppress(IndexError, ValueError, KeyError):
            self._head = json.loads(kept_lines[-1])["hash"]
        return kept


def latest_clients(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The server's record of each client as the audit log entries leave it (each entry
    holds the clients it touched)."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        for cid, client in entry.get("clients", {}).items():
            latest[cid] = {k: v for k, v in client.items() if k != "history_sha256"}
    return latest
