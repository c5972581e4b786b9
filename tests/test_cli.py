import subprocess
import sys

from .conftest import REPO


def _fedgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedgen.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_bad_override_fails_cleanly_before_any_work(tmp_path):
    proc = _fedgen("simulate", "--set", "training.batch_size=-1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "training.batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing was started or written


def test_missing_data_fails_with_where_to_put_it(tmp_path):
    proc = _fedgen(
        "simulate", "--set", "data.dataset=mnist", "--set", f"data.root={tmp_path}",
        "--set", "data.download=false", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path) in proc.stderr and "FEDGEN_DATA_DIR" in proc.stderr


def test_report_of_a_non_run_says_so(tmp_path):
    proc = _fedgen("report", str(tmp_path))
    assert proc.returncode == 2 and "privacy_report.json" in proc.stderr


def test_library_does_not_import_flower():
    code = (
        "import sys, fedgen.config, fedgen.data, fedgen.models, fedgen.privacy, "
        "fedgen.training, fedgen.rounds, fedgen.reports, fedgen.cli; "
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
