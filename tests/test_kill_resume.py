"""A kill at any moment is resumable: SIGKILL the whole `fedgen simulate` process group at a
named point of round 1 or 2 (the test hook `fedgen.killpoints`, no timing), resume it, and
the run ends with the round count, histories and epsilons of an uninterrupted run of the
same config and seed. It covers each point of a round's write order
(`fedgen.rounds.RoundRecorder.record`), including a kill before any round was committed,
a kill from outside at an arbitrary moment of the last round, and resuming a finished run.

One run (Flower + Ray, 3 clients, 3 rounds) is killed at each point in turn and resumed
after each: five processes, 25-40 s each on an idle 2-core machine; the uninterrupted run
is the suite's shared `tiny_run`. Timeouts are only a guard against a hung run, far above
that. A stop after the last round was committed is tested in process
(no Ray), for each point after the commit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord

from clients.app import train as client_train
from fedgen.config import load_config
from fedgen.data import client_partition
from fedgen.killpoints import ENV_VAR, KILL_POINTS, SIGNAL_VAR
from fedgen.privacy import epsilon_of
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder, finish_committed_round, plan_privacy
from fedgen.verify import verify_path
from server.strategy import build_strategy

from .conftest import REPO
from .helpers import TINY_RUN, TINY_RUN_ROUNDS, small_config
from .test_training import _context, _train_message

ROUNDS = TINY_RUN_ROUNDS
EVAL_EVERY = 2  # round 2 is evaluated, round 1 is not: both kinds of round are killed
SETTINGS = TINY_RUN
assert f"run.eval_every={EVAL_EVERY}" in SETTINGS and "privacy.reproducible_noise=true" in SETTINGS
# A guard against a hung run only: a tiny simulation takes 25-90 s.
TIMEOUT = 900

# (point, round): every point of the issue, in rounds 1 and 2, and each way a run resumes:
# from its first round (nothing committed), from the round before (the killed round is
# sent again and answered from the devices' caches), or from the killed round itself
# (committed: its report, evaluation, metrics line and log entry are written on resume).
# One run is killed at each in turn: each resume carries the next kill point, and the
# last resume runs to the end (the points are in the order a run reaches them, so every
# resume gets past the stop before it). A kill right after round 1's report was written
# resumes like `evaluation` in round 2 (a committed round's missing outputs written on
# resume); that point is tested in process below.
# `outside` is no hook: the test itself SIGKILLs the process group at an arbitrary moment
# once some device has trained round 3, as a power cut would: before or after that round
# is committed, whichever the poll meets. It comes last, so no later stop depends on
# where it landed.
OUTSIDE = "outside"
CASES = [
    ("replied", 1),
    ("checkpoint", 2),
    ("evaluation", 2),
    (OUTSIDE, 3),
]


def _simulate(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedgen.cli", "simulate", *args]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    return cmd


def _kill_leftovers(session: int) -> None:
    """SIGKILL whatever is still in the killed run's session (nothing, when the hook's
    killpg took all of Ray with it)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True)
    for line in ps.stdout.splitlines():
        pid, sid = (int(x) for x in line.split())
        if sid == session:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _metrics_rounds(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rounds = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError):
            rounds.append(json.loads(line)["round"])
    return rounds


def _report_rounds(out: Path) -> list[int]:
    path = out / "privacy_report.json"
    return [r["round"] for r in json.loads(path.read_text())["rounds"]] if path.is_file() else []


def _ledger_rounds(out: Path) -> dict[str, list[int]]:
    """Each device's rounds of the run, from its own ledger."""
    rounds = {}
    for path in sorted((out / "client-ledgers").glob("*.json")):
        runs = json.loads(path.read_text())["runs"]
        rounds[path.stem] = sorted(r for run in runs.values() for r in run["rounds"])
    return rounds


def _on_disk(out: Path) -> dict[str, Any]:
    """What the kill left: the files that say how far the round got."""
    ckpt = out / "checkpoints"
    return {
        "states": sorted(p.name for p in ckpt.glob("server_*.json")),
        "checkpoints": sorted(p.name for p in ckpt.glob("round_*.safetensors")),
        "partial": sorted(p.name for p in ckpt.glob(".*")),
        "samples": sorted(p.name for p in (out / "samples").glob("round_*.png")),
        "report": _report_rounds(out),
        "metrics": _metrics_rounds(out),
        "ledgers": _ledger_rounds(out),
        "run_id": json.loads((out / "manifest.json").read_text())["run_id"],
    }


@pytest.fixture(scope="module")
def reference(tiny_run) -> Path:
    """The same config and seed, never stopped."""
    return tiny_run


