"""Faults a long federation meets: corrupt files, bad config values."""

import pytest
import torch

from fedgen.files import CheckpointError, write_atomic
from fedgen.reports import RunDir

from .helpers import small_config


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((4, 3), value), "a.steps": torch.arange(3)}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage, capsys):
    run = RunDir.create(small_config(), tmp_path / "run")
    run.save_checkpoint(1, _weights(1.0))
    latest = run.save_checkpoint(2, _weights(2.0))
    raw = bytearray(latest.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # one byte of tensor data: the file still parses
    else:
        raw = raw[: len(raw) // 2]
    latest.write_bytes(bytes(raw))

    round_, state = run.checkpoint()
    assert round_ == 1 and torch.equal(state["a.weight"], torch.full((4, 3), 1.0))
    assert "round_002" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="round_002"):
        run.checkpoint(2)  # asked for by number: an error, not a silent substitute


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "file.bin"
    write_atomic(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedgen.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_intact_checkpoint_round_trips(tmp_path):
    run = RunDir.create(small_config(), tmp_path / "run")
    run.save_checkpoint(3, _weights(0.5))
    round_, state = run.checkpoint()
    assert round_ == 3 and torch.equal(state["a.steps"], torch.arange(3))
    assert not list(run.checkpoints.glob(".*"))  # no temporary file left behind


# ---- property-based: every invalid config gives a clean error --------------------------

import traceback  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedgen.config import ConfigError, load_config  # noqa: E402
from fedgen.data import DataError  # noqa: E402
from fedgen.models import build_model  # noqa: E402
from fedgen.rounds import preflight  # noqa: E402

KEYS = [
    "federation.num_clients", "federation.rounds", "federation.min_train_clients",
    "federation.min_replies", "federation.fraction_train", "federation.partition",
    "federation.dirichlet_alpha", "federation.strategy", "federation.malicious_clients",
    "training.local_steps", "training.d_steps_per_g_step", "training.batch_size",
    "training.physical_batch_size", "training.lr_discriminator", "model.latent_dim",
    "model.groups", "model.generator_channels", "privacy.target_epsilon", "privacy.delta",
    "privacy.max_grad_norm", "privacy.noise_multiplier", "privacy.accountant",
    "privacy.enabled", "data.num_examples", "seed", "device", "no_such.key",
]  # fmt: skip
VALUES = st.one_of(
    st.integers(-5, 5),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "abc", "iid", "dirichlet", "fedavg", "krum", "rdp", "prv", "null",
                     "true", "[1, 2]", "{a: 1}", "1e-300", "-0"]),
)  # fmt: skip
BASE = ["model.type=gan", "data.dataset=glyphs", "data.glyphs_per_class=12", "device=cpu"]


