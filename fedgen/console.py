"""What `fedgen simulate` shows while it runs.

fedgen's own lines (the plan, one summary line per round, warnings) go to the console,
with a live progress bar per round on a terminal (clients finished of those sampled,
elapsed time, the running epsilon) and plain lines elsewhere (CI, pipes). Everything else
the process or its children write (Flower's and Ray's logs, Python warnings) goes to a log
file in the run directory, and also to the console with `verbose`.

The library reports through the module functions `say`, `detail` and `round_summary`,
which print plainly when no `RunConsole` is open (`fedgen evaluate`, `flwr run`); the
server adapter feeds a `RoundProgress` with plain numbers. Nothing here imports Flower.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

__all__ = ["RoundProgress", "RunConsole", "say", "detail", "round_summary", "plural"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_active: RunConsole | None = None


def say(text: str, *, stderr: bool = False) -> None:
    """One of fedgen's own lines for the user (e.g. a warning, a resume notice)."""
    if _active is not None:
        _active.say(text)
    else:
        print(text, file=sys.stderr if stderr else sys.stdout, flush=True)


def detail(text: str) -> None:
    """A line of work in progress (the evaluator's epochs, for example): in the log, on
    the progress bar while a round runs, and on the console only when verbose."""
    if _active is not None:
        _active.detail(text)
    else:
        print(text, flush=True)


def round_summary(text: str, epsilon: float | None = None) -> None:
    """The one line a finished round leaves on the console; `epsilon`: the run's maximum
    after it, which the next round's bar starts from."""
    if _active is not None:
        _active.round_summary(text, epsilon)
    else:
        print(text, flush=True)


class RoundProgress(Protocol):
    """What the server adapter reports while a round's clients train."""

    def round_started(self, server_round: int, sampled: int) -> None: ...

    def replies(self, finished: int, epsilon: float | None) -> None: ...

    def replies_done(self) -> None: ...


