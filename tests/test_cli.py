import ast
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
        "fedgen.training, fedgen.rounds, fedgen.reports, fedgen.cli, fedgen.ledger, fedgen.certs; "
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_opacus_leaves_no_root_log_handler_behind():
    """Opacus calls logging.basicConfig() on import; left in place, every line Flower logs
    would print twice. Each module that imports Opacus takes that handler off again."""
    code = (
        "import logging, fedgen.vqvae, fedgen.dp_sgd, fedgen.training, opacus; "
        "print(len(logging.getLogger().handlers))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def _imported(modules: str, watched: set[str]) -> list[str]:
    code = (
        f"import sys, {modules}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {watched!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip())


def test_reading_a_run_imports_neither_opacus_nor_the_accountant():
    """Commands that only read a run (sample, evaluate, the figures) start in about half
    the time without them, and a device that declines or answers a query replies without
    the training code: each loads only where it is used."""
    reading = "fedgen.reports, fedgen.evaluation, fedgen.plots, fedgen.models"
    assert _imported(reading, {"opacus", "dp_accounting"}) == []
    accounting = "fedgen.verify, fedgen.ledger, fedgen.device, clients.app"
    assert _imported(accounting, {"opacus"}) == []


def test_the_mmd_familys_round_imports_no_opacus():
    """The `mmd` family releases with its own Gaussian mechanism: its clients, and the
    server of a simulation, skip Opacus's import (about 2 CPU-seconds a process). The
    DP-SGD families import it where they use it."""
    mmd = "fedgen.rounds, fedgen.embedding, fedgen.training, server.simulation"
    assert _imported(mmd, {"opacus"}) == []
    # A VQ-VAE brings Opacus with it: its quantizer's grad sampler registers on import,
    # before any DP-SGD round can wrap the model.
    build = "fedgen.models.build_model(fedgen.config.load_config(None, ['model.type=vqvae']).model)"
    assert _imported(f"fedgen.config, fedgen.models; {build}", {"opacus"}) == ["opacus"]


def test_certs_make_a_chain_a_tls_client_accepts(tmp_path):
    import ssl

    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    proc = _fedgen("certs", str(tmp_path), "--supernodes", "2")
    assert proc.returncode == 0, proc.stderr
    # A real TLS handshake on loopback: the client trusts only the CA and checks the name.
    import socket
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        for name in ("localhost", "127.0.0.1"):
            threading.Thread(target=serve, daemon=True).start()
            raw = socket.create_connection(listener.getsockname(), timeout=10)
            with client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
    for key in ("ca.key", "server.key", "supernode-0", "supernode-1"):
        assert (tmp_path / key).stat().st_mode & 0o077 == 0, key  # private keys: owner only
        assert "PRIVATE KEY" not in proc.stdout  # paths are printed, never key material
    load_ssh_private_key((tmp_path / "supernode-1").read_bytes(), None)
    # A second run would replace working keys: refused unless asked.
    again = _fedgen("certs", str(tmp_path))
    assert again.returncode == 2 and "--overwrite" in again.stderr