def _raised_in_fedgen(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "/fedgen/" in frames[-1].filename


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_any_config_value_gives_a_clean_error_or_a_usable_config(pairs):
    overrides = [*BASE, *(f"{k}={v}" for k, v in pairs)]
    try:
        cfg = load_config(None, overrides)
        preflight(cfg)
        build_model(cfg.model, 10)
    except ConfigError as err:
        assert str(err).strip()
    except (DataError, ValueError) as err:
        # Our own checks, with their message; not an error from deep in torch or Opacus.
        assert str(err).strip() and _raised_in_fedgen(err), traceback.format_exc()


PLAUSIBLE = st.fixed_dictionaries(
    {
        "federation.num_clients": st.sampled_from([1, 2, 3, 10, 50, 200]),
        "federation.partition": st.sampled_from(["iid", "dirichlet", "shards"]),
        "federation.dirichlet_alpha": st.sampled_from([0.001, 0.5, 100]),
        "training.batch_size": st.sampled_from([1, 8, 16, 64, 500]),
        "training.local_steps": st.sampled_from([1, 10, 1000, 100000]),
        "privacy.target_epsilon": st.sampled_from([1e-6, 0.01, 1, 10, 1e6]),
        "privacy.delta": st.sampled_from([1e-12, 1e-5, 0.1, 0.9]),
        "privacy.noise_multiplier": st.sampled_from(["null", 0.0, 0.1, 50]),
    }
)


@settings(max_examples=40, deadline=None)
@given(PLAUSIBLE)
def test_plausible_but_impossible_setups_fail_before_training_with_the_fix(values):
    # Values each valid alone whose combination may not be: clients with no data, a batch
    # larger than a client's data, an unreachable epsilon, a delta of 1/n or more.
    overrides = [
        *BASE,
        "federation.min_train_clients=1",
        "training.d_steps_per_g_step=1",
        *(f"{k}={v}" for k, v in values.items()),
    ]
    try:
        cfg = load_config(None, overrides)
        sizes, plan, notices = preflight(cfg)
    except ConfigError as err:
        assert str(err).strip()
        return
    except (DataError, ValueError) as err:
        assert str(err).strip() and _raised_in_fedgen(err), traceback.format_exc()
        return
    if cfg.privacy.enabled and cfg.privacy.noise_multiplier is None:
        assert plan.noise_multiplier > 0
    # A delta of at least 1/n is refused (ValueError above), never run with a warning.
    assert not (cfg.privacy.enabled and cfg.privacy.delta >= 1 / min(sizes))


# ---- failing and silent clients ---------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from .conftest import REPO  # noqa: E402
from .faulty_simulation import ROUND_TIMEOUT  # noqa: E402


def test_a_crashing_and_a_late_client_leave_the_run_complete_and_fully_counted(tmp_path):
    from fedgen.privacy import epsilon_of

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faulty_simulation", str(out)],
        capture_output=True,
        text=True,
        timeout=2400,  # start-up (at most the first round's 1200 s) and round 2's timeout
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert [x["failures"] for x in lines] == [0, 2, 0]
    reasons = lines[1]["failure_reasons"]
    # A crash reaches the server as Flower's error code, never the exception's text.
    assert any(r.startswith("1 (node") and "flower-error" in r for r in reasons), reasons
    assert not any("injected" in r for r in reasons), reasons
    assert any(f"no reply within {ROUND_TIMEOUT:g}s" in r for r in reasons), reasons
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["rounds"][1]["failures"] == reasons
    assert sorted(report["rounds"][1]["epsilon"]) == ["0", "3"]
    assert sorted(report["rounds"][2]["epsilon"]) == ["0", "1", "2", "3"]
    # Partition 2 trained round 2 after the server gave up on it: its next reply carried
    # that round, and the report counts every step it trained, as its own ledger does.
    steps = 4  # training.local_steps of tests.helpers.SMALL
    for pid in range(4):
        ledger = json.loads((out / "client-ledgers" / f"{pid}.json").read_text())
        (run,) = ledger["runs"].values()
        client = report["clients"][str(pid)]
        assert client["history"] == run["history"], pid
        assert client["provisional"] == [] and client["anomalies"] == [], client
        fresh = epsilon_of(run["history"], 1e-5, "pld", "replace_one")
        assert client["epsilon"] == pytest.approx(fresh)
    # Partition 1 crashed in round 2: provisional until the end-of-run tally settled it.
    assert report["clients"]["1"]["tally"] == "collected"
    assert report["clients"]["1"]["steps"] == 2 * steps
    late = json.loads((out / "client-ledgers" / "2.json").read_text())
    (run,) = late["runs"].values()
    assert run["rounds"] == [1, 2, 3] and sum(h[2] for h in run["history"]) == 3 * steps


# ---- resuming with a changed config -------------------------------------------------------

from fedgen.config import resumable_config  # noqa: E402


def test_resume_refuses_unsound_changes_and_names_them(tmp_path):
    saved = small_config()
    (tmp_path / "config.yaml").write_text(saved.to_yaml())
    assert resumable_config(tmp_path, None) == saved
    safe = small_config("run.eval_every=3", "evaluation.samples=500", "federation.round_timeout=9")
    assert resumable_config(tmp_path, safe) == safe
    for setting, named in [
        ("model.latent_dim=8", "model.latent_dim: 16 -> 8"),
        ("privacy.target_epsilon=4", "privacy.target_epsilon"),
        ("federation.rounds=9", "federation.rounds: 3 -> 9"),
        ("data.glyphs_per_class=40", "data.glyphs_per_class"),
    ]:
        with pytest.raises(ConfigError, match="cannot resume") as err:
            resumable_config(tmp_path, small_config(setting))
        assert named in str(err.value)
