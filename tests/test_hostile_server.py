"""A hostile server against real devices: a SuperLink over TLS with SuperNode
authentication, two SuperNodes with their own data, policies and ledgers, and a ServerApp
(tests/hostile_app) that, after one honest round, asks them round after round to turn DP
off, raise delta, replay noise, grow the batch, raise the target, switch the neighbouring
relation and start a new run, each request to one device in turn (both get some). Every
request must be declined with its reason code, no update released, and each device's
lifetime ledger left as the honest round made it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedgen.policy import DECLINE_CODES
from tests.deployment import Deployment
from tests.test_device_data import write_folder

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink") is None, reason="Flower's deployment commands not installed"
)

APP = Path(__file__).resolve().parent / "hostile_app"
OVERRIDES = [
    "model.type=gan",
    "data.dataset=glyphs",
    "federation.num_clients=2",
    "federation.min_train_clients=2",
    "federation.rounds=3",
    "training.local_steps=3",
    "training.d_steps_per_g_step=1",
    "training.batch_size=12",
    "model.generator_channels=16",
    "model.discriminator_channels=8",
    "model.latent_dim=16",
    "model.groups=4",
    "privacy.target_epsilon=2.0",
    "device=cpu",
]
EXPECTED = {
    "dp-off": "dp-disabled",
    "raise-delta": "delta-mismatch",
    "reproducible-noise": "reproducible-noise",
    "bigger-batch": "plan-changed",
    "higher-target": "plan-changed",
    "add-remove": "neighboring-mismatch",
    "new-run": "budget-lifetime",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    dep = Deployment(root)
    ledgers = {}
    try:
        dep.start_superlink()
        for i, name in enumerate(("alpha", "beta")):
            dep.register(i)
            data = write_folder(root / f"{name}-src", per_class=6)
            np.savez(root / f"{name}.npz", images=data.images, labels=data.labels)
            ledgers[name] = root / f"ledger-{name}"
            dep.supernode(
                i,
                f"data-path='{root / f'{name}.npz'}' ledger-dir='{ledgers[name]}' "
                # Per run up to 4; over its lifetime 2.2: one honest run of 2.0 fits,
                # a second run on the same data does not.
                f"client-name='{name}' max-epsilon=4.0 lifetime-max-epsilon=2.2",
            ).start()
        out = root / "out"
        done = dep.run(
            f"overrides='{' '.join(OVERRIDES)}' out='{out}' nodes=2", timeout=900, app=APP
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        results_path = out / "hostile.json"
        assert results_path.is_file(), done.stdout[-3000:]
        yield json.loads(results_path.read_text()), ledgers
    finally:
        dep.stop()


def test_the_honest_round_trains_on_both_devices(hostile):
    results, _ = hostile
    assert [r["records"] for r in results["honest"]] == [["arrays", "metrics", "privacy"]] * 2


@pytest.mark.parametrize("attempt", sorted(EXPECTED))
def test_every_hostile_request_is_declined_with_its_code_and_releases_nothing(hostile, attempt):
    results, _ = hostile
    replies = results[attempt]
    assert len(replies) == 1  # each request goes to one of the two devices, in turn
    for reply in replies:
        assert reply["records"] == ["declined"], reply  # no arrays, no metrics
        assert reply["code"] == EXPECTED[attempt]
        assert reply["code"] in DECLINE_CODES


def test_the_lifetime_ledgers_hold_only_the_honest_round(hostile):
    results, ledgers = hostile
    # Both devices were asked hostile requests (and declined them, above).
    assert {r["client"] for name in EXPECTED for r in results[name]} == set(ledgers)
    for name, folder in ledgers.items():
        ledger = json.loads((folder / f"{name}.json").read_text())
        assert set(ledger["runs"]) == {"run-1"}  # the new run never started
        run = ledger["runs"]["run-1"]
        assert run["rounds"] == [1]
        assert sum(h[2] for h in run["history"]) == 3  # one round of 3 DP steps
        assert not (folder / "run-2").exists()