class RunConsole:
    """Routes a simulation's output while open (a context manager): fedgen's lines and
    progress to the console, everything written to the process's stdout and stderr (file
    descriptors 1 and 2, so child processes and C extensions too) to `log_path`, and with
    `verbose` to the console as well.

    A terminal gets a live bar per round; anything else gets plain lines."""

    def __init__(self, log_path: Path, total_rounds: int, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.total_rounds = total_rounds
        self.verbose = verbose
        self._lock = threading.Lock()  # the log file is written from several threads
        self._log: IO[str] | None = None
        self._saved_fds: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._console: Any = None  # rich.console.Console on the original stdout
        self._progress: Any = None  # rich.progress.Progress, on a terminal only
        self._task: Any = None
        self._epsilon: float | None = None

    # --- opening and closing ----------------------------------------------------------
    def __enter__(self) -> RunConsole:
        global _active
        from rich.console import Console

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self._console = Console(file=terminal, highlight=False, soft_wrap=True)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = threading.Thread(
            target=self._drain, args=(read_fd,), name="fedgen-log", daemon=True
        )
        self._reader.start()
        if self.live:
            self._progress = self._make_progress()
            self._progress.start()
        _active = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        global _active
        _active = None
        if self._progress is not None:
            self._progress.stop()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed stream has nothing left
                stream.flush()
        assert self._saved_fds is not None
        for fd, saved in zip((1, 2), self._saved_fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        # The pipe reaches end of file once no process holds its writing end; a child
        # that outlives the run keeps it open, and the (daemon) reader keeps draining it.
        if self._reader is not None:
            self._reader.join(timeout=5)
        if error is not None:
            self.log_exception(error)
        self._console.file.flush()
        if self._reader is None or not self._reader.is_alive():  # else it still writes
            self._console.file.close()
            with self._lock:
                assert self._log is not None
                self._log.close()
                self._log = None

    @property
    def live(self) -> bool:
        """A live bar only on an interactive terminal: CI services that set FORCE_COLOR get
        colours but plain lines. rich's TTY_COMPATIBLE=1 with TTY_INTERACTIVE=1 forces the bar
        (tests)."""
        console = self._console
        forced = os.environ.get("TTY_INTERACTIVE") == "1"
        live = console.is_terminal and console.is_interactive
        return bool(live and (forced or console.file.isatty()))

    def log_exception(self, error: BaseException) -> None:
        """The traceback goes to the log; the console gets at most one line about it."""
        self._to_log("".join(traceback.format_exception(error)).rstrip())

    def _make_progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        return Progress(
            TextColumn("[bold]round {task.fields[round]}/{task.fields[rounds]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("clients"),
            _round_clock(),
            TextColumn("max epsilon {task.fields[epsilon]}"),
            TextColumn("[dim]{task.fields[status]}"),
            console=self._console,
            transient=True,
            refresh_per_second=4,  # a clock in seconds; spare the busy machine
            redirect_stdout=False,  # fds 1 and 2 already go to the log
            redirect_stderr=False,
        )

    # --- what is written --------------------------------------------------------------
    def _to_log(self, line: str) -> None:
        with self._lock:
            if self._log is not None:  # None once closed
                self._log.write(_ANSI.sub("", line) + "\n")
                self._log.flush()

    def _drain(self, read_fd: int) -> None:
        """Copy everything written to fds 1 and 2 into the log, line by line."""
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    self._foreign(raw.decode("utf-8", errors="replace").rstrip("\r"))
            if pending:
                self._foreign(pending.decode("utf-8", errors="replace"))

    def _foreign(self, line: str) -> None:
        self._to_log(line)
        if self.verbose:
            from rich.text import Text

            self._console.print(Text.from_ansi(line))

    def say(self, text: str) -> None:
        self._to_log(text)
        self._console.print(text, markup=False)

    def detail(self, text: str) -> None:
        self._to_log(text)
        if self.verbose:
            self._console.print(text, markup=False)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=_short(text))

    def round_summary(self, text: str, epsilon: float | None = None) -> None:
        if epsilon is not None:
            self._epsilon = epsilon
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._progress.refresh()  # else the line below is printed above a stale bar
            self._task = None
        self.say(text)

    # --- RoundProgress ------------------------------------------------------------------
    def round_started(self, server_round: int, sampled: int) -> None:
        if self._progress is None:
            self.say(
                f"[fedgen] round {server_round}/{self.total_rounds}: "
                f"training {plural(sampled, 'client')}"
            )
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(
            "round",
            total=sampled,
            round=server_round,
            rounds=self.total_rounds,
            epsilon=_epsilon(self._epsilon),
            status="clients training",
            started=time.monotonic(),
        )

    def replies(self, finished: int, epsilon: float | None) -> None:
        if epsilon is not None:
            self._epsilon = max(epsilon, self._epsilon or 0.0)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=finished, epsilon=_epsilon(self._epsilon))

    def replies_done(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status="server: aggregating, recording")


def _round_clock() -> Any:
    """Elapsed time of the whole round: rich's own clock stops once every client has
    replied, but the server's aggregation and evaluation are part of the round too."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RoundClock(ProgressColumn):
        def render(self, task: Any) -> Text:
            seconds = int(time.monotonic() - task.fields["started"])
            return Text(f"{seconds // 60}:{seconds % 60:02d}", style="progress.elapsed")

    return RoundClock()


def client_sort_key(cid: str) -> tuple[int, str]:
    """Clients in the order people count them: simulated ids by number, names after."""
    return (int(cid), "") if cid.isdigit() else (1 << 62, cid)


def plural(n: int, noun: str) -> str:
    """`1 round`, `2 rounds`: for nouns whose plural adds an s."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _epsilon(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _short(text: str, width: int = 60) -> str:
    text = text.removeprefix("[fedgen] ")
    return text if len(text) <= width else text[: width - 3] + "..."
