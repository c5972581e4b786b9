"""Start a real Flower deployment on loopback for tests: a SuperLink with TLS and SuperNode
authentication, SuperNodes as separate processes, runs submitted with `flwr run`.

Every process is started in its own session and killed with its whole group by `stop`;
ports are asked from the OS, so parallel test runs do not collide. FLWR_HOME points at a
temporary folder, so nothing touches the user's ~/.flwr."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedgen.certs import CertificateFiles, make_certificates

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class Process:
    args: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.args,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.log.parent,
                start_new_session=True,  # its own group: stop() takes its children too
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may outlive its leader (ClientApp/ServerApp subprocesses).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class Deployment:
    root: Path
    certs: CertificateFiles = field(init=False)
    port: int = field(init=False)
    env: dict[str, str] = field(init=False)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.root / "certs", supernodes=4)
        self.port = free_port()
        home = self.root / "flwr-home"
        home.mkdir()
        # The connection `flwr run`/`flwr supernode` use, as Flower 1.41 reads it.
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "fedgen"\n\n[superlink.fedgen]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n'
        )
        self.env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("FEDGEN_CACHE_DIR", str(self.root / "cache"))

    def start_superlink(self) -> Process:
        c = self.certs
        args = [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(c.ca_cert),
            "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--port", str(self.port),
        ]  # fmt: skip
        proc = Process(args, self.root / "superlink" / "superlink.log", self.env).start()
        self.processes.append(proc)
        assert proc.proc is not None
        wait_for_port(self.port, 60, proc.proc, proc.log)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env={**self.env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def register(self, index: int) -> None:
        out = self.flwr("supernode", "register", str(self.certs.supernode_keys[index][1]))
        assert out.returncode == 0, out.stdout + out.stderr

    def supernode(self, index: int, node_config: str) -> Process:
        """A SuperNode (not started) using key pair `index`."""
        args = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(self.certs.supernode_keys[index][0]),
            "--port", str(free_port()),
            "--node-config", node_config,
        ]  # fmt: skip
        proc = Process(args, self.root / f"supernode-{index}" / "supernode.log", self.env)
        self.processes.append(proc)
        return proc

    def run(self, run_config: str, timeout: float, app: Path = REPO) -> subprocess.CompletedProcess:
        """`flwr run` of an app (this repository's by default); returns when it finished."""
        return self.flwr("run", str(app), "fedgen", "--run-config", run_config, "--stream",
                         timeout=timeout)  # fmt: skip

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
