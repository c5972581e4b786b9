"""Flower's Deployment Engine end to end, on loopback: a SuperLink over TLS with SuperNode
authentication, two SuperNodes as separate processes, each with its own data folder, and
the run submitted with `flwr run`. Nothing is simulated.

The federation trains the default family (`mmd`: a device keeps the running sum of its
releases between rounds, so a restart and a resume must keep it too; the GAN's client
code is the same ClientApp, exercised by the simulations). One three-round federation
serves every test here (it is the slow part):
- node "alpha" holds a folder of PNGs with one corrupt file, and a max-epsilon that
  allows two of the three rounds;
- node "beta" holds an .npz file and is stopped after its first round and started again,
  while the server holds round 2 (the test hook `FEDGEN_TEST_HOLD_ROUND`): otherwise the
  round's message could reach the process being stopped, and the round would wait out its
  whole timeout for a reply that never comes;
- node "gamma" holds only corrupt images, so it fails every round it is asked to train.

The server fixes the noise multiplier (the one calibrated for epsilon 4 over three rounds),
so alpha, whose own per-run maximum is lower, cannot recalibrate and declines round 3.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from fedgen.config import load_config
from fedgen.data import load_device_data
from fedgen.files import load_checkpoint
from fedgen.killpoints import HOLD_VAR
from fedgen.privacy import epsilon_of
from fedgen.rounds import plan_privacy
from tests.deployment import Deployment
from tests.test_device_data import write_folder

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink") is None, reason="Flower's deployment commands not installed"
)

OVERRIDES = [
    "model.type=mmd",  # one release per round: `local_steps_for` counts the accountant's steps
    "model.embedding_frequencies=64",
    "training.mmd_samples_per_class=4",
    "data.dataset=glyphs",
    "data.glyphs_per_class=20",
    "federation.min_train_clients=2",
    "federation.num_clients=2",
    "federation.rounds=3",
    "federation.round_timeout=300",
    "training.local_steps=4",
    "training.batch_size=16",
    "model.latent_dim=16",
    "model.groups=4",
    "privacy.target_epsilon=4.0",
    "device=cpu",
    "run.eval_every=3",
    "evaluation.samples=100",
    "evaluation.downstream=never",
    "evaluation.evaluator_epochs=1",
]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def server_saw(out, client: str, server_round: int) -> bool:
    """Whether the server has recorded `client`'s update of `server_round`."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return False
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return any(x["round"] == server_round and client in x["per_client"] for x in lines)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    cfg = load_config(None, OVERRIDES)
    alpha_data, beta_data = root / "alpha-images", root / "beta.npz"
    write_folder(alpha_data, per_class=6, corrupt=1)
    beta = write_folder(root / "beta-src", per_class=6)
    np.savez(beta_data, images=beta.images, labels=beta.labels)
    gamma_data = root / "gamma-images"
    (gamma_data / "4").mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (gamma_data / "4" / name).write_bytes(b"not an image")

    # alpha's own budget: enough for two rounds of the planned three, not for the third.
    plan = plan_privacy(cfg, len(load_device_data(alpha_data).data))
    steps = cfg.local_steps_for(cfg.stage(1))
    p = cfg.privacy
    two, three = (
        epsilon_of(
            [(plan.noise_multiplier, plan.sample_rate, k * steps)],
            p.delta,
            p.accountant,
            p.neighboring,
        )  # fmt: skip
        for k in (2, 3)
    )
    alpha_budget = (two + three) / 2
    overrides = [*OVERRIDES, f"privacy.noise_multiplier={plan.noise_multiplier!r}"]
    cfg = load_config(None, overrides)

    dep = Deployment(root)
    release = root / "release-round-2"
    dep.env[HOLD_VAR] = f"2:{release}"  # the ServerApp inherits the SuperLink's environment
    try:
        dep.start_superlink()
        for i in (0, 1, 2):
            dep.register(i)
        ledgers = {"alpha": root / "ledger-alpha", "beta": root / "ledger-beta"}
        alpha = dep.supernode(
            0,
            f"data-path='{alpha_data}' ledger-dir='{ledgers['alpha']}' client-name='alpha' "
            f"max-epsilon={alpha_budget} lifetime-max-epsilon=100",
        ).start()
        beta_config = f"data-path='{beta_data}' ledger-dir='{ledgers['beta']}' client-name='beta'"
        beta = dep.supernode(1, beta_config).start()
        dep.supernode(2, f"data-path='{gamma_data}' ledger-dir='{root / 'ledger-gamma'}'").start()
        out = root / "run"
        run_config = f"overrides='{' '.join(overrides)}' out='{out}'"

        result: dict = {}
        runner = threading.Thread(
            target=lambda: result.update(done=dep.run(run_config, timeout=480)), daemon=True
        )
        runner.start()
        # Stop beta once the server has its round-1 update (round 2 is held), start it
        # again, and let round 2 go once the new process has its node ID from the SuperLink.
        wait_for(lambda: server_saw(out, "beta", 1), 300, "beta's first round")
        beta.stop()
        restarted = dep.supernode(1, beta_config).start()
        wait_for(
            lambda: restarted.log.read_text().count("SuperNode ID:") == 2, 300, "beta's restart"
        )
        release.touch()
        runner.join(timeout=500)
        done = result.get("done")
        assert isinstance(done, subprocess.CompletedProcess), "flwr run did not return"
        yield {
            "cfg": cfg,
            "root": root,
            "out": out,
            "flwr_run": done,
            "ledgers": ledgers,
            "alpha_budget": alpha_budget,
            "gamma_data": gamma_data,
            "alpha": alpha,
            "beta": restarted,
            "deployment": dep,
        }
    finally:
        dep.stop()


