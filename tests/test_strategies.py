"""Every selectable Flower strategy aggregates real client replies, and the round's
bookkeeping (checkpoint, privacy report, metrics) is written."""

import json

import pytest
import torch
from flwr.app import ArrayRecord

from clients.app import train as client_train
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder
from fedgen.updates import max_weight_change
from server.strategy import build_strategy

from .helpers import small_config
from .test_training import _context, _train_message


@pytest.fixture
def replies():
    # Fresh replies per test: FedMedian and FedTrimmedAvg pop the arrays out of them.
    cfg = small_config()
    initial = RoundRecorder(cfg, RunDir("/nonexistent")).initial_state()
    msgs = [
        client_train(_train_message(cfg, initial, 1), _context(cfg, pid))
        for pid in range(cfg.federation.num_clients)
    ]
    return initial, msgs


STRATEGIES = ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_aggregates_and_records(tmp_path, replies, strategy):
    initial, msgs = replies
    cfg = small_config(
        f"federation.strategy={strategy}",
        "federation.trimmed_beta=0.3",
        "federation.min_train_clients=3",
        "run.eval_every=100",  # these tests are about aggregation, not sample quality
    )
    run = RunDir.create(cfg, tmp_path / "run")
    recorder = RoundRecorder(cfg, run)
    strat = build_strategy(cfg, recorder)
    strat._sent = ArrayRecord(initial)  # what configure_train records of the weights it sends
    if strategy == "fedadam":
        # What FedAdam's configure_train keeps of the weights it sent.
        strat.current_arrays = {k: a.numpy() for k, a in ArrayRecord(initial).items()}
    clients = [m.content["arrays"].to_torch_state_dict() for m in msgs]
    arrays, metrics = strat.aggregate_train(1, msgs)
    state = arrays.to_torch_state_dict()
    assert set(state) == set(initial)
    for key, value in state.items():
        assert torch.isfinite(value).all()
        if strategy != "fedadam":  # averages, medians and trimmed means stay within the clients'
            lo = torch.stack([c[key] for c in clients]).min(0).values
            hi = torch.stack([c[key] for c in clients]).max(0).values
            assert (value >= lo - 1e-6).all() and (value <= hi + 1e-6).all()
    assert metrics["epsilon"] == max(float(m.content["metrics"]["epsilon"]) for m in msgs)
    assert (run.checkpoints / "round_001.safetensors").is_file()
    report = json.loads((run.path / "privacy_report.json").read_text())
    assert set(report["clients"]) == {"0", "1", "2"}
    line = json.loads((run.path / "metrics.jsonl").read_text())
    assert line["round"] == 1 and line["clients"] == 3 and line["failures"] == 0


def test_server_optimiser_leaves_the_frozen_autoencoder_alone(tmp_path):
    """FedAdam's momentum from the autoencoder rounds must not move `vqvae.*` while the
    prior trains (clients return it unchanged; the server keeps what it sent)."""
    cfg = small_config(
        "model.type=vqvae", "model.vq_channels=8", "model.code_dim=4", "model.codebook_size=16",
        "model.prior_channels=16", "model.prior_layers=3", "federation.rounds=1",
        "federation.prior_rounds=1", "federation.strategy=fedadam",
        # The last round is always evaluated: a small one (this test is about aggregation)
        "evaluation.samples=100", "evaluation.downstream=never",
    )  # fmt: skip
    recorder = RoundRecorder(cfg, RunDir.create(cfg, tmp_path / "run"))
    strat = build_strategy(cfg, recorder)
    contexts = [_context(cfg, pid) for pid in range(cfg.federation.num_clients)]
    weights = recorder.initial_state()
    for server_round in (1, 2):
        sent = ArrayRecord(weights)
        strat._sent = sent  # what configure_train records of the weights it sends
        strat.current_arrays = {k: a.numpy() for k, a in sent.items()}
        msgs = [
            client_train(_train_message(cfg, weights, server_round, tmp_path / "ledgers"), c)
            for c in contexts
        ]
        arrays, _ = strat.aggregate_train(server_round, msgs)
        new = arrays.to_torch_state_dict()
        moved = [
            k for k in weights if k.startswith("vqvae.") and not torch.equal(new[k], weights[k])
        ]
        if server_round == 1:
            assert moved  # the autoencoder trains in its own rounds
        else:
            assert moved == []
            assert any(
                not torch.equal(new[k], weights[k]) for k in weights if k.startswith("prior.")
            )
        weights = new


