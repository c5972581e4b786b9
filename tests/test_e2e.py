"""End to end: `fedgen simulate` runs a real Flower simulation (Ray) on a slice of MNIST."""

import json
import subprocess
import sys

import pytest
import yaml

from fedgen.privacy import epsilon_of

from .conftest import REPO
from .helpers import ONE_ACTOR

ROUNDS, CLIENTS, LOCAL_STEPS = 2, 3, 6
# Small but real quality evaluation: the evaluator trains on the run's 1500 images.
EVALUATION = [
    "evaluation.samples=300", "evaluation.downstream_examples=400",
    "evaluation.downstream_epochs=2", "evaluation.evaluator_epochs=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def evaluator_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluators")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_dir, evaluator_cache):
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = [
        sys.executable, "-m", "fedgen.cli", "simulate", str(REPO / "configs" / "mnist_gan.yaml"),
        "--out", str(out),
        "--set", f"data.root={mnist_dir}",
        "--set", "data.num_examples=1500",
        "--set", f"federation.num_clients={CLIENTS}",
        "--set", f"federation.min_train_clients={CLIENTS}",
        "--set", f"federation.rounds={ROUNDS}",
        "--set", f"training.local_steps={LOCAL_STEPS}",
        "--set", "training.d_steps_per_g_step=3",
        "--set", "training.batch_size=32",
        "--set", "model.generator_channels=16",
        "--set", "model.discriminator_channels=8",
        "--set", "model.groups=4",
        "--set", "run.eval_every=1",
        "--set", "device=cpu",
        "--set", f"evaluation.cache_dir={evaluator_cache}",
    ]  # fmt: skip
    for setting in [*EVALUATION, *ONE_ACTOR]:
        cmd += ["--set", setting]
    # A guard against a hung run only: far above its minutes on a busy 2-core machine.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final epsilon" in proc.stdout and str(out) in proc.stdout
    return out


def test_run_directory_holds_every_file(run_dir):
    for name in (
        "config.yaml", "manifest.json", "metrics.jsonl", "privacy_report.json",
        "privacy_report.md", "privacy_epsilon.png", "quality.png",
    ):  # fmt: skip
        assert (run_dir / name).is_file(), name
    for r in range(1, ROUNDS + 1):
        assert (run_dir / "checkpoints" / f"round_{r:03d}.safetensors").is_file()
        assert (run_dir / "samples" / f"round_{r:03d}.png").is_file()
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["federation"]["num_clients"] == CLIENTS  # every key, resolved
    assert resolved["privacy"]["accountant"] == "pld"
    assert resolved["privacy"]["neighboring"] == "replace_one"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("fedgen", "torch", "opacus", "flwr", "seed", "start_time", "end_time"):
        assert manifest[key] not in (None, ""), key
    assert manifest["flwr"].startswith("1.41") and manifest["status"] == "completed"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, ROUNDS + 1))
    assert all(x["clients"] == CLIENTS and x["round_seconds"] > 0 for x in lines)
    assert all(x["g_loss"] is not None and x["d_loss_fake"] is not None for x in lines)
    # The server measured quality every round, and downstream accuracy after the last.
    for x in lines:
        assert x["eval"]["frechet_distance"] > 0 and 0 <= x["eval"]["label_consistency"] <= 1
        assert x["eval"]["frechet_generated_samples"] == 300
    assert "downstream_accuracy" not in lines[0]["eval"]
    assert 0 <= lines[-1]["eval"]["downstream_accuracy"] <= 1


def test_privacy_report_is_cumulative_and_recomputable(run_dir):
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["accountant"] == "pld" and report["delta"] == 1e-5
    assert report["neighboring"] == "replace_one"
    assert report["target_epsilon"] == 10.0
    assert set(report["clients"]) == {str(i) for i in range(CLIENTS)}
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    for cid, client in report["clients"].items():
        per_round = [r["epsilon"][cid] for r in report["rounds"]]
        assert 0 < per_round[0] <= per_round[-1] <= report["target_epsilon"]
        assert all(a <= b for a, b in zip(per_round, per_round[1:], strict=False))
        assert sum(h[2] for h in client["history"]) == ROUNDS * LOCAL_STEPS
        fresh = epsilon_of(
            [tuple(h) for h in client["history"]], report["delta"], "pld", "replace_one"
        )
        assert client["epsilon"] == pytest.approx(fresh, rel=1e-12)
        assert client["reported_epsilon"] == pytest.approx(fresh, rel=1e-9)
        assert client["num_examples"] == 1500 // CLIENTS
    assert report["max_epsilon"] == max(c["epsilon"] for c in report["clients"].values())


def test_report_command_prints_the_table(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "report", str(run_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert f"{report['max_epsilon']:.4f}" in proc.stdout
    assert all(f"{c['epsilon']:.4f}" in proc.stdout for c in report["clients"].values())


def test_sample_grid_has_one_row_per_class(run_dir):
    from PIL import Image

    img = Image.open(run_dir / "samples" / f"round_{ROUNDS:03d}.png")
    # 10 rows and 8 columns of 28px cells with 2px gaps, scaled by 2.
    assert img.size == (2 * (8 * 30 + 2), 2 * (10 * 30 + 2))


def test_sample_command_works_for_the_gan(run_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "gan.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "sample", str(run_dir), "--n", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (2 * (3 * 30 + 2), 2 * (10 * 30 + 2))  # 10 classes x 3


def test_evaluate_command_writes_every_metric(run_dir, evaluator_cache, capsys):
    from fedgen.cli import main

    out = run_dir / "evaluation.json"
    sets = [*EVALUATION, f"evaluation.cache_dir={evaluator_cache}"]
    assert main(["evaluate", str(run_dir), *sum((["--set", s] for s in sets), [])]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    for key in (
        "evaluator_test_accuracy", "frechet_distance", "label_consistency",
        "downstream_accuracy", "downstream_selected_epoch", "downstream_holdout_accuracy",
    ):  # fmt: skip
        assert m[key] is not None, key
    assert m["frechet_generated_samples"] == 300 and m["downstream_train_examples"] == 360
    printed = capsys.readouterr().out
    assert f"{m['downstream_accuracy']:.4f}" in printed and "Inception FID" in printed
    assert result["round"] == ROUNDS and result["clients"] == CLIENTS
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert result["privacy"]["max_epsilon"] == pytest.approx(report["max_epsilon"])
    assert result["privacy"]["delta"] == 1e-5 and result["privacy"]["accountant"] == "pld"
    # The evaluator the server trained during the run was reused, not trained again.
    assert len(list(evaluator_cache.glob("evaluator-*.safetensors"))) == 1
    # An earlier checkpoint is evaluated on request, with the epsilon spent by then.
    early = run_dir / "early.json"
    args = ["evaluate", str(run_dir), "--checkpoint", "1", "--out", str(early)]
    assert main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    first = json.loads(early.read_text())
    assert first["round"] == 1
    assert first["privacy"]["max_epsilon"] < result["privacy"]["max_epsilon"]