def report(federation) -> dict:
    path = federation["out"] / "privacy_report.json"
    assert path.is_file(), federation["flwr_run"].stdout[-3000:] + federation["flwr_run"].stderr
    return json.loads(path.read_text())


def test_run_completes_with_epsilon_for_both_nodes(federation):
    manifest = json.loads((federation["out"] / "manifest.json").read_text())
    assert manifest["status"] == "completed", federation["flwr_run"].stdout[-3000:]
    clients = report(federation)["clients"]
    assert set(clients) == {"alpha", "beta"}
    for c in clients.values():
        assert 0 < c["epsilon"] <= federation["cfg"].privacy.target_epsilon
    assert (federation["out"] / "checkpoints" / "round_003.safetensors").is_file()


def _run_ledger(federation, name: str) -> dict:
    run_id = json.loads((federation["out"] / "manifest.json").read_text())["run_id"]
    ledger = json.loads((federation["ledgers"][name] / f"{name}.json").read_text())
    return ledger["runs"][run_id]


def test_restarted_node_accounts_for_all_its_rounds(federation):
    cfg = federation["cfg"]
    ledger = _run_ledger(federation, "beta")
    beta = report(federation)["clients"]["beta"]
    # Round 1 was before the restart; the ledger kept it, and later rounds added to it.
    assert ledger["rounds"] == [1, 2, 3]
    assert all("beta" in entry["epsilon"] for entry in report(federation)["rounds"])
    # The device's running sum of its releases (kept on its disk, never sent) survived the
    # restart: it counts every round the ledger has, not only those after the restart.
    kept = list(federation["ledgers"]["beta"].parent.rglob("beta*.optimizer.safetensors"))
    assert len(kept) == 1, kept
    assert int(load_checkpoint(kept[0])["release.count"].item()) == len(ledger["rounds"])
    steps = cfg.local_steps_for(cfg.stage(1)) * len(ledger["rounds"])
    assert sum(h[2] for h in ledger["history"]) == steps == beta["steps"]
    p = cfg.privacy
    fresh = epsilon_of(ledger["history"], p.delta, p.accountant, p.neighboring)
    assert ledger["epsilon"] == pytest.approx(fresh)
    assert beta["epsilon"] == pytest.approx(fresh)
    after_restart_only = epsilon_of(
        [
            (
                ledger["noise_multiplier"],
                ledger["sample_rate"],
                steps - cfg.local_steps_for(cfg.stage(1)),
            )
        ],
        p.delta,
        p.accountant,
        p.neighboring,
    )
    assert beta["epsilon"] > after_restart_only
    # No round waited on a reply from the stopped process.
    assert not any(
        f.startswith("beta") for e in report(federation)["rounds"] for f in e["failures"]
    )


def test_node_without_usable_data_fails_with_a_code_and_no_path(federation):
    rep = report(federation)
    assert set(rep["clients"]) == {"alpha", "beta"}  # gamma never trained
    for entry in rep["rounds"]:
        assert any(f.endswith(": data-error") for f in entry["failures"]), entry["failures"]
    # The folder is named in the device's own log, never in what the server holds.
    text = (federation["out"] / "privacy_report.json").read_text()
    text += (federation["out"] / "metrics.jsonl").read_text()
    assert str(federation["gamma_data"]) not in text and "gamma-images" not in text
    assert "gamma-images" in (federation["root"] / "supernode-2" / "supernode.log").read_text()


def test_node_declines_the_round_past_its_budget(federation):
    rep = report(federation)
    alpha = rep["clients"]["alpha"]
    assert alpha["declined_rounds"] == [3]
    assert alpha["rounds_participated"] == 2
    assert alpha["epsilon"] <= federation["alpha_budget"]
    declined = rep["rounds"][2]["declined"]
    assert [d["client_id"] for d in declined] == ["alpha"]
    assert declined[0]["code"] == "budget-run"
    # The round carried on with beta alone.
    assert list(rep["rounds"][2]["epsilon"]) == ["beta"]


def test_corrupt_file_is_skipped_and_counted(federation):
    lines = [json.loads(x) for x in (federation["out"] / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["skipped_files"] == 1  # alpha's broken0.png; beta's .npz has none
    assert report(federation)["clients"]["alpha"]["num_examples"] == 60


def test_resume_under_flwr_run_continues_the_devices_ledgers(federation):
    # Runs last: it rewrites the run directory. A server crash after round 2: round 3's
    # server files are gone, while beta had trained round 3 and alpha declined it.
    out = federation["out"]
    before = report(federation)["clients"]
    for name in ("server_003.json", "round_003.safetensors"):
        (out / "checkpoints" / name).unlink()
    done = federation["deployment"].run(f"resume='{out}'", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    after = report(federation)["clients"]
    # beta answered the re-sent round with the update it had kept; alpha declined again.
    assert {k: c["history"] for k, c in after.items()} == {
        k: c["history"] for k, c in before.items()
    }
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert "alpha" in lines[-1]["declined"]
