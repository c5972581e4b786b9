"""`federation.pooled_target` (the `mmd` model): what leaves a device is its noised
release and nothing more; the server sums the releases it accepts, keeps the sum across a
restart, and sends it back; each client fits that sum plus its own new release; a release
no honest client could send is rejected with its update."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from clients.app import train as client_train
from fedgen import embedding
from fedgen.config import ConfigError, load_config
from fedgen.models import build_model
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder, client_seed, plan_privacy
from fedgen.secure_random import SecureRandom
from server.strategy import build_strategy, restore_strategy_state, strategy_state

from .conftest import REPO
from .helpers import ONE_ACTOR
from .test_mmd import MMD, _client
from .test_training import _context, _train_message

POOLED = [
    *MMD,
    "federation.pooled_target=true",
    "privacy.reproducible_noise=true",  # the test redraws each client's noise
    "run.eval_every=100",  # about pooling, not sample quality
]


def _cfg(*extra: str):
    return load_config(None, [*POOLED, *extra])


def _train_round(cfg, weights, server_round, ledgers, pooled=None):
    replies = []
    for pid in range(cfg.federation.num_clients):
        msg = _train_message(cfg, weights, server_round, ledger_dir=ledgers)
        if pooled is not None:
            msg.content["pooled"] = ArrayRecord(
                {"sum": pooled[0], "count": torch.tensor([float(pooled[1])])}
            )
        replies.append(client_train(msg, _context(cfg, pid)))
    return replies


def _release(reply) -> torch.Tensor:
    return reply.content["release"].to_torch_state_dict()["sum"]


def _strategy(cfg, path, initial):
    strategy = build_strategy(cfg, RoundRecorder(cfg, RunDir.create(cfg, path)))
    strategy._sent = ArrayRecord(initial)  # what configure_train records of what it sent
    return strategy


def test_what_leaves_the_device_is_the_noised_release_the_accountant_covers(tmp_path):
    cfg = _cfg()
    initial = RoundRecorder(cfg, RunDir("/nonexistent")).initial_state()
    replies = _train_round(cfg, initial, 1, tmp_path / "ledgers")
    for pid, reply in enumerate(replies):
        assert set(reply.content) == {"arrays", "metrics", "privacy", "release"}
        model = build_model(cfg.model)
        model.load_state_dict(initial)
        images, labels = _client(cfg, pid)
        sums = embedding.embedding_sums(model, images, labels)
        plan = plan_privacy(cfg, len(images))
        std = embedding.release_std(plan.noise_multiplier, cfg.privacy.neighboring)
        rng = SecureRandom.from_seed(client_seed(cfg.seed, pid, 1))
        # Exactly the Gaussian mechanism's output at the planned noise, drawn from the
        # client's stream: never the un-noised sums.
        assert torch.equal(_release(reply), embedding.release(sums, std, rng))
        noise = _release(reply) - sums
        assert float(noise.std()) == pytest.approx(std, rel=0.1)


def test_the_server_pools_the_releases_and_each_client_fits_the_pool_plus_its_own(tmp_path):
    cfg = _cfg()
    initial = RoundRecorder(cfg, RunDir("/nonexistent")).initial_state()
    ledgers = tmp_path / "ledgers"
    replies = _train_round(cfg, initial, 1, ledgers)
    releases = [_release(r).clone() for r in replies]
    strategy = _strategy(cfg, tmp_path / "run", initial)
    arrays, _ = strategy.aggregate_train(1, replies)
    total, count = strategy.pooled
    assert count == 3 and torch.allclose(total, torch.stack(releases).sum(0), atol=1e-9)
    # A restarted server takes the pool back from its checkpointed state.
    restarted = _strategy(cfg, tmp_path / "run2", initial)
    restore_strategy_state(restarted, strategy_state(strategy))
    assert restarted.pooled[1] == 3 and torch.equal(restarted.pooled[0], total)

    second = _train_round(cfg, arrays.to_torch_state_dict(), 2, ledgers, (total, count))
    kept = sorted(ledgers.glob("*.optimizer.safetensors"))
    assert len(kept) == 3
    by_sum: dict = {}
    for path in kept:
        tensors = load_file(path)
        # Each device's target: the three releases of round 1 and its own of round 2.
        assert float(tensors[embedding.KEPT_COUNT]) == 4.0
        by_sum[path] = tensors[embedding.KEPT_SUM].double() - total
    mine = [_release(r) for r in second]
    for own in by_sum.values():
        assert any(torch.allclose(own, m, atol=1e-3) for m in mine)

    # A pooled target of another shape (a server building another model) fails the
    # round with a code, before anything is sent.
    bad = _train_round(_cfg(), initial, 3, tmp_path / "other", (total[:, :-1], count))
    assert all("failed" in r.content for r in bad)


def test_a_release_out_of_bounds_or_missing_is_rejected_and_the_rest_pooled(tmp_path):
    cfg = _cfg("federation.num_clients=4")
    initial = RoundRecorder(cfg, RunDir("/nonexistent")).initial_state()
    replies = _train_round(cfg, initial, 1, tmp_path / "ledgers")
    replies[0].content["release"] = ArrayRecord({"sum": _release(replies[0]) * 1e3})
    del replies[1].content["release"]
    strategy = _strategy(cfg, tmp_path / "run", initial)
    honest = [_release(r).clone() for r in replies[2:]]
    strategy.aggregate_train(1, replies)
    assert strategy.pooled[1] == 2
    assert torch.allclose(strategy.pooled[0], honest[0] + honest[1], atol=1e-9)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["failures"] == 2
    reasons = " ".join(line["failure_reasons"])
    assert "release of norm" in reasons and "records" in reasons


@pytest.mark.parametrize(
    ("setting", "named"),
    [("model.type=gan", "model.type=gan"), ("federation.strategy=fedmedian", "fedmedian")],
)
def test_a_pooled_target_is_refused_where_it_has_no_meaning_or_no_defence(setting, named):
    with pytest.raises(ConfigError) as err:
        _cfg(setting)
    assert "pooled_target" in str(err.value) and named in str(err.value)


def test_simulate_pools_the_targets_and_the_run_verifies(tmp_path):
    """A real federation (Flower's simulation engine): every device's final target holds
    the other rounds' pooled releases, and `fedgen verify` finds the server's record of
    each update (weights and release) equal to what the device's ledger says it sent."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(out)]
    for setting in [*POOLED, *ONE_ACTOR, "federation.rounds=2", "federation.min_train_clients=3",
                    "evaluation.samples=100", "evaluation.downstream=never",
                    f"evaluation.cache_dir={tmp_path / 'cache'}"]:  # fmt: skip
        cmd += ["--set", setting]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kept = list((out / "client-ledgers").glob("*.optimizer.safetensors"))
    assert len(kept) == 3
    for path in kept:  # round 1's three releases, pooled, and its own of round 2
        assert float(load_file(path)[embedding.KEPT_COUNT]) == 4.0
    server = load_file(out / "checkpoints" / "strategy_002.safetensors")
    assert float(server["pooled/count"]) == 6.0
    verify = subprocess.run([sys.executable, "-m", "fedgen.cli", "verify", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert verify.returncode == 0 and "verdict: PASS" in verify.stdout, verify.stdout[-2000:]
