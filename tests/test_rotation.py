"""`federation.sampling: rotation`: when a round trains fewer than all clients, they take
turns, each is trained in at most ceil(rounds x per round / clients) rounds, and its
privacy plan covers only those rounds, so it draws less noise for the same epsilon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from fedgen.card import build_card
from fedgen.config import load_config
from fedgen.privacy import epsilon_of
from fedgen.rounds import plan_privacy
from server.strategy import rotation_turn

from .conftest import REPO
from .helpers import ONE_ACTOR, SMALL

MMD_ROTATION = [
    *SMALL,
    "model.type=mmd",
    "model.embedding_frequencies=64",
    "training.mmd_samples_per_class=4",
    "training.local_steps=5",
    "federation.num_clients=4",
    "federation.min_train_clients=2",
    "federation.fraction_train=0.5",
    "federation.rounds=4",
    "federation.sampling=rotation",
]


def test_every_node_takes_the_same_number_of_turns_in_any_run_of_rounds():
    nodes = [907, 12, 55, 3, 640, 71, 8]  # ids as Flower hands them out: unordered
    for size in (1, 2, 3):
        for first, last in ((1, 7), (3, 12), (5, 5)):
            turns = Counter(
                n for r in range(first, last + 1) for n in rotation_turn(nodes, r, size)
            )
            counts = [turns[n] for n in nodes]
            assert max(counts) - min(counts) <= 1, (size, first, last, turns)
            assert sum(counts) == size * (last - first + 1)
    assert rotation_turn(nodes, 1, 2) == [3, 8] and rotation_turn(nodes, 2, 2) == [12, 55]
    assert rotation_turn(nodes, 4, 2) == [907, 3]  # wraps around
    assert rotation_turn([5, 1], 1, 4) == [1, 5]  # never more nodes than are connected


def test_the_plan_covers_a_clients_turns_only_and_so_draws_less_noise():
    random = load_config(None, [*MMD_ROTATION, "federation.sampling=random"])
    rotation = load_config(None, MMD_ROTATION)
    assert random.planned_steps == 4 and rotation.planned_steps == 2  # ceil(4 x 2 / 4)
    loose, tight = plan_privacy(random, 100), plan_privacy(rotation, 100)
    assert tight.noise_multiplier < loose.noise_multiplier
    # Each plan spends its whole target over its own steps, and no more.
    for plan in (loose, tight):
        eps = epsilon_of([(plan.noise_multiplier, 1.0, plan.planned_steps)], 1e-5, "pld",
                         "replace_one")  # fmt: skip
        assert eps == pytest.approx(2.0, rel=0.02) and eps <= 2.0 + 1e-9
    # Odd counts round up: 3 rounds of 3 of 4 clients hand out 9 turns, so 3 for some.
    odd = load_config(None, [*MMD_ROTATION, "federation.rounds=3",
                             "federation.min_train_clients=3"])  # fmt: skip
    assert odd.planned_steps == 3
    # Every client in every round: rotation changes nothing.
    everyone = load_config(None, [*MMD_ROTATION, "federation.fraction_train=1.0"])
    assert everyone.planned_steps == 4


def test_a_rotating_federation_trains_each_client_in_its_turns_and_reports_it(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(out)]
    for setting in [*MMD_ROTATION, *ONE_ACTOR, "run.eval_every=4", "evaluation.samples=100",
                    "evaluation.downstream=never", f"evaluation.cache_dir={tmp_path / 'cache'}"]:  # fmt: skip
        cmd += ["--set", setting]
    # Generous: a tiny federation's start-up on a busy 2-core machine, not a speed test.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 taking turns per round" in proc.stdout
    assert "2 releases planned per client" in proc.stdout
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["sampling"] == "rotation" and report["planned_steps"] == 2
    plan = plan_privacy(load_config(None, MMD_ROTATION), 30 * 10 // 4)
    assert len(report["clients"]) == 4
    for client in report["clients"].values():
        # Two turns each, at the noise planned for two releases.
        assert [h[1:] for h in client["history"]] == [[1.0, 2]]
        assert client["history"][0][0] == pytest.approx(plan.noise_multiplier, rel=1e-9)
        assert client["rounds_participated"] == 2
        assert client["epsilon"] <= 2.0 + 1e-9
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    log = (out / "simulation.log").read_text()
    assert "this client has done" not in log
    # Flower's log names its random sample; fedgen's line after it names the turn it used.
    assert all(f"rotation: round {r} trains its turn instead" in log for r in (1, 2, 3, 4))
    # The readable reports say the plan is the turns', not every round's.
    assert "every round it can be (clients take turns" in (out / "privacy_report.md").read_text()
    steps = dict(build_card(out)["privacy"]["facts"])["Steps"]
    assert (
        steps.startswith("4 rounds, clients taking turns") and "2 steps per client at most" in steps
    )
    verify = subprocess.run([sys.executable, "-m", "fedgen.cli", "verify", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert verify.returncode == 0 and "verdict: PASS" in verify.stdout, verify.stdout[-2000:]
