"""Many simulated clients, few sampled, on `fedgen simulate`'s live console: one shared copy of the data per process, a plan
calibrated once per client and reused from its ledger, and a privacy report that
accounts for every node, the never-sampled ones included (epsilon 0, counted, not listed).
The figures at 10, 100 and 1,000 clients come from `simulations/bench_scale.py`."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import clients.app as client_app
from fedgen import device as device_module
from fedgen import privacy
from fedgen.data import client_partition, data_fingerprint
from fedgen.device import device_round
from fedgen.ledger import DeviceLedger
from fedgen.models import build_model
from fedgen.policy import DevicePolicy
from fedgen.privacy import (
    _CALIBRATED,
    CALIBRATION_TOLERANCE,
    PlannedBudget,
    calibrate_noise,
    epsilon_of,
)
from fedgen.verify import verify_run

from .conftest import REPO
from .helpers import ONE_ACTOR, small_config

NODES, SAMPLED, ROUNDS = 40, 4, 2
TINY = [
    "model.type=gan", "data.glyphs_per_class=40", f"federation.num_clients={NODES}",
    f"federation.fraction_train={SAMPLED / NODES}", f"federation.min_train_clients={SAMPLED}",
    f"federation.rounds={ROUNDS}", "training.local_steps=1", "training.batch_size=8",
    "model.generator_channels=16", "model.discriminator_hidden=16", "device=cpu",
    *ONE_ACTOR, "evaluation.samples=100", "evaluation.downstream=never",
    "evaluation.evaluator_epochs=1", "run.eval_examples=100",
]  # fmt: skip


@pytest.fixture(scope="module")
def many_clients_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    out = root / "run"
    args = [sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(out)]
    for setting in [*TINY, f"evaluation.cache_dir={root / 'evaluators'}"]:
        args += ["--set", setting]
    # rich's switches for a live display on a stream that is not a terminal.
    live = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    # Generous: 40 SuperNodes' start-up on a busy 2-core machine, not a speed test.
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **live}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


def test_simulate_console_has_a_live_bar_and_no_flower_lines(many_clients_run):
    out, stdout, stderr = many_clients_run
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stdout)  # the bar's colours
    log = out / "simulation.log"
    assert f"Flower's and Ray's log: {log}" in stdout
    assert "noise multiplier" in stdout and f"{ROUNDS} rounds," in stdout  # the plan
    assert f"[fedgen] round 1/{ROUNDS}: {SAMPLED} clients " in stdout  # a round's summary
    # The bar counted the replies as they came in.
    assert f"0/{SAMPLED} clients" in frames and f"{SAMPLED}/{SAMPLED} clients" in frames
    assert "final epsilon" in stdout
    for flower in ("DEPRECATED", "ConfigRecord", "FutureWarning", "aggregate_train"):
        assert flower not in stdout + stderr, flower
    logged = log.read_text()
    assert "DEPRECATED FEATURE" in logged and "ConfigRecord" in logged


def test_never_sampled_nodes_are_accounted_for_and_nothing_is_kept_for_them(many_clients_run):
    out, stdout, _ = many_clients_run
    report = json.loads((out / "privacy_report.json").read_text())
    listed = report["clients"]
    population = report["population"]
    assert population["nodes"] == NODES
    assert 1 <= len(listed) <= SAMPLED * ROUNDS
    assert population["in_report"] == len(listed)
    assert population["never_took_part"] == NODES - len(listed) >= NODES - SAMPLED * ROUNDS
    assert all(c["steps"] > 0 and c["epsilon"] > 0 for c in listed.values())
    # Only the devices that trained wrote anything: no ledger for a never-sampled one.
    ledgers = {p.name.split(".")[0] for p in (out / "client-ledgers").glob("*.json")}
    assert ledgers == set(listed)
    line = f"{NODES} nodes connected; {population['never_took_part']} nodes never took part"
    assert line in stdout
    assert line in (out / "privacy_report.md").read_text()
    # Verification recomputes the population from the audit log, like every other figure.
    result = verify_run(out)
    assert result["passed"], [c for c in result["checks"] if c["status"] == "FAIL"]


def test_a_process_holds_one_copy_of_the_data_for_all_its_clients():
    cfg = small_config("federation.num_clients=20")
    config_json = cfg.to_json()
    client_app._federation_split.cache_clear()
    shares = [client_app._load_partition(config_json, pid, 20)[0] for pid in range(20)]
    info = client_app._federation_split.cache_info()
    assert info.misses == 1 and info.hits == 19
    # Each client's slice is its own partition, as the unshared path computes it.
    for pid in (0, 7, 19):
        direct = client_partition(cfg, pid, 20)
        assert data_fingerprint(shares[pid]) == data_fingerprint(direct)


def test_a_device_calibrates_its_noise_once_and_reuses_the_plan_from_its_ledger(monkeypatch):
    cfg = small_config("federation.rounds=3")
    data = client_partition(cfg, 0, cfg.federation.num_clients)
    state = build_model(cfg.model, 10, seed=0).state_dict()
    policy = DevicePolicy.from_config(cfg)
    calls = []
    real = device_module.plan_for

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(device_module, "plan_for", counting)
    with tempfile.TemporaryDirectory() as folder:
        ledger = DeviceLedger(Path(folder), "0")

        def round_(r, run_cfg=cfg):
            return device_round(
                policy=DevicePolicy.from_config(run_cfg),
                ledger=ledger,
                cfg=run_cfg,
                run_id="run",
                server_round=r,
                global_state=state,
                data=data,
                data_fingerprint=data_fingerprint(data),
                seed_index=0,
            )

        first, second = round_(1), round_(2)
        assert first.kind == second.kind == "trained"
        assert len(calls) == 1  # the second round read the plan back
        assert second.privacy.noise_multiplier == first.privacy.noise_multiplier
        assert ledger.run("run", data_fingerprint(data))["plan_inputs"]["steps"] == 3 * (
            cfg.training.local_steps
        )
        # A request that changes what the plan depends on is calibrated again, and declined.
        changed = small_config("federation.rounds=3", "privacy.target_epsilon=1.5")
        assert round_(3, changed).code == "plan-changed" and len(calls) == 2
    assert policy.max_epsilon >= cfg.privacy.target_epsilon


def test_calibrations_started_from_their_neighbours_reach_the_target_cheaply(monkeypatch):
    """A process calibrating many clients of different sizes starts each from its
    neighbours' answers: after the first few, a calibration builds at most four coarse
    one-step PLDs and one fine one (the fine one is then reused for the client's epsilon
    after each round), and still ends within the tolerance below the target."""
    _CALIBRATED.clear()
    builds: list[float] = []
    built = privacy._one_step_pld.__wrapped__

    @functools.lru_cache(maxsize=256)
    def counted(sigma, q, neighboring, discretization):
        builds.append(discretization)
        return built(sigma, q, neighboring, discretization)

    monkeypatch.setattr(privacy, "_one_step_pld", counted)
    target, steps = 10.0, 40
    sizes = (100, 20, 200, 60, 61, 150, 30, 199, 45, 120, 80, 33)
    for i, n in enumerate(sizes):
        q = 8 / n
        builds.clear()
        sigma = calibrate_noise(PlannedBudget(target, 1e-5, q, steps, "pld", "replace_one"))
        eps = epsilon_of([(sigma, q, steps)], 1e-5, "pld", "replace_one")
        assert target * (1 - CALIBRATION_TOLERANCE) <= eps <= target, (n, eps)
        if i >= 3:  # neighbours on both sides, or near enough to extrapolate
            assert builds.count(privacy.PLD_DISCRETIZATION) == 1, (n, builds)
            assert builds.count(privacy.COARSE_DISCRETIZATION) <= 4, (n, builds)
        builds.clear()
        epsilon_of([(sigma, q, steps // 4)], 1e-5, "pld", "replace_one")  # after round 1
        assert builds == [], "the round's epsilon rebuilt the one-step PLD"
    assert len(_CALIBRATED[(target, 1e-5, steps, "pld", "replace_one")]) == len(sizes)


@pytest.mark.parametrize(
    ("cores", "client_cpus", "sampled", "actors"),
    [
        (16, 1.0, 4, 4),
        (2, 0.5, 3, 3),
        (2, 1.0, 4, 2),
        (2, 0.5, 4, 4),
        (3, 1.0, 40, 3),
        (1, 2.0, 4, 1),
        (2, 2.0, 3, 1),  # the suite's ONE_ACTOR: a tiny run's clients in turn
        (7, 0.1, 25, 25),  # 7 / 0.28 is 24.999... in floating point: the share is 0.2799
    ],
)
def test_the_simulation_starts_no_more_actors_than_a_round_trains(
    monkeypatch, cores, client_cpus, sampled, actors
):
    """Flower starts cores // (each actor's reserved cores) actors, and each one imports
    torch and Opacus before its first client: never more than the clients a round samples,
    never fewer than the cores allow."""
    from server.simulation import backend_config

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    cfg = small_config(
        "federation.num_clients=40",
        f"federation.fraction_train={sampled / 40}",
        f"federation.min_train_clients={min(sampled, 4)}",
        f"federation.client_cpus={client_cpus}",
    )
    assert cfg.federation.clients_per_round == sampled
    backend = backend_config(cfg)
    ray_cpus = backend["init_args"]["num_cpus"]
    # Flower's rule (flwr.simulation.ray_transport.ray_actor.pool_size_from_resources)
    assert int(ray_cpus / backend["client_resources"]["num_cpus"]) == actors
