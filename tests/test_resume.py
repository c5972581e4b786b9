"""Resume after a crash: SIGKILL the whole `fedgen simulate` process mid-round, resume it,
and the run finishes with every client's history and epsilon equal to those of a run that
never stopped (whose history is fixed by the config: every client, every round, at the
noise calibrated once for the planned steps)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedgen.config import load_config
from fedgen.data import client_partition
from fedgen.privacy import epsilon_of
from fedgen.reports import RunDir
from fedgen.rounds import plan_privacy

from .conftest import REPO
from .helpers import SMALL

ROUNDS = 3
SETTINGS = [
    *SMALL,
    f"federation.rounds={ROUNDS}",
    "federation.min_train_clients=3",
    "federation.client_cpus=0.5",
    "run.eval_every=10",
    "evaluation.samples=100",
    "evaluation.downstream=never",
    "evaluation.evaluator_epochs=1",
]


def _simulate(*args: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedgen.cli", "simulate", *args]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    return cmd


def _ledger_rounds(folder) -> list[list[int]]:
    rounds = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        with contextlib.suppress(ValueError, KeyError):
            for run in json.loads(path.read_text())["runs"].values():
                rounds.append(run["rounds"])
    return rounds


def _metrics_rounds(out) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x)["round"] for x in lines if x.strip()]


def _kill_session(pid: int) -> None:
    """SIGKILL the process group and anything else in its session (Ray's workers)."""
    os.killpg(pid, signal.SIGKILL)
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True)
    for line in ps.stdout.splitlines():
        child, sid = (int(x) for x in line.split())
        if sid == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    log = open(out.parent / "first.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        _simulate("--out", str(out)), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    ledgers = out / "client-ledgers"
    deadline = time.monotonic() + 300
    try:
        # Kill in the middle of round 2: round 1 recorded by the server, and some client
        # has already trained (and written its ledger) for round 2.
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{log.name}")
            if _metrics_rounds(out) == [1] and any(2 in r for r in _ledger_rounds(ledgers)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("round 2 never started")
    finally:
        _kill_session(proc.pid)
        proc.wait(30)
        log.close()
    killed_at = _metrics_rounds(out)
    second = subprocess.run(
        _simulate("--resume", str(out)), cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, killed_at, second.stdout


def test_resumed_run_finishes_every_round(resumed):
    out, killed_at, stdout = resumed
    assert killed_at == [1]  # it really stopped mid-run
    assert "resuming" in stdout and "after round 1" in stdout
    assert _metrics_rounds(out) == [1, 2, 3]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"


def test_histories_and_epsilons_equal_an_uninterrupted_run(resumed):
    out, _, _ = resumed
    cfg = load_config(None, SETTINGS)
    report = json.loads((out / "privacy_report.json").read_text())
    assert sorted(report["clients"]) == ["0", "1", "2"]
    for pid in range(cfg.federation.num_clients):
        n = len(client_partition(cfg, pid, cfg.federation.num_clients))
        plan = plan_privacy(cfg, n)
        uninterrupted = [[plan.noise_multiplier, plan.sample_rate, cfg.planned_steps]]
        client = report["clients"][str(pid)]
        assert client["history"] == uninterrupted
        assert client["rounds_participated"] == ROUNDS
        expected = epsilon_of(uninterrupted, cfg.privacy.delta, "pld", "replace_one")
        assert client["epsilon"] == pytest.approx(expected)
    # The per-round record is whole too: one entry per round, every client in each.
    assert [sorted(r["epsilon"]) for r in report["rounds"]] == [["0", "1", "2"]] * ROUNDS


def test_no_file_is_half_written(resumed):
    out, _, _ = resumed
    run = RunDir(out)
    for server_round in range(1, ROUNDS + 1):
        assert run.checkpoint(server_round)[0] == server_round  # checksums verify
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_resuming_a_finished_run_changes_nothing(resumed):
    out, _, _ = resumed
    report = (out / "privacy_report.json").read_text()
    again = subprocess.run(
        _simulate("--resume", str(out)), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"has finished all {ROUNDS} rounds" in again.stdout
    assert "resuming" not in again.stdout  # no federation was started
    assert (out / "privacy_report.json").read_text() == report
    assert _metrics_rounds(out) == [1, 2, 3]
