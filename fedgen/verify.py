"""`fedgen verify`: check a run directory, or a device's ledger, against its hash chains.

A run directory's audit log (`fedgen.audit_log`) names, round by round, what the server
recorded and wrote. `verify_run` checks the log's own chain, then every file it covers
against it: the config, each checkpoint and sample grid (SHA-256 of the bytes), each
metrics line, the privacy report (rebuilt from the log and compared number by number) and
its statement, the saved server states; it recomputes every client's epsilon from its
history with a fresh dp-accounting accountant of the run's kind, and again with the other
accountant as an upper bound; checks that no epsilon passed its target and that every
history only grew; and, where the devices' ledgers are at hand (a simulation keeps them in
`RUN_DIR/client-ledgers`), checks each ledger's own chain and that the devices and the
server agree on every history and every update. `verify_ledgers` checks a device's ledger
folder or file on its own.

Each check is PASS, FAIL (every problem named with the file it is in) or SKIP (does not
apply, with the reason). `verify_path` returns it all as a plain dict (what `fedgen card`
shows, and `fedgen verify --json` prints).

Tolerances, all stated in the output:
- a recorded epsilon equals its recomputation within a relative 1e-9 (the same
  deterministic code computed both; the lifetime composition of several runs, whose order
  may differ, within 1e-6);
- no epsilon above its target by more than a relative 1e-9;
- the other accountant: the RDP epsilon bounds the true epsilon from above, and the PLD
  accountant's pessimistic discretisation adds at most one interval
  (`PLD_DISCRETIZATION`) of privacy loss per step, so PLD <= RDP + steps x interval must
  hold. Under `replace_one`, dp-accounting's RDP has no Poisson-sampled analysis; the bound
  used is the replace-one pair seen as two add/remove steps (remove the old example, add
  the new one), joined by the weak triangle inequality of Renyi divergence (Mironov 2017,
  Proposition 11, p = q = 2), which is valid and loose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.audit_log import (
    LOG_NAME,
    chain_problems,
    config_digest,
    digest,
    file_digest,
    history_digest,
    history_extends,
    ledger_genesis,
    plain_history,
    run_genesis,
)
from fedgen.console import plural

__all__ = [
    "Check",
    "EPSILON_MATCH",
    "TARGET_TOLERANCE",
    "format_verification",
    "other_accountant_epsilon",
    "verify_ledgers",
    "verify_path",
    "verify_run",
]

EPSILON_MATCH = 1e-9  # relative: a recorded epsilon against its recomputation
LIFETIME_MATCH = 1e-6  # relative: a lifetime composed in another order
TARGET_TOLERANCE = 1e-9  # relative: how far above its target an epsilon may read
# Orders of the replace-one RDP bound (each needs the add/remove RDP at 2a and 2a - 1).
_BOUND_ORDERS = np.array([1.25, 1.5, 1.75, *range(2, 65), 80, 96, 128, 192, 256], dtype=float)


@dataclass
class Check:
    """One verification: PASS with a summary, FAIL with problems, or SKIP with why."""

    name: str
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        return "SKIP" if self.skipped is not None else "PASS"

    def fail(self, file: str, message: str) -> None:
        self.problems.append(f"{file}: {message}")
        if file not in self.files:
            self.files.append(file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "summary": self.skipped if self.status == "SKIP" else self.summary,
            "problems": self.problems,
            "files": self.files,
        }


def _close(a: Any, b: Any, rel: float) -> bool:
    if a is None or b is None:
        return a is b
    a, b = float(a), float(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


def _plain(value: Any) -> Any:
    """A value as JSON gives it back (tuples as lists), for comparison with files."""
    return json.loads(json.dumps(value))


def _differences(expected: Any, found: Any, where: str = "", limit: int = 5) -> list[str]:
    """Where a file's JSON value differs from the one expected, as `path: X here, Y
    expected` (at most `limit`)."""
    out: list[str] = []

    def walk(e: Any, f: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(e, dict) and isinstance(f, dict):
            for key in sorted(set(e) | set(f), key=str):
                if key not in f:
                    out.append(f"{path}{key} is missing")
                elif key not in e:
                    out.append(f"{path}{key} is not expected")
                else:
                    walk(e[key], f[key], f"{path}{key}.")
        elif isinstance(e, list) and isinstance(f, list):
            if len(e) != len(f):
                out.append(f"{path.rstrip('.')}: {len(f)} items here, {len(e)} expected")
                return
            for i, (a, b) in enumerate(zip(e, f, strict=True)):
                walk(a, b, f"{path}{i}.")
        elif e != f:
            out.append(
                f"{path.rstrip('.')}: {json.dumps(f)[:60]} here, {json.dumps(e)[:60]} expected"
            )

    walk(expected, found, where)
    return out


# --- accountants -------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting logs a warning per fractional order it cannot evaluate and skips it.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rdp_curve(history: list[list[float | int]], orders: np.ndarray) -> np.ndarray:
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant(orders=[float(a) for a in orders])
    for sigma, q, steps in history:
        if steps > 0:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, int(steps))
    return np.asarray(acc.rdp, dtype=float)


def _replace_one_rdp_bound(history: list[list[float | int]], delta: float) -> float:
    """An RDP upper bound on the replace-one epsilon of Poisson-sampled Gaussian steps:
    D_a(P||R) <= (a - 1/2)/(a - 1) D_2a(P||Q) + D_(2a-1)(Q||R), Q the dataset without the
    replaced example, each term dp-accounting's add/remove RDP of the whole history."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    a = _BOUND_ORDERS
    with _quiet_absl():
        curve = (a - 0.5) / (a - 1) * _rdp_curve(history, 2 * a) + _rdp_curve(history, 2 * a - 1)
    curve = np.where(np.isnan(curve), np.inf, curve)
    return max(0.0, float(compute_epsilon(a, curve, delta)[0]))


def other_accountant_epsilon(
    history: Any, delta: float, neighboring: str
) -> tuple[str, float, float]:
    """(which RDP, PLD epsilon, RDP epsilon) of a history, each from a fresh dp-accounting
    accountant: the run's own one and the other. RDP bounds PLD from above (up to PLD's
    discretisation); under replace_one the RDP side is the two-step bound."""
    from fedgen.privacy import epsilon_of

    h = plain_history(history)
    with _quiet_absl():
        pld_eps = epsilon_of(h, delta, "pld", neighboring)
        if neighboring == "add_remove":
            return "rdp", pld_eps, epsilon_of(h, delta, "rdp", "add_remove")
        return (
            "rdp (replace-one as two add/remove steps)",
            pld_eps,
            _replace_one_rdp_bound(h, delta),
        )


def _pld_within_rdp(history: Any, delta: float, neighboring: str) -> tuple[bool, str]:
    from fedgen.privacy import PLD_DISCRETIZATION

    what, pld_eps, rdp_eps = other_accountant_epsilon(history, delta, neighboring)
    steps = sum(int(h[2]) for h in plain_history(history))
    slack = steps * PLD_DISCRETIZATION
    ok = not math.isfinite(rdp_eps) or pld_eps <= rdp_eps + slack + 1e-12
    return ok, f"pld {pld_eps:.4f} vs {what} {rdp_eps:.4f} (allowed pld <= rdp + {slack:g})"


def _with_provisional(client: dict[str, Any]) -> list[list[float | int]]:
    """A server record's history plus its provisional steps (counted as spent)."""
    pending = sum(int(p["steps"]) for p in client.get("provisional", []))
    extra = [[client["noise_multiplier"], client["sample_rate"], pending]] if pending else []
    return plain_history([*client.get("history", []), *extra])


def _own_history(client: dict[str, Any]) -> list[list[float | int]]:
    """What the client itself reported (a record that lost history keeps the lost part)."""
    return plain_history(client.get("history", [])[len(client.get("lost_history", [])) :])


# --- a run directory -------------------------------------------------------------------


@dataclass
class _Run:
    path: Path
    manifest: dict[str, Any]
    cfg: Any  # FedgenConfig, or None when config.yaml cannot be read
    config_text: str | None
    entries: list[dict[str, Any]]
    bad_lines: list[int]

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("kind") == "round"]

    def rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()


def _read_run(path: Path) -> tuple[_Run, list[Check]]:
    from fedgen.config import ConfigError, load_run_config

    early: list[Check] = []
    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        check = Check("manifest")
        check.fail("manifest.json", f"cannot be read ({err})")
        early.append(check)
    cfg, text = None, None
    try:
        text = (path / "config.yaml").read_text()
        cfg = load_run_config(path)
    except (OSError, ValueError, ConfigError) as err:
        check = Check("config")
        check.fail("config.yaml", f"cannot be read ({str(err).splitlines()[0]})")
        early.append(check)
    entries, bad = [], []
    log = path / LOG_NAME
    if log.is_file():
        for number, line in enumerate(log.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                bad.append(number)
    return _Run(path, manifest, cfg, text, entries, bad), early


def _check_chain(run: _Run) -> Check:
    check = Check("audit log chain")
    log = LOG_NAME
    if not (run.path / log).is_file():
        check.fail(
            log,
            "missing: nothing of this run can be verified (recorded before fedgen kept one, or deleted)",
        )
        return check
    for number in run.bad_lines:
        check.fail(log, f"line {number} is not JSON")
    run_id = run.manifest.get("run_id")
    for problem in chain_problems(run.entries, run_genesis(run_id)):
        first = run.entries[0] if run.entries else {}
        if (
            problem.startswith("entry 1 ")
            and "previous hash" in problem
            and first.get("prev_hash") == run_genesis(first.get("run_id"))
        ):
            check.fail(
                "manifest.json", f"run id {run_id} is not the run id the audit log starts from"
            )
        else:
            check.fail(log, problem)
    for entry in run.entries:
        if entry.get("run_id") != run_id:
            check.fail(
                log,
                f"entry of round {entry.get('round')} names run {entry.get('run_id')}, manifest.json {run_id}",
            )
            break
    numbers = [e.get("round") for e in run.rounds]
    last = max((n for n in numbers if isinstance(n, int)), default=0)
    expected = list(range(1, last + 1))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        check.fail(
            log,
            f"round entries {numbers} are not 1..{last} in order"
            + (f": round(s) {missing} missing (an entry deleted?)" if missing else "")
            + (f"; round(s) {twice} twice" if twice else ""),
        )
    if (
        run.cfg is not None
        and run.manifest.get("status") == "completed"
        and last != run.cfg.total_rounds
    ):
        check.fail(
            log,
            f"the run completed {run.cfg.total_rounds} rounds (manifest.json) but the log "
            f"ends at round {last} (entries deleted from its end?)",
        )
    others = len(run.entries) - len(numbers)
    check.summary = (
        f"{len(numbers)} round entries (rounds 1-{last})"
        + (f" and {others} tally or resume entr{'y' if others == 1 else 'ies'}" if others else "")
        + ", every hash and link intact, starting from the run id in manifest.json"
    )
    return check


def _check_config(run: _Run) -> Check:
    check = Check("config")
    if run.config_text is None or not run.rounds:
        check.skipped = "no config or no round entry to compare"
        return check
    if config_digest(run.config_text) != run.rounds[-1].get("config_sha256"):
        check.fail("config.yaml", "differs from the config the last round was recorded with")
    if run.cfg is not None:
        for entry in run.rounds:
            for key, value in entry.get("privacy", {}).items():
                mine = _plain(getattr(run.cfg.privacy, key, None))
                if mine != value:
                    check.fail(
                        "config.yaml",
                        f"privacy.{key} is {mine}, round {entry['round']} was recorded with {value}",
                    )
                    return check
    check.summary = "config.yaml is the one every round's entry names (SHA-256 of its content)"
    return check


def _check_checkpoints(run: _Run) -> Check:
    from fedgen.files import CheckpointError, load_checkpoint

    check = Check("checkpoints")
    named: set[str] = set()
    for entry in run.rounds:
        ckpt = entry.get("checkpoint")
        if not ckpt:
            continue
        rel = str(ckpt.get("path"))
        named.add(rel)
        path = run.path / rel
        if not path.is_file():
            check.fail(rel, f"missing (round {entry['round']} wrote it)")
            continue
        if file_digest(path) != ckpt.get("sha256"):
            check.fail(
                rel, "its bytes differ from the SHA-256 in the audit log (edited or corrupt)"
            )
            continue
        try:
            _, meta = load_checkpoint(path, with_metadata=True)
        except CheckpointError as err:
            check.fail(rel, str(err))
            continue
        if meta.get("sha256") != ckpt.get("tensors_sha256"):
            check.fail(rel, "its tensors' digest differs from the audit log's")
    for path in sorted((run.path / "checkpoints").glob("round_*.safetensors")):
        if run.rel(path) not in named:
            check.fail(
                run.rel(path), "is in no audit log entry (weights the log does not account for)"
            )
    check.summary = (
        f"{plural(len(named), 'checkpoint')}, each byte for byte the one its round's entry names"
    )
    return check


def _check_samples(run: _Run) -> Check:
    check = Check("sample grids")
    count = 0
    for entry in run.rounds:
        for rel, sha in entry.get("outputs", {}).items():
            count += 1
            path = run.path / rel
            if not path.is_file():
                check.fail(rel, f"missing (round {entry['round']} wrote it)")
            elif file_digest(path) != sha:
                check.fail(rel, "its bytes differ from the SHA-256 in the audit log")
    if not count:
        check.skipped = "no round of this run wrote a sample grid"
    check.summary = f"{plural(count, 'image')} of evaluated rounds, byte for byte as logged"
    return check


def _check_metrics(run: _Run) -> Check:
    check = Check("metrics")
    name = "metrics.jsonl"
    path = run.path / name
    lines: dict[int, list[Any]] = {}
    if path.is_file():
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                lines.setdefault(int(line["round"]), []).append(line)
            except (ValueError, KeyError, TypeError):
                check.fail(name, f"line {number} is not a metrics line")
    logged = {e["round"]: e.get("metrics_sha256") for e in run.rounds if e.get("metrics_sha256")}
    for server_round, sha in sorted(logged.items()):
        found = lines.get(server_round, [])
        if len(found) != 1:
            check.fail(name, f"{len(found)} lines for round {server_round}, expected 1")
        elif digest(found[0]) != sha:
            check.fail(name, f"the line of round {server_round} differs from the one logged")
    for server_round in sorted(set(lines) - set(logged)):
        check.fail(name, f"round {server_round} has a line but no audit log entry")
    check.summary = f"{len(logged)} lines, each the one its round's entry names"
    return check


def _snapshots(run: _Run) -> Iterator[tuple[dict[str, Any], str, dict[str, Any]]]:
    for entry in run.entries:
        for cid, client in entry.get("clients", {}).items():
            yield entry, cid, client


def _privacy(run: _Run) -> dict[str, Any] | None:
    if run.cfg is None or not run.cfg.privacy.enabled:
        return None
    p = run.cfg.privacy
    return {"delta": p.delta, "accountant": p.accountant, "neighboring": p.neighboring}


def _check_epsilon(run: _Run) -> Check:
    from fedgen.privacy import epsilon_of

    check = Check("epsilon recomputed")
    terms = _privacy(run)
    if terms is None:
        check.skipped = "privacy off (or no config): there is no epsilon to recompute"
        return check
    count = 0
    for entry, cid, client in _snapshots(run):
        where = f"round {entry.get('round')} ({entry.get('kind')}), client {cid}"
        count += 1
        fresh = epsilon_of(_with_provisional(client), **terms)
        if not _close(client.get("epsilon"), fresh, EPSILON_MATCH):
            check.fail(
                LOG_NAME, f"{where}: epsilon {client.get('epsilon')}, its history gives {fresh}"
            )
        if entry.get("kind") != "round" or cid not in entry.get("participants", []):
            continue
        own = epsilon_of(_own_history(client), **terms)
        if not _close(client.get("reported_epsilon"), own, EPSILON_MATCH):
            check.fail(
                LOG_NAME,
                f"{where}: the client reported epsilon {client.get('reported_epsilon')}, its history gives {own}",
            )
        logged = entry.get("report_round", {}).get("epsilon", {}).get(cid)
        if not _close(logged, client.get("epsilon"), EPSILON_MATCH):
            check.fail(
                LOG_NAME,
                f"{where}: the round's epsilon {logged} differs from the client's {client.get('epsilon')}",
            )
    check.summary = (
        f"{count} client records, each epsilon equal to a fresh dp-accounting "
        f"{terms['accountant']} accountant's ({terms['neighboring']}, delta {terms['delta']:g}) "
        f"within a relative {EPSILON_MATCH:g}"
    )
    return check


def _check_other_accountant(run: _Run) -> Check:
    check = Check("epsilon, other accountant")
    terms = _privacy(run)
    if terms is None:
        check.skipped = "privacy off (or no config)"
        return check
    from fedgen.audit_log import latest_clients

    details = []
    for cid, client in sorted(latest_clients(run.entries).items()):
        history = _with_provisional(client)
        if not history:
            continue
        ok, detail = _pld_within_rdp(history, terms["delta"], terms["neighboring"])
        details.append(detail)
        if not ok:
            check.fail(LOG_NAME, f"client {cid}: {detail}: the PLD epsilon is above an upper bound")
    check.summary = (
        f"{len(details)} final histories: the PLD epsilon is below the RDP upper bound"
        + (f" (e.g. {details[0]})" if details else "")
    )
    return check


def _check_target(run: _Run) -> Check:
    check = Check("epsilon within target")
    if _privacy(run) is None:
        check.skipped = "privacy off (or no config)"
        return check
    p = run.cfg.privacy
    if p.noise_multiplier is not None:
        check.skipped = "privacy.noise_multiplier is fixed: the run set no epsilon target"
        return check
    target = p.target_epsilon
    worst = 0.0
    for entry, cid, client in _snapshots(run):
        eps = client.get("epsilon")
        if eps is None:
            continue
        worst = max(worst, float(eps))
        if float(eps) > target * (1 + TARGET_TOLERANCE):
            check.fail(
                LOG_NAME,
                f"round {entry.get('round')}, client {cid}: epsilon {eps} > target {target:g}",
            )
    check.summary = f"largest epsilon {worst:.4f} <= target {target:g} (relative tolerance {TARGET_TOLERANCE:g})"
    return check


def _check_growth(run: _Run) -> Check:
    check = Check("histories only grew")
    previous: dict[str, dict[str, Any]] = {}
    for entry, cid, client in _snapshots(run):
        where = f"round {entry.get('round')} ({entry.get('kind')}), client {cid}"
        history = client.get("history", [])
        if history_digest(history) != client.get("history_sha256"):
            check.fail(LOG_NAME, f"{where}: history does not match its digest")
        if sum(int(h[2]) for h in history) != client.get("steps"):
            check.fail(LOG_NAME, f"{where}: steps {client.get('steps')} differ from its history's")
        old = previous.get(cid)
        if old is not None and not history_extends(old.get("history", []), history):
            check.fail(
                LOG_NAME, f"{where}: history {history} does not continue {old.get('history')}"
            )
        previous[cid] = client
    check.summary = (
        f"{len(previous)} clients, each history extending the one before it, entry by entry"
    )
    return check


def _expected_report(run: _Run) -> dict[str, Any]:
    from fedgen.audit_log import latest_clients
    from fedgen.privacy_report import PrivacyLedger

    ledger = PrivacyLedger(run.cfg)
    ledger.clients = latest_clients(run.entries)
    ledger.rounds = [e.get("report_round", {}) for e in run.rounds]
    ledger.unidentified = run.entries[-1].get("unidentified", {}) if run.entries else {}
    return _plain(ledger.to_dict())


# Figures of the report; its prose (relation, mechanism, recipe) depends on fedgen's version.
_REPORT_FIGURES = (
    "private", "neighboring", "accountant", "pld_value_discretization", "delta",
    "target_epsilon", "max_epsilon", "max_grad_norm", "rounds_planned",
    "local_steps_per_round", "planned_steps", "rounds", "clients", "unidentified_nodes",
    "population",
)  # fmt: skip


def _check_report(run: _Run) -> Check:
    from fedgen.privacy_report import privacy_markdown

    check = Check("privacy report")
    name = "privacy_report.json"
    if run.cfg is None or not run.entries:
        check.skipped = "no config or no audit log to compare with"
        return check
    try:
        report = json.loads((run.path / name).read_text())
    except (OSError, ValueError) as err:
        check.fail(name, f"cannot be read ({err})")
        return check
    expected = _expected_report(run)
    for key in _REPORT_FIGURES:
        for difference in _differences(expected.get(key), report.get(key), f"{key}."):
            check.fail(name, difference)
    md = run.path / "privacy_report.md"
    if not md.is_file() or md.read_text() != privacy_markdown(report):
        check.fail(
            "privacy_report.md",
            "is not the statement privacy_report.json gives (edited, or written by another fedgen version)",
        )
    check.summary = (
        f"{len(report.get('clients', {}))} clients and {len(report.get('rounds', []))} rounds, "
        "every figure equal to the audit log's; privacy_report.md its statement"
    )
    return check


def _check_server_state(run: _Run) -> Check:
    check = Check("server state")
    from fedgen.audit_log import latest_clients

    position = {e["round"]: i for i, e in enumerate(run.entries) if e.get("kind") == "round"}
    states = sorted((run.path / "checkpoints").glob("server_*.json"))
    for path in states:
        rel = run.rel(path)
        try:
            state = json.loads(path.read_text())
            server_round = int(state["round"])
            ledger = state["ledger"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            check.fail(rel, f"cannot be read ({err})")
            continue
        if server_round not in position:
            check.fail(rel, f"round {server_round} has no audit log entry")
            continue
        i = position[server_round]
        entry = run.entries[i]
        if (state.get("audit_entry") or {}).get("hash") != entry.get("hash"):
            check.fail(rel, f"its audit entry is not round {server_round}'s entry in the log")
        rounds = [e.get("report_round") for e in run.rounds if e["round"] <= server_round]
        expected = {
            "clients": latest_clients(run.entries[: i + 1]),
            "rounds": rounds,
            "unidentified": entry.get("unidentified", {}),
        }
        found = {k: ledger.get(k, {} if k != "rounds" else []) for k in expected}
        for difference in _differences(expected, _plain(found), "ledger."):
            check.fail(rel, difference)
    if not states:
        check.skipped = "no saved server state (checkpoints/server_*.json)"
    check.summary = (
        f"{plural(len(states), 'saved state')}, each the server's record as logged at its round"
    )
    return check


# --- device ledgers ------------------------------------------------------------------


def _ledger_files(path: Path) -> list[Path]:
    """The ledger file given, or the ledgers in a folder: JSON files that say they are
    fedgen device ledgers (a JSON policy file kept next to them is not one)."""
    if path.is_file():
        return [path]

    def claims_to_be_a_ledger(file: Path) -> bool:
        try:
            content = json.loads(file.read_text())
        except (OSError, ValueError):
            return True  # unreadable: checked, and reported, as a ledger
        return isinstance(content, dict) and str(content.get("format", "")).startswith(
            "fedgen-device-ledger"
        )

    return sorted(
        p for p in path.glob("*.json") if not p.name.startswith(".") and claims_to_be_a_ledger(p)
    )


def _read_ledger(path: Path) -> dict[str, Any] | str:
    from fedgen.ledger import LEDGER_FORMAT

    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"cannot be read ({err})"
    if not isinstance(content, dict) or content.get("format") != LEDGER_FORMAT:
        return f"is not a fedgen device ledger ({LEDGER_FORMAT})"
    return content


def _ledger_problems(path: Path, content: dict[str, Any]) -> dict[str, list[str]]:
    """A ledger's own problems by check name: chain, runs, reply, epsilon."""
    from fedgen.files import CheckpointError, load_checkpoint
    from fedgen.privacy import epsilon_of

    out: dict[str, list[str]] = {"chain": [], "runs": [], "reply": [], "epsilon": [], "bound": []}
    chain = content.get("chain", [])
    out["chain"] = chain_problems(chain, ledger_genesis(str(content.get("client_id"))))
    runs = content.get("runs", {})
    for rid in dict.fromkeys(e.get("run_id") for e in chain if isinstance(e, dict)):
        if rid not in runs:
            out["runs"].append(
                f"the chain names run {rid}, which the ledger no longer holds (deleted?)"
            )
    for rid, run in runs.items():
        mine = [e for e in chain if isinstance(e, dict) and e.get("run_id") == rid]
        trained = [e for e in mine if e.get("kind") == "round"]
        if not trained:
            out["runs"].append(
                f"run {rid}: no chain entry (recorded before the ledger kept a chain?)"
            )
            continue
        history = run.get("history", [])
        if sorted({e.get("round") for e in trained}) != sorted(run.get("rounds", [])):
            out["runs"].append(f"run {rid}: rounds {run.get('rounds')} differ from the chain's")
        if sum(int(e.get("steps", 0)) for e in trained) != sum(int(h[2]) for h in history):
            out["runs"].append(
                f"run {rid}: its history's steps differ from the chain's sum of rounds"
            )
        if mine[-1].get("history_sha256") != history_digest(history):
            out["runs"].append(f"run {rid}: history does not match the chain's last digest")
        closes = [i for i, e in enumerate(mine) if e.get("kind") == "close"]
        if bool(run.get("closed")) != bool(closes) or (closes and closes[0] != len(mine) - 1):
            out["runs"].append(f"run {rid}: closed={run.get('closed')} disagrees with the chain")
    last_reply = content.get("last_reply")
    trained_all = [e for e in chain if isinstance(e, dict) and e.get("kind") == "round"]
    if last_reply and trained_all:
        last = trained_all[-1]
        if (last_reply.get("run_id"), last_reply.get("round")) != (
            last.get("run_id"),
            last.get("round"),
        ):
            out["reply"].append("last_reply is not the chain's last round")
        reply = path.with_name(path.name.removesuffix(".json") + ".reply.safetensors")
        if reply.is_file():
            try:
                _, meta = load_checkpoint(reply, with_metadata=True)
                if meta.get("sha256") != last.get("reply_sha256"):
                    out["reply"].append(
                        f"{reply.name} is not the reply the chain's last round released"
                    )
            except CheckpointError as err:
                out["reply"].append(str(err))
    policy = content.get("lifetime", {}).get("policy")
    if policy and policy.get("require_dp", True):
        terms = {k: policy[k] for k in ("delta", "accountant", "neighboring")}
        lifetime: list[Any] = []
        for rid, run in sorted(runs.items(), key=lambda kv: kv[1].get("started", "")):
            history = plain_history(run.get("history", []))
            lifetime += history
            fresh = epsilon_of(history, **terms)
            if not _close(run.get("epsilon"), fresh, EPSILON_MATCH):
                out["epsilon"].append(
                    f"run {rid}: epsilon {run.get('epsilon')}, its history gives {fresh}"
                )
            cap = policy.get("max_epsilon")
            if cap is not None and fresh > cap * (1 + TARGET_TOLERANCE):
                out["epsilon"].append(f"run {rid}: epsilon {fresh} > the policy's maximum {cap}")
            if history:
                ok, detail = _pld_within_rdp(history, terms["delta"], terms["neighboring"])
                if not ok:
                    out["bound"].append(f"run {rid}: {detail}")
        stored = content.get("lifetime", {}).get("epsilon")
        fresh = epsilon_of(lifetime, **terms)
        if not _close(stored, fresh, LIFETIME_MATCH):
            out["epsilon"].append(f"lifetime epsilon {stored}, the runs' histories give {fresh}")
        cap = policy.get("lifetime_max_epsilon")
        if cap is not None and fresh > cap * (1 + TARGET_TOLERANCE):
            out["epsilon"].append(f"lifetime epsilon {fresh} > the policy's maximum {cap}")
    return out


_LEDGER_CHECKS = (
    ("chain", "ledger chain", "every hash and link intact"),
    ("runs", "ledger runs", "each run's rounds, steps and history as its chain says"),
    ("reply", "last reply", "the stored reply is the one the chain's last round released"),
    (
        "epsilon",
        "ledger epsilon",
        "each run's and the lifetime epsilon recomputed, within the policy",
    ),
    ("bound", "epsilon, other accountant", "PLD below the RDP upper bound for every run"),
)


def _ledger_checks(files: list[Path], root: Path) -> tuple[list[Check], dict[str, dict[str, Any]]]:
    """The checks of every ledger in `files`, and the readable ledgers by client id."""
    checks = {key: Check(name) for key, name, _ in _LEDGER_CHECKS}
    ledgers: dict[str, dict[str, Any]] = {}
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        content = _read_ledger(path)
        if isinstance(content, str):
            checks["chain"].fail(rel, content)
            continue
        content["_file"] = rel
        ledgers[str(content.get("client_id"))] = content
        for key, problems in _ledger_problems(path, content).items():
            for problem in problems:
                checks[key].fail(rel, problem)
    for key, _, summary in _LEDGER_CHECKS:
        checks[key].summary = f"{plural(len(ledgers), 'ledger')}: {summary}"
    return list(checks.values()), ledgers


def _check_devices(run: _Run, ledgers: dict[str, dict[str, Any]]) -> Check:
    """The devices' own chains against the server's log: the same history after every
    round a client trained, the same update, and no history shorter than the server's."""
    check = Check("devices agree with the server")
    from fedgen.audit_log import latest_clients

    run_id = run.manifest.get("run_id")
    compared = 0
    for entry in run.rounds:
        for cid in entry.get("participants", []):
            ledger = ledgers.get(cid)
            if ledger is None:
                continue
            file = ledger["_file"]
            mine = [
                e for e in ledger.get("chain", [])
                if isinstance(e, dict) and e.get("kind") == "round"
                and e.get("run_id") == run_id and e.get("round") == entry["round"]
            ]  # fmt: skip
            where = f"round {entry['round']}, client {cid}"
            if not mine:
                check.fail(
                    file,
                    f"{where}: the server logged this round; the device's chain has no such round",
                )
                continue
            compared += 1
            client = entry.get("clients", {}).get(cid, {})
            if mine[-1].get("history_sha256") != history_digest(_own_history(client)):
                check.fail(
                    file, f"{where}: the device's history differs from the one {LOG_NAME} records"
                )
            update = entry.get("updates", {}).get(cid)
            if update is not None and mine[-1].get("reply_sha256") != update:
                check.fail(
                    file,
                    f"{where}: the device released other weights than {LOG_NAME} says the server received",
                )
    for cid, client in latest_clients(run.entries).items():
        ledger = ledgers.get(cid)
        record = (ledger or {}).get("runs", {}).get(run_id)
        if record is None:
            continue
        own = _own_history(client)
        if not history_extends(own, record.get("history", [])):
            check.fail(
                ledger["_file"],
                f"client {cid}: the device's history is shorter than the server's or differs",
            )
        elif client.get("tally") == "collected" and plain_history(record.get("history", [])) != own:
            check.fail(
                ledger["_file"],
                f"client {cid}: the tally the server collected is not the device's history",
            )
    if not compared:
        check.skipped = "no device ledger of this run's clients at hand (pass --ledgers DIR)"
    check.summary = f"{compared} client rounds: the same history and the same update on both sides"
    return check


# --- entry points --------------------------------------------------------------------


def verify_run(path: str | Path, ledgers: str | Path | None = None) -> dict[str, Any]:
    """Every check of a run directory; `ledgers`: devices' ledger folder (default: the
    simulated devices' `RUN_DIR/client-ledgers`, when there)."""
    with _quiet_absl():
        return _verify_run(Path(path).resolve(), ledgers)


def _verify_run(root: Path, ledgers: str | Path | None) -> dict[str, Any]:
    run, checks = _read_run(root)
    checks += [
        _check_chain(run),
        *([] if run.cfg is None else [_check_config(run)]),
        _check_checkpoints(run),
        _check_samples(run),
        _check_metrics(run),
        _check_epsilon(run),
        _check_other_accountant(run),
        _check_target(run),
        _check_growth(run),
        _check_report(run),
        _check_server_state(run),
    ]
    folder = Path(ledgers).resolve() if ledgers else root / "client-ledgers"
    if folder.exists():
        ledger_checks, found = _ledger_checks(_ledger_files(folder), root)
        device = Check("device ledgers")
        for c in ledger_checks:
            for problem in c.problems:
                device.problems.append(problem)
            device.files += [f for f in c.files if f not in device.files]
        device.summary = (
            f"{plural(len(found), 'ledger')}: each chain intact, each run and epsilon as it says"
        )
        checks += [device, _check_devices(run, found)]
    else:
        skipped = Check("device ledgers", skipped=f"no ledgers at {folder} (pass --ledgers DIR)")
        checks.append(skipped)
    return _result(root, "run", checks, run_id=run.manifest.get("run_id"), rounds=len(run.rounds))


def verify_ledgers(path: str | Path) -> dict[str, Any]:
    """Every check of a device's ledger folder, or one ledger file."""
    target = Path(path).resolve()
    files = _ledger_files(target)
    if not files:
        raise FileNotFoundError(f"{target} holds no device ledger (*.json)")
    root = target.parent if target.is_file() else target
    with _quiet_absl():
        checks, _ = _ledger_checks(files, root)
    return _result(target, "ledger", checks, ledgers=len(files))


def verify_path(path: str | Path, ledgers: str | Path | None = None) -> dict[str, Any]:
    """`verify_run` for a run directory, `verify_ledgers` for a ledger folder or file."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: give a run directory or a ledger folder")
    run_markers = ("manifest.json", "config.yaml", LOG_NAME, "privacy_report.json")
    if target.is_dir() and any((target / m).exists() for m in run_markers):
        return verify_run(target, ledgers)
    if ledgers:
        raise ValueError(f"--ledgers is for a run directory; {target} is not one")
    return verify_ledgers(target)


def _result(path: Path, kind: str, checks: list[Check], **about: Any) -> dict[str, Any]:
    try:
        version = metadata.version("fedgen")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "path": str(path),
        "kind": kind,
        **about,
        "passed": not any(c.status == "FAIL" for c in checks),
        "checks": [c.to_dict() for c in checks],
        "tolerances": {
            "epsilon_match_relative": EPSILON_MATCH,
            "lifetime_match_relative": LIFETIME_MATCH,
            "target_relative": TARGET_TOLERANCE,
            "pld_vs_rdp": "pld <= rdp + steps x PLD value discretisation",
        },
        "fedgen": version,
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def format_verification(result: dict[str, Any]) -> str:
    """PASS/FAIL/SKIP per check, aligned, each problem on its own line under its check."""
    checks = result["checks"]
    width = max((len(c["name"]) for c in checks), default=0)
    lines = [f"fedgen verify {result['path']} ({result['kind']})"]
    for c in checks:
        lines.append(f"  {c['status']:<4}  {c['name']:<{width}}  {c['summary']}")
        lines += [f"        - {p}" for p in c["problems"]]
    failed = [c for c in checks if c["status"] == "FAIL"]
    lines.append(
        f"verdict: FAIL ({len(failed)} of {len(checks)} checks failed)"
        if failed
        else f"verdict: PASS ({len(checks)} checks)"
    )
    return "\n".join(lines)
