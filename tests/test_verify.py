"""`fedgen verify`: a fresh run passes every check; editing one number in a file the audit
log covers (a history, an epsilon, a checkpoint byte, a log entry, the config, a device's
ledger) fails, naming that file. Plus the chain on synthetic entries, resuming (in
process, with Flower's strategy but no Ray) and a device's own chain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord

from clients.app import train as client_train
from fedgen.audit_log import (
    AuditLog,
    chain_problems,
    digest,
    history_digest,
    history_extends,
    ledger_genesis,
    run_genesis,
    seal,
)
from fedgen.cli import main
from fedgen.data import client_partition, data_fingerprint
from fedgen.device import close_run, device_round
from fedgen.files import tensors_digest
from fedgen.ledger import DeviceLedger
from fedgen.models import build_gan
from fedgen.policy import DevicePolicy
from fedgen.privacy import epsilon_of
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder
from fedgen.verify import (
    format_verification,
    other_accountant_epsilon,
    verify_ledgers,
    verify_path,
)
from server.strategy import build_strategy, client_report

from .conftest import REPO
from .helpers import TINY_RUN_ROUNDS, small_config
from .test_training import _context, _train_message

ROUNDS = TINY_RUN_ROUNDS


@pytest.fixture(scope="module")
def fresh_run(tiny_run) -> Path:
    """One tiny real simulation (Flower + Ray, 3 clients, 3 rounds), shared with other files."""
    return tiny_run


@pytest.fixture
def run_copy(fresh_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(fresh_run, copy)
    return copy


def _verify(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "verify", str(path), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _failed(result: dict) -> dict[str, list[str]]:
    return {c["name"]: c["files"] for c in result["checks"] if c["status"] == "FAIL"}


def test_a_fresh_run_passes_every_check(fresh_run):
    proc = _verify(fresh_run, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert result["passed"] and result["rounds"] == ROUNDS
    for name in (
        "audit log chain", "config", "checkpoints", "sample grids", "metrics",
        "epsilon recomputed", "epsilon, other accountant", "epsilon within target",
        "histories only grew", "privacy report", "server state", "device ledgers",
        "devices agree with the server",
    ):  # fmt: skip
        assert status[name] == "PASS", (name, result)
    # Every client, every round: the devices' chains and the server's log agree.
    devices = next(c for c in result["checks"] if c["name"] == "devices agree with the server")
    assert devices["summary"].startswith(f"{3 * ROUNDS} client rounds")
    text = format_verification(result)
    assert "PASS  checkpoints" in text and text.endswith(f"verdict: PASS ({len(status)} checks)")


def test_the_log_holds_what_the_brief_asks_of_each_round(fresh_run):
    entries = AuditLog(fresh_run).entries()
    assert [e["round"] for e in entries] == list(range(1, ROUNDS + 1))
    assert entries[0]["prev_hash"] == run_genesis(RunDir(fresh_run).run_id)
    report = json.loads((fresh_run / "privacy_report.json").read_text())
    for entry in entries:
        assert entry["participants"] == ["0", "1", "2"]
        assert entry["privacy"]["accountant"] == "pld" and entry["privacy"]["delta"] == 1e-5
        assert entry["privacy"]["target_epsilon"] == 2.0
        for cid in entry["participants"]:
            client = entry["clients"][cid]
            assert client["steps"] == 4 * entry["round"]
            assert client["history_sha256"] == digest(client["history"])
            assert len(entry["updates"][cid]) == 64  # SHA-256 of the weights received
        assert entry["checkpoint"]["path"] == f"checkpoints/round_{entry['round']:03d}.safetensors"
        assert entry["report_round"] == report["rounds"][entry["round"] - 1]
    assert list(entries[-1]["outputs"]) == [f"samples/round_{ROUNDS:03d}.png"]


def _edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=2))


def _report_history(run: Path) -> None:
    def change(report):
        report["clients"]["1"]["history"][0][2] -= 1

    _edit_json(run / "privacy_report.json", change)


def _report_epsilon(run: Path) -> None:
    def change(report):
        report["clients"]["2"]["epsilon"] -= 0.01

    _edit_json(run / "privacy_report.json", change)


def _log_history(run: Path) -> None:
    path = run / "audit_log.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["clients"]["0"]["history"][0][2] -= 1  # round 2: 8 steps said to be 7
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def _checkpoint_byte(run: Path) -> None:
    path = run / "checkpoints" / "round_002.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))


def _delete_entry(index: int):
    def delete(run: Path) -> None:
        path = run / "audit_log.jsonl"
        lines = path.read_text().splitlines()
        del lines[index]
        path.write_text("\n".join(lines) + "\n")

    return delete


def _device_history(run: Path) -> None:
    def change(ledger):
        for record in ledger["runs"].values():
            record["history"][0][2] -= 1

    _edit_json(run / "client-ledgers" / "1.json", change)


def _config_target(run: Path) -> None:
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("target_epsilon: 2.0", "target_epsilon: 3.0"))


def _metrics_line(run: Path) -> None:
    path = run / "metrics.jsonl"
    path.write_text(path.read_text().replace('"clients": 3', '"clients": 2', 1))


TAMPERING = {
    "history in the privacy report": (_report_history, "privacy report", "privacy_report.json"),
    "epsilon in the privacy report": (_report_epsilon, "privacy report", "privacy_report.json"),
    "history in the audit log": (_log_history, "audit log chain", "audit_log.jsonl"),
    "a checkpoint byte": (_checkpoint_byte, "checkpoints", "checkpoints/round_002.safetensors"),
    "a log entry in the middle": (_delete_entry(1), "audit log chain", "audit_log.jsonl"),
    "the last log entry": (_delete_entry(-1), "audit log chain", "audit_log.jsonl"),
    "history in a device's ledger": (_device_history, "device ledgers", "client-ledgers/1.json"),
    "the config's target": (_config_target, "config", "config.yaml"),
    "a metrics line": (_metrics_line, "metrics", "metrics.jsonl"),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_one_edit_fails_and_names_the_file(run_copy, what):
    tamper, check, file = TAMPERING[what]
    tamper(run_copy)
    result = verify_path(run_copy)
    assert not result["passed"]
    failed = _failed(result)
    assert file in failed.get(check, []), failed


def test_the_command_exits_1_and_prints_the_file(run_copy, capsys):
    _checkpoint_byte(run_copy)
    assert main(["verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  checkpoints" in out
    assert "checkpoints/round_002.safetensors: its bytes differ" in out
    assert "verdict: FAIL (1 of" in out


def test_a_path_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# --- the chain itself, on synthetic entries ---------------------------------------------


def _chain(n: int) -> list[dict]:
    entries, prev = [], run_genesis("r")
    for i in range(1, n + 1):
        entries.append(seal({"kind": "round", "round": i, "value": i * 1.5}, prev))
        prev = entries[-1]["hash"]
    return entries


def test_an_intact_chain_has_no_problem_and_its_hashes_are_canonical():
    entries = _chain(4)
    assert chain_problems(entries, run_genesis("r")) == []
    # The same content in another key order hashes the same: JSON is canonicalised.
    reordered = [dict(reversed(list(e.items()))) for e in entries]
    assert chain_problems(reordered, run_genesis("r")) == []
    assert digest({"a": 1, "b": [1.0, 2]}) == digest({"b": [1.0, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 1.0})  # a steps count is not a float


def test_editing_deleting_or_reordering_an_entry_breaks_the_chain():
    genesis = run_genesis("r")
    edited = _chain(4)
    edited[1]["value"] = 99.0
    assert chain_problems(edited, genesis) == [
        "entry 2 (round 2): content does not match its hash (edited)"
    ]
    deleted = _chain(4)
    del deleted[2]
    problems = chain_problems(deleted, genesis)
    assert len(problems) == 1 and problems[0].startswith("entry 3 (round 4): previous hash")
    swapped = _chain(4)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert len(chain_problems(swapped, genesis)) == 3
    assert chain_problems(_chain(2), run_genesis("another run"))[0].startswith("entry 1 (round 1)")
    # A whole chain rewritten consistently passes the chain check alone: the devices'
    # ledgers are the witness against that (see test_a_devices_chain_...).
    rewritten, prev = [], genesis
    for entry in _chain(3):
        rewritten.append(seal({**entry, "value": 0.0}, prev))
        prev = rewritten[-1]["hash"]
    assert chain_problems(rewritten, genesis) == []


def test_a_history_extends_only_by_growing():
    old = [[1.0, 0.1, 4]]
    assert history_extends(old, [[1.0, 0.1, 8]])
    assert history_extends(old, [[1.0, 0.1, 4], [2.0, 0.1, 4]])
    assert not history_extends(old, [[1.0, 0.1, 3]])
    assert not history_extends(old, [[1.1, 0.1, 8]])
    assert not history_extends([[1.0, 0.1, 4], [2.0, 0.1, 4]], [[1.0, 0.1, 8]])


def test_resuming_cuts_the_log_back_and_drops_a_half_written_line(tmp_path):
    log = AuditLog(tmp_path)
    for entry in _chain(4):
        log.path.open("a").write(json.dumps(entry) + "\n")
    log.path.open("a").write('{"kind": "round", "rou')  # a crash during an append
    kept = log.resume(2, None)
    assert [e["round"] for e in kept] == [1, 2] == [e["round"] for e in log.entries()]
    # The next entry chains from round 2's.
    appended = AuditLog(tmp_path).append({"kind": "round", "round": 3, "run_id": "r"})
    assert appended["prev_hash"] == kept[-1]["hash"]
    assert chain_problems(log.entries(), run_genesis("r")) == []


def test_resuming_restores_an_entry_the_log_lost_from_the_server_state(tmp_path):
    entries = _chain(3)
    log = AuditLog(tmp_path)
    log.path.write_text("".join(json.dumps(e) + "\n" for e in entries[:2]))
    kept = log.resume(3, saved=entries[2])  # the state of round 3 holds its entry
    assert [e["hash"] for e in kept] == [e["hash"] for e in entries]
    assert chain_problems(log.entries(), run_genesis("r")) == []
    # An entry that does not chain onto the log is not forced in.
    log.path.write_text(json.dumps(entries[0]) + "\n")
    assert [e["round"] for e in log.resume(3, saved=entries[2])] == [1]


# --- resuming a real recorder, in process ------------------------------------------------


def _rounds(run: RunDir, recorder, cfg, weights, rounds, ledgers) -> dict:
    strategy = build_strategy(cfg, recorder)
    contexts = [_context(cfg, pid) for pid in range(cfg.federation.num_clients)]
    for server_round in rounds:
        strategy._sent = ArrayRecord(weights)  # what configure_train records of what it sends
        msgs = [
            client_train(_train_message(cfg, weights, server_round, ledgers, run.run_id), c)
            for c in contexts
        ]
        arrays, _ = strategy.aggregate_train(server_round, msgs)
        weights = arrays.to_torch_state_dict()
    return weights


def _resume(run: RunDir, cfg) -> tuple[RoundRecorder, dict, int]:
    last, weights, state, _ = run.resume_point()
    recorder = RoundRecorder(cfg, run)
    recorder.restore(state, run.saved_privacy_clients())
    run.truncate_metrics(last)
    return recorder, weights, last


@pytest.mark.parametrize("lost", ["server state", "log entry"])
def test_a_resumed_run_keeps_a_valid_chain(tmp_path, lost):
    """Killed after round 2's log entry but before its server state (round 2 runs again:
    the devices answer from their cache), or after the state but with the log entry lost
    (the state brings it back): either way the resumed run verifies."""
    cfg = small_config("federation.min_train_clients=3", "run.eval_every=100")
    run = RunDir.create(cfg, tmp_path / "run")
    run.write_manifest(cfg)
    ledgers = run.path / "client-ledgers"
    recorder = RoundRecorder(cfg, run)
    _rounds(run, recorder, cfg, recorder.initial_state(), (1, 2), ledgers)
    assert verify_path(run.path)["passed"]
    if lost == "server state":
        (run.checkpoints / "server_002.json").unlink()
    else:
        log = run.path / "audit_log.jsonl"
        log.write_text("".join(x + "\n" for x in log.read_text().splitlines()[:-1]))
        assert "server state" in _failed(verify_path(run.path))
    recorder, weights, last = _resume(run, cfg)
    assert last == (1 if lost == "server state" else 2)
    _rounds(run, recorder, cfg, weights, range(last + 1, 3), ledgers)
    result = verify_path(run.path)
    assert result["passed"], _failed(result)
    entries = AuditLog(run.path).entries()
    assert [e["round"] for e in entries if e["kind"] == "round"] == [1, 2]
    # Round 2's longer histories, restored from the report on disk, are logged as such.
    resumed = [e["round"] for e in entries if e["kind"] == "resume"]
    assert resumed == ([1] if lost == "server state" else [])


def test_a_late_client_settled_by_its_tally_verifies(tmp_path):
    """Client 2 trains round 2 but its reply never arrives: provisional in round 2's entry,
    settled by its end-of-run tally in a `tally` entry; the run verifies, devices included."""
    cfg = small_config("run.eval_every=100")
    run = RunDir.create(cfg, tmp_path / "run")
    run.write_manifest(cfg)
    ledgers = run.path / "client-ledgers"
    recorder = RoundRecorder(cfg, run)
    weights = _rounds(run, recorder, cfg, recorder.initial_state(), (1,), ledgers)
    msgs = [
        client_train(_train_message(cfg, weights, 2, ledgers, run.run_id), _context(cfg, pid))
        for pid in range(cfg.federation.num_clients)
    ]
    reports = [client_report(m) for m in msgs[:2]]  # client 2's reply is lost
    state = msgs[0].content["arrays"].to_torch_state_dict()
    recorder.record(2, state, reports, ["2 (node 3): no reply within 60s"], [], ["2"])
    run.save_server_state(2, recorder.server_state(), {})
    assert recorder.ledger.clients["2"]["tally"] == "provisional"
    final = close_run(DeviceLedger(ledgers, "2"), run.run_id)
    recorder.record_tallies([("2", {"client_id": "2", **final.to_plain()})])
    result = verify_path(run.path)
    assert result["passed"], _failed(result)
    entries = AuditLog(run.path).entries()
    assert [e["kind"] for e in entries] == ["round", "round", "tally"]
    assert entries[1]["missing"] == ["2"] and entries[1]["participants"] == ["0", "1"]
    assert entries[2]["clients"]["2"]["tally"] == "collected"
    # The device's history is the witness: a tally that claimed fewer steps is caught.
    ledger_file = ledgers / "2.json"
    content = json.loads(ledger_file.read_text())
    content["runs"][run.run_id]["history"][0][2] += 4
    ledger_file.write_text(json.dumps(content))
    assert (
        "client-ledgers/2.json" in _failed(verify_path(run.path))["devices agree with the server"]
    )


# --- a device's own chain ---------------------------------------------------------------


def _device(tmp_path: Path):
    cfg = small_config("training.local_steps=3")
    policy = DevicePolicy(max_epsilon=2.0, lifetime_max_epsilon=100.0)
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    ledger = DeviceLedger(tmp_path / "ledgers", "alpha")
    weights = build_gan(cfg.model, seed=0).state_dict()

    def round_(run_id: str, server_round: int):
        return device_round(
            policy=policy, ledger=ledger, cfg=cfg, run_id=run_id, server_round=server_round,
            global_state=weights, data=data, data_fingerprint=data_fingerprint(data),
            seed_index=0,
        )  # fmt: skip

    return ledger, round_


def test_a_devices_chain_records_every_round_and_verifies(tmp_path, capsys):
    ledger, round_ = _device(tmp_path)
    replies = [round_("run-1", 1), round_("run-1", 2)]
    assert round_("run-1", 2).kind == "cached"  # answered again: nothing new to record
    close_run(ledger, "run-1")
    replies.append(round_("run-2", 1))
    content = json.loads(ledger.path.read_text())
    chain = content["chain"]
    assert [(e["kind"], e["run_id"], e["round"]) for e in chain] == [
        ("round", "run-1", 1), ("round", "run-1", 2), ("close", "run-1", None),
        ("round", "run-2", 1),
    ]  # fmt: skip
    assert chain[0]["prev_hash"] == ledger_genesis("alpha")
    assert [e["steps"] for e in chain] == [3, 3, 0, 3]
    for entry, reply in zip([chain[0], chain[1], chain[3]], replies, strict=True):
        assert entry["reply_sha256"] == tensors_digest(reply.state_dict)
        assert entry["history_sha256"] == history_digest(reply.privacy.history)
    result = verify_ledgers(ledger.folder)
    assert result["passed"], result
    assert main(["report", str(ledger.folder)]) == 0
    assert "chain: 4 entries, intact" in capsys.readouterr().out


@pytest.mark.parametrize("edit", ["delete an entry", "fewer steps", "drop a run", "epsilon"])
def test_a_devices_edited_ledger_fails_naming_it(tmp_path, edit):
    ledger, round_ = _device(tmp_path)
    round_("run-1", 1)
    round_("run-1", 2)
    round_("run-2", 1)
    content = json.loads(ledger.path.read_text())
    if edit == "delete an entry":
        del content["chain"][1]
    elif edit == "fewer steps":
        content["runs"]["run-1"]["history"][0][2] -= 1
    elif edit == "drop a run":
        del content["runs"]["run-1"]  # a run forgotten lowers the lifetime epsilon
    else:
        content["runs"]["run-2"]["epsilon"] /= 2
    ledger.path.write_text(json.dumps(content))
    result = verify_ledgers(ledger.folder)
    assert not result["passed"]
    assert any("alpha.json" in files for files in _failed(result).values()), result


# --- the other accountant ----------------------------------------------------------------


@pytest.mark.parametrize("neighboring", ["add_remove", "replace_one"])
def test_the_rdp_epsilon_bounds_the_pld_one(neighboring):
    for history in ([[2.0, 0.16, 12]], [[0.8, 0.05, 200]], [[1.0, 0.01, 100], [1.5, 0.02, 50]]):
        what, pld, rdp = other_accountant_epsilon(history, 1e-5, neighboring)
        assert what.startswith("rdp")
        assert pld == pytest.approx(epsilon_of(history, 1e-5, "pld", neighboring))
        assert pld < rdp < 6 * pld  # an upper bound, and not a vacuous one
