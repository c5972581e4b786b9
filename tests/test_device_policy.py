"""The device decides: fedgen's ClientApp, given Flower messages as a SuperNode delivers
them, with a deployed node config (its own data, ledger and privacy policy). The same
attempts run against real SuperNodes in tests/test_hostile_server.py; here each behaviour
is pinned down one at a time, in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from clients.app import train as client_train
from fedgen.models import build_gan
from fedgen.policy import DECLINE_CODES, DevicePolicy, PolicyError
from fedgen.privacy import epsilon_of

from .helpers import small_config, train_message
from .test_device_data import write_folder

HONEST = ["privacy.target_epsilon=2.0", "training.batch_size=12", "training.local_steps=3"]


def message(cfg, server_round: int, run_id: str = "run-1") -> Message:
    weights = build_gan(cfg.model, seed=0).state_dict()
    return train_message(cfg, weights, server_round, **{"run-id": run_id})


@pytest.fixture
def device(tmp_path):
    """A deployed device: 60 glyph images in an .npz, its ledger folder and its policy."""
    data = write_folder(tmp_path / "src", per_class=6)
    np.savez(tmp_path / "data.npz", images=data.images, labels=data.labels)
    ledger = tmp_path / "ledger"

    def context(**policy) -> Context:
        node = {
            "data-path": str(tmp_path / "data.npz"),
            "ledger-dir": str(ledger),
            "client-name": "alpha",
            "max-epsilon": 4.0,
            "lifetime-max-epsilon": 2.2,
            **policy,
        }
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    return context, ledger / "alpha.json"


def run_of(ledger_file, run_id="run-1") -> dict:
    return json.loads(ledger_file.read_text())["runs"][run_id]


HOSTILE = {
    "dp-disabled": (["privacy.enabled=false"], "run-1"),
    "delta-mismatch": (["privacy.delta=0.2"], "run-1"),
    "reproducible-noise": (["privacy.reproducible_noise=true"], "run-1"),
    "plan-changed": (["training.batch_size=48"], "run-1"),
    "neighboring-mismatch": (
        [
            "privacy.neighboring=add_remove",
            "privacy.accountant=rdp",
            "privacy.public_num_examples=50000",
        ],
        "run-1",
    ),  # fmt: skip
    "target-unreachable": (["privacy.target_epsilon=0.0001"], "run-1"),
    "budget-lifetime": ([], "run-2"),
}


@pytest.mark.parametrize("code", sorted(HOSTILE))
def test_device_declines_what_its_policy_forbids_and_releases_nothing(device, code):
    context, ledger_file = device
    ctx = context()
    honest = small_config(*HONEST)
    first = client_train(message(honest, 1), ctx)
    assert set(first.content.keys()) == {"arrays", "metrics", "privacy"}
    before = ledger_file.read_bytes()
    overrides, run_id = HOSTILE[code]
    server_round = 2 if run_id == "run-1" else 1
    reply = client_train(message(small_config(*HONEST, *overrides), server_round, run_id), ctx)
    assert set(reply.content.keys()) == {"declined"}
    assert reply.content["declined"]["code"] == code and code in DECLINE_CODES
    assert ledger_file.read_bytes() == before  # nothing spent, nothing recorded


def test_a_higher_target_from_the_server_changes_nothing_on_the_device(device):
    """The device calibrates for min(request, its own maximum): a raised target is a
    different plan mid-run (declined), and a first run above its maximum is capped."""
    context, ledger_file = device
    ctx = context(**{"lifetime-max-epsilon": 100.0, "max-epsilon": 3.0})
    greedy = small_config(*HONEST, "privacy.target_epsilon=50")
    reply = client_train(message(greedy, 1), ctx)
    history = json.loads(reply.content["privacy"]["history"])
    run = run_of(ledger_file)
    planned = epsilon_of([(run["noise_multiplier"], run["sample_rate"], run["planned_steps"])],
                         1e-5, "pld", "replace_one")  # fmt: skip
    assert 0.97 * 3.0 <= planned <= 3.0  # its own maximum, not the server's 50
    assert sum(h[2] for h in history) == 3


def test_accountant_and_public_size_must_match_a_device_on_add_remove(device):
    context, _ = device
    ctx = context(neighboring="add_remove", accountant="rdp", **{"public-num-examples": 60})
    base = [*HONEST, "privacy.neighboring=add_remove", "privacy.public_num_examples=60"]
    ok = client_train(message(small_config(*base, "privacy.accountant=rdp"), 1), ctx)
    assert "arrays" in ok.content
    # The real n never leaves under add/remove: the weight is the declared public size.
    assert ok.content["metrics"]["num-examples"] == 60
    pld = client_train(message(small_config(*base, "privacy.accountant=pld"), 2), ctx)
    assert pld.content["declined"]["code"] == "accountant-mismatch"
    other = client_train(message(small_config(*HONEST, "privacy.neighboring=add_remove",
                                              "privacy.public_num_examples=6000",
                                              "privacy.accountant=rdp"), 2), ctx)  # fmt: skip
    assert other.content["declined"]["code"] == "public-size-mismatch"


def test_an_impossible_delta_is_refused_on_the_device(device):
    context, _ = device
    ctx = context(delta=0.05)  # 1/n = 1/60 < 0.05
    reply = client_train(message(small_config(*HONEST, "privacy.delta=0.05"), 1), ctx)
    assert reply.content["declined"]["code"] == "delta-too-large"


def test_two_concurrent_train_calls_leave_the_ledger_equal_to_what_was_trained(device):
    """Two overlapping messages for one device: the lock makes the second read what the
    first wrote. Different rounds: both train, one after the other. The same round twice:
    one trains, the other sends the same update again (nothing spent twice)."""
    context, ledger_file = device
    ctx = context(**{"lifetime-max-epsilon": 100.0})
    cfg = small_config(*HONEST)
    replies: dict[str, Message] = {}

    def call(name: str, server_round: int) -> None:
        replies[name] = client_train(message(cfg, server_round), ctx)

    threads = [threading.Thread(target=call, args=(f"r{r}", r)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = sorted(
        sum(h[2] for h in json.loads(r.content["privacy"]["history"])) for r in replies.values()
    )
    assert steps == [3, 6]  # the second continued the first's history
    assert sum(h[2] for h in run_of(ledger_file)["history"]) == 6
    assert run_of(ledger_file)["rounds"] == [1, 2]

    replies.clear()
    threads = [threading.Thread(target=call, args=(f"same{i}", 3)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = (replies[k] for k in ("same0", "same1"))
    assert a.content["privacy"]["history"] == b.content["privacy"]["history"]
    wa, wb = (r.content["arrays"].to_torch_state_dict() for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same update, sent twice
    assert sum(h[2] for h in run_of(ledger_file)["history"]) == 9


def test_a_failure_reaches_the_server_as_a_code_without_paths(tmp_path):
    folder = tmp_path / "secret-patient-folder"
    (folder / "4").mkdir(parents=True)
    (folder / "4" / "scan-of-jane-doe.png").write_bytes(b"not an image")
    node = {"data-path": str(folder), "ledger-dir": str(tmp_path / "ledger"), "client-name": "c"}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    reply = client_train(message(small_config(*HONEST), 1), ctx)
    assert set(reply.content.keys()) == {"failed"}
    record = dict(reply.content["failed"])
    assert record == {"client-id": "c", "code": "data-error"}
    assert "jane" not in json.dumps(record) and "secret" not in json.dumps(record)


def test_a_device_without_a_name_gets_a_random_one_not_a_hash_of_its_data(tmp_path):
    data = write_folder(tmp_path / "src", per_class=6)
    np.savez(tmp_path / "d.npz", images=data.images, labels=data.labels)
    names = []
    for i in range(2):
        node = {"data-path": str(tmp_path / "d.npz"), "ledger-dir": str(tmp_path / f"l{i}")}
        ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        reply = client_train(message(small_config(*HONEST), 1), ctx)
        names.append(str(reply.content["privacy"]["client-id"]))
    assert names[0] != names[1]  # same data, different devices: nothing derived from data
    assert all(n.startswith("device-") for n in names)


def test_policy_file_and_node_config_compose(tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("max-epsilon: 3\nlifetime-max-epsilon: 9\nmin-noise-multiplier: 0.5\n")
    policy = DevicePolicy.from_node_config({"privacy-policy": str(policy_file), "max-epsilon": 2})
    assert policy.max_epsilon == 2.0 and policy.lifetime_max_epsilon == 9.0
    assert policy.min_noise_multiplier == 0.5
    # Left unset, the lifetime maximum is the per-run one: more runs need the owner's say.
    assert DevicePolicy.from_node_config({"max-epsilon": 3}).lifetime_max_epsilon == 3.0
    policy_file.write_text("max-epsilonn: 2\n")  # a typo must not fall back to a default
    with pytest.raises(PolicyError, match="unknown key"):
        DevicePolicy.from_node_config({"privacy-policy": str(policy_file)})
    policy_file.write_text("neighboring: add_remove\n")
    with pytest.raises(PolicyError, match="public-num-examples"):
        DevicePolicy.from_node_config({"privacy-policy": str(policy_file)})


def test_fedgen_report_on_a_ledger_folder_shows_each_run_and_the_lifetime(device):
    context, ledger_file = device
    ctx = context(**{"lifetime-max-epsilon": 100.0})
    for run_id in ("run-1", "run-2"):
        client_train(message(small_config(*HONEST), 1, run_id), ctx)
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "report", str(ledger_file.parent)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(ledger_file.read_text())["runs"]
    one = epsilon_of(runs["run-1"]["history"], 1e-5, "pld", "replace_one")
    both = epsilon_of(
        runs["run-1"]["history"] + runs["run-2"]["history"], 1e-5, "pld", "replace_one"
    )
    assert f"run run-1: epsilon {one:.4f}" in proc.stdout
    assert f"lifetime: epsilon {both:.4f} over 2 runs" in proc.stdout
    assert both > one