def _kill_in_round(proc: subprocess.Popen, out: Path, server_round: int) -> None:
    """SIGKILL `proc`'s process group once some device has trained `server_round`;
    polled, no timing (the round's commit and its evaluation, seconds, follow)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before round {server_round} could be interrupted")
        if any(server_round in r for r in _ledger_rounds(out).values()):
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.05)
    pytest.fail(f"round {server_round} never started")


@dataclass(frozen=True)
class Stop:
    point: str
    round: int
    left: dict[str, Any]  # what the kill left on disk
    resumed_stdout: str  # what the next process (the resume) printed


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, list[Stop]]:
    """One run killed by the test hook at each of CASES in turn (each resume carries the
    next point), then resumed to its end: (run directory, the stops)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    args, lefts, outputs = ["--out", str(out)], [], []
    for point, server_round in CASES:
        log_path = out.parent / f"killed-{point}-{server_round}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # what it printed survives the kill
        if point != OUTSIDE:
            env[ENV_VAR] = f"{point}:{server_round}"
        with open(log_path, "w") as log:
            # Its own session: the kill takes the CLI, Ray and the clients, and nothing of
            # this test.
            proc = subprocess.Popen(
                _simulate(*args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
            try:
                if point == OUTSIDE:
                    _kill_in_round(proc, out, server_round)
                proc.wait(TIMEOUT)
            finally:
                _kill_leftovers(proc.pid)
                proc.wait(30)
        printed = log_path.read_text()
        assert proc.returncode == -signal.SIGKILL, (
            f"not killed at {point}:{server_round} (exit {proc.returncode}):\n" + printed[-3000:]
        )
        outputs.append(printed)
        lefts.append(_on_disk(out))
        args = ["--resume", str(out)]
    resumed = subprocess.run(
        _simulate(*args), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    outputs.append(resumed.stdout)
    stops = [
        Stop(point, n, left, outputs[i + 1])
        for i, ((point, n), left) in enumerate(zip(CASES, lefts, strict=True))
    ]
    return out, stops


@pytest.fixture(params=range(len(CASES)), ids=[f"{p}-round{r}" for p, r in CASES])
def stop(request, killed_run) -> Stop:
    return killed_run[1][request.param]


def test_the_kill_came_where_the_hook_says(stop):
    """What was on disk when the process group died: each point is the state it names."""
    point, n, left = stop.point, stop.round, stop.left
    trained = {str(c): list(range(1, n + 1)) for c in range(3)}
    before = [f"server_{r:03d}.json" for r in range(1, n)]
    claimed = list(range(1, n))  # rounds the report and metrics claim
    if point == OUTSIDE:  # some device had trained round n; the round may be committed
        assert any(r == trained["0"] for r in left["ledgers"].values())
        assert all(r in (claimed, trained["0"]) for r in left["ledgers"].values())
        assert left["states"] in (before, [*before, f"server_{n:03d}.json"])
        assert left["metrics"] in (claimed, [*claimed, n])
        assert len(left["report"]) <= len(left["states"])
        return
    assert left["ledgers"] == trained  # every device had trained and cached round n
    if point == "replied":
        assert left["states"] == before and left["report"] == claimed
    elif point == "checkpoint":
        assert left["partial"] == [f".round_{n:03d}.safetensors.tmp"]
        assert f"round_{n:03d}.safetensors" not in left["checkpoints"]
        assert left["states"] == before and left["report"] == claimed
    elif point == "report":
        assert left["states"] == [*before, f"server_{n:03d}.json"]
        assert left["report"] == [*claimed, n]  # the report claims the round...
        assert left["metrics"] == claimed  # ...its metrics line is not written yet
    else:
        assert point == "evaluation"
        assert left["states"] == [*before, f"server_{n:03d}.json"]
        assert f"round_{n:03d}.png" in left["samples"]
        assert left["metrics"] == claimed
    # Never a report ahead of the weights and server state that back it.
    assert len(left["report"]) <= len(left["states"])


def test_each_resume_starts_where_its_kill_left_the_run(stop, killed_run):
    point, n, stdout = stop.point, stop.round, stop.resumed_stdout
    committed = point in ("report", "evaluation")  # the killed round's state was on disk
    if point == OUTSIDE:  # killed before or after the round's commit
        saved = f"server_{n:03d}.json" in stop.left["states"]
        finished = stop.left["metrics"] == list(range(1, n + 1))
        if finished:  # even its metrics line was written: only the run's end was left
            assert "has finished all" in stdout or f"after round {n}" in stdout
        else:
            assert f"after round {n if saved else n - 1}" in stdout
    elif committed:
        assert f"after round {n}" in stdout
        assert f"round {n} was saved before the stop" in stdout
        assert ("evaluation recomputed" in stdout) == (n % EVAL_EVERY == 0)
    elif n == 1:
        assert "from its first round (none was completed)" in stdout
    else:
        assert f"after round {n - 1}" in stdout
    # The devices' ledgers continue the same run.
    out = killed_run[0]
    assert json.loads((out / "manifest.json").read_text())["run_id"] == stop.left["run_id"]


def test_the_resumed_run_equals_an_uninterrupted_one(killed_run, reference):
    out, stops = killed_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert len({s.left["run_id"] for s in stops}) == 1  # one run, stopped at every point
    assert _metrics_rounds(out) == list(range(1, ROUNDS + 1))
    mine = json.loads((out / "privacy_report.json").read_text())
    theirs = json.loads((reference / "privacy_report.json").read_text())
    assert [r["round"] for r in mine["rounds"]] == list(range(1, ROUNDS + 1))
    assert [r["epsilon"] for r in mine["rounds"]] == [r["epsilon"] for r in theirs["rounds"]]
    assert sorted(mine["clients"]) == sorted(theirs["clients"]) == ["0", "1", "2"]
    for cid, client in theirs["clients"].items():
        for key in ("history", "epsilon", "steps", "rounds_participated", "tally"):
            assert mine["clients"][cid][key] == client[key], (cid, key)
    assert mine["max_epsilon"] == theirs["max_epsilon"]
    # The weights too (reproducible noise): a resume that trained from the wrong weights
    # would keep the histories but not these. Close, not equal: the server may sum the
    # replies in another order.
    _, final = RunDir(out).checkpoint(ROUNDS)
    _, uninterrupted = RunDir(reference).checkpoint(ROUNDS)
    assert final.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.allclose(final[key].float(), value.float(), rtol=1e-3, atol=1e-5), key
    # No device trained a round twice: the re-sent round came from its cache.
    assert _ledger_rounds(out) == {str(c): list(range(1, ROUNDS + 1)) for c in range(3)}


def test_the_resumed_run_verifies_and_holds_no_partial_file(killed_run):
    out = killed_run[0]
    result = verify_path(out)
    assert result["passed"], [c for c in result["checks"] if c["status"] == "FAIL"]
    run = RunDir(out)
    for server_round in range(1, ROUNDS + 1):
        assert run.checkpoint(server_round)[0] == server_round  # checksums verify
    assert run.resume_point()[0] == ROUNDS
    leftovers = [p for p in out.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_histories_and_epsilons_are_those_the_plan_fixes(killed_run):
    """Independently of the reference run: every client, every round, at the noise
    calibrated once for the planned steps."""
    out = killed_run[0]
    cfg = load_config(None, SETTINGS)
    report = json.loads((out / "privacy_report.json").read_text())
    for pid in range(cfg.federation.num_clients):
        n = len(client_partition(cfg, pid, cfg.federation.num_clients))
        plan = plan_privacy(cfg, n)
        uninterrupted = [[plan.noise_multiplier, plan.sample_rate, cfg.planned_steps]]
        client = report["clients"][str(pid)]
        assert client["history"] == uninterrupted
        assert client["rounds_participated"] == ROUNDS
        expected = epsilon_of(uninterrupted, cfg.privacy.delta, "pld", "replace_one")
        assert client["epsilon"] == pytest.approx(expected)
    assert [sorted(r["epsilon"]) for r in report["rounds"]] == [["0", "1", "2"]] * ROUNDS


def test_resuming_a_finished_run_changes_nothing(killed_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"  # a path without the word below
    shutil.copytree(killed_run[0], out)
    report = (out / "privacy_report.json").read_text()
    again = subprocess.run(
        _simulate("--resume", str(out)), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"has finished all {ROUNDS} rounds" in again.stdout
    assert "resuming" not in again.stdout  # no federation was started
    assert (out / "privacy_report.json").read_text() == report
    assert _metrics_rounds(out) == list(range(1, ROUNDS + 1))


# --- in process (no Ray): the hook, and a stop after the last round was committed -------


def test_the_hook_is_inert_unless_its_point_and_round_come(monkeypatch):
    from fedgen.killpoints import kill_point

    monkeypatch.delenv(ENV_VAR, raising=False)
    for point in KILL_POINTS:
        kill_point(point, 1)  # unset: nothing happens
    monkeypatch.setenv(ENV_VAR, "report:2")
    kill_point("report", 1)
    kill_point("evaluation", 2)
    monkeypatch.setenv(ENV_VAR, "reprot:2")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='reprot:2' is not <point>:<round>"):
        kill_point("report", 2)
    # Its point and round: the process group is killed (here a child's own group).
    child = subprocess.run(
        [sys.executable, "-c", "from fedgen.killpoints import kill_point as k; k('report', 2)"],
        env={**os.environ, ENV_VAR: "report:2"},
        start_new_session=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL


def test_the_hold_waits_for_its_file_in_its_round_only(monkeypatch, tmp_path):
    import threading

    from fedgen.killpoints import HOLD_VAR, hold_point

    monkeypatch.delenv(HOLD_VAR, raising=False)
    hold_point(2)  # unset: nothing happens
    release = tmp_path / "go"
    monkeypatch.setenv(HOLD_VAR, f"2:{release}")
    hold_point(1)  # another round: passes at once
    held = threading.Thread(target=hold_point, args=(2,), daemon=True)
    held.start()
    held.join(0.5)
    assert held.is_alive()  # waiting: the file is not there
    release.touch()
    held.join(120)
    assert not held.is_alive()
    monkeypatch.setenv(HOLD_VAR, "two")
    with pytest.raises(ValueError, match=f"{HOLD_VAR}='two' is not <round>:<file>"):
        hold_point(2)


class Stopped(Exception):
    """Stands in for the kill inside this process: every write before it is whole."""


@pytest.mark.parametrize("point", ["committed", "report", "evaluation"])
def test_a_stop_after_the_last_round_was_committed_finishes_without_a_federation(
    tmp_path, monkeypatch, point
):
    """Stopped at `point` of round 2 of 2, after its commit and before its metrics and log
    entry: resuming writes them (evaluation recomputed) without a federation, and the run
    is complete and verifies, with no round trained again."""
    cfg = small_config(
        "federation.rounds=2",
        "federation.min_train_clients=3",
        "run.eval_every=2",
        "evaluation.samples=100",
        "evaluation.downstream=never",
        "evaluation.evaluator_epochs=1",
    )
    run = RunDir.create(cfg, tmp_path / "run")
    run.write_manifest(cfg)
    ledgers = run.path / "client-ledgers"
    recorder = RoundRecorder(cfg, run)
    strategy = build_strategy(cfg, recorder)
    contexts = [_context(cfg, pid) for pid in range(cfg.federation.num_clients)]

    def stop_at(where: str, server_round: int) -> None:
        if (where, server_round) == (point, 2):
            raise Stopped

    monkeypatch.setattr("fedgen.rounds.kill_point", stop_at)
    weights = recorder.initial_state()
    with pytest.raises(Stopped):
        for server_round in (1, 2):
            strategy._sent = ArrayRecord(weights)  # what configure_train records
            replies = [
                client_train(_train_message(cfg, weights, server_round, ledgers, run.run_id), c)
                for c in contexts
            ]
            arrays, _ = strategy.aggregate_train(server_round, replies)
            weights = arrays.to_torch_state_dict()
    monkeypatch.undo()  # the resumed process has no kill point
    assert _report_rounds(run.path) == ([1] if point == "committed" else [1, 2])
    assert _metrics_rounds(run.path) == [1]
    assert (run.samples / "round_002.png").is_file() == (point == "evaluation")
    assert not verify_path(run.path)["passed"]  # round 2 is claimed but not logged yet

    assert finish_committed_round(cfg, RunDir(run.path)) == 2
    assert run.finish_if_done(cfg, 2)
    assert _metrics_rounds(run.path) == [1, 2]
    assert json.loads((run.path / "metrics.jsonl").read_text().splitlines()[1])["eval"]
    assert (run.samples / "round_002.png").is_file()
    result = verify_path(run.path)
    assert result["passed"], [c for c in result["checks"] if c["status"] == "FAIL"]
    assert _ledger_rounds(run.path) == {str(c): [1, 2] for c in range(3)}
    # Finished: resuming again changes nothing.
    log = (run.path / "audit_log.jsonl").read_text()
    assert finish_committed_round(cfg, RunDir(run.path)) == 2
    assert (run.path / "audit_log.jsonl").read_text() == log


def _session_processes(session: int) -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True)
    pairs = (tuple(int(x) for x in line.split()) for line in ps.stdout.splitlines())
    return [pid for pid, sid in pairs if sid == session]


def test_an_interrupt_stops_the_run_at_once_and_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the command, sent by the test hook once round 2's replies are in,
    its server thread held there): the command exits with 130 and says how to resume.
    Before 2026-11-25 it printed that and then waited for ever on Flower's ServerApp
    thread, with Ray's processes still running."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", ENV_VAR: "replied:2", SIGNAL_VAR: "INT"}
    # As a terminal starts it: SIGINT handled (an xdist worker's children inherit it
    # ignored, and Python then never raises KeyboardInterrupt).
    proc = subprocess.Popen(_simulate("--out", str(out)), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT)  # a guard: the bug waited for ever
        # Ray's processes go with it (they may take a moment to exit).
        deadline = time.monotonic() + TIMEOUT
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_processes(proc.pid)
    finally:
        _kill_leftovers(proc.pid)
    assert proc.returncode == 130, stdout[-2000:]
    assert f"fedgen simulate --resume {out}" in stdout
    assert left == [], "processes of the interrupted run outlived it"
    assert _metrics_rounds(out) == [1]  # round 2 never finished