def test_nan_and_scaled_updates_are_rejected_and_the_rest_aggregated(tmp_path, replies):
    initial, msgs = replies
    cfg = small_config("run.eval_every=100")
    bad = []
    for pid, poison in ((0, "nan"), (1, "scale")):
        reply = client_train(_train_message(cfg, initial, 1), _context(cfg, pid))
        state = reply.content["arrays"].to_torch_state_dict()
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value * float("nan") if poison == "nan" else value * 1e6
                if poison == "nan":
                    break  # one NaN tensor is enough
        reply.content["arrays"] = ArrayRecord(state)
        bad.append(reply)

    def aggregate(replies, name):
        run = RunDir.create(cfg, tmp_path / name)
        strat = build_strategy(cfg, RoundRecorder(cfg, run))
        strat._sent = ArrayRecord(initial)
        arrays, _ = strat.aggregate_train(1, replies)
        return arrays.to_torch_state_dict(), run

    clean, _ = aggregate(list(msgs), "clean")
    # Fresh copies of the good replies: aggregation may consume them.
    good = [
        client_train(_train_message(cfg, initial, 1), _context(cfg, pid))
        for pid in range(cfg.federation.num_clients)
    ]
    attacked, run = aggregate([*good, *bad], "attacked")
    for key, value in attacked.items():
        assert torch.isfinite(value).all()
        # Honest rounds move a weight by at most the configured bound, so the attacked
        # global model is within twice that of the one aggregated without the poison.
        assert (value - clean[key]).abs().max() <= 2 * max_weight_change(cfg, "gan"), key
    line = json.loads((run.path / "metrics.jsonl").read_text())
    assert line["clients"] == 5 and line["failures"] == 2  # privacy of all five recorded
    reasons = " ".join(line["failure_reasons"])
    assert "NaN or Inf" in reasons and "more than the" in reasons


def test_malformed_replies_are_rejected_without_stopping_the_server(tmp_path, replies):
    from flwr.app import ConfigRecord, MetricRecord

    initial, msgs = replies
    cfg = small_config("run.eval_every=100")
    broken = []
    for pid, damage in enumerate(["extra-record", "zero-examples", "no-privacy"]):
        reply = client_train(_train_message(cfg, initial, 1), _context(cfg, pid))
        if damage == "extra-record":
            reply.content["smuggled"] = ConfigRecord({"x": 1})
        elif damage == "zero-examples":
            metrics = dict(reply.content["metrics"])
            reply.content["metrics"] = MetricRecord({**metrics, "num-examples": 0})
        else:
            del reply.content["privacy"]
        broken.append(reply)
    run = RunDir.create(cfg, tmp_path / "run")
    strat = build_strategy(cfg, RoundRecorder(cfg, run))
    strat._sent = ArrayRecord(initial)
    arrays, _ = strat.aggregate_train(1, [*msgs, *broken])
    assert arrays is not None
    line = json.loads((run.path / "metrics.jsonl").read_text())
    assert line["failures"] == 3
    reasons = " ".join(line["failure_reasons"])
    assert "smuggled" in reasons and "num-examples 0" in reasons and "malformed" in reasons


def test_krum_refuses_a_round_too_small_for_its_tolerance(tmp_path, replies):
    initial, msgs = replies
    # f = 0 hostile clients: Krum's guarantee needs 2f + 3 = 3 updates; only 2 arrive.
    cfg = small_config(
        "federation.strategy=krum", "federation.min_train_clients=3", "run.eval_every=100"
    )
    run = RunDir.create(cfg, tmp_path / "run")
    strat = build_strategy(cfg, RoundRecorder(cfg, run))
    strat._sent = ArrayRecord(initial)
    with pytest.raises(RuntimeError, match="fewer than the 3 that krum needs"):
        strat.aggregate_train(1, msgs[:2])
    # The two clients that trained still have their spending on record.
    report = json.loads((run.path / "privacy_report.json").read_text())
    assert set(report["clients"]) == {"0", "1"}
