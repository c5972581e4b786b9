"""Test hooks: kill the whole process group at a named point of a round, or hold the
server before a round until a file exists.

`FEDGEN_TEST_KILL_AT=<point>:<round>` (for example `report:2`) makes `kill_point` send
SIGKILL to the process group of the calling process when the server reaches `<point>` of
round `<round>`: the same as a power cut or `kill -9` at that exact moment, but without
timing. `tests/test_kill_resume.py` uses it to prove that a run killed at any of these
points resumes to the same result. Unset (always, outside tests) it does nothing.

`FEDGEN_TEST_KILL_SIGNAL=INT` sends SIGINT to this process instead, as Ctrl-C would, and
holds the calling thread there, so that the run cannot finish before the interrupt is
handled.

Points, in the order a round reaches them (`fedgen.rounds.RoundRecorder.record`):
    replied     the clients' replies are in; nothing of the round is on disk
    checkpoint  the round's weights are half written (temporary file, not yet renamed)
    committed   weights and server state are on disk; nothing that claims the round yet
    report      the privacy report claims the round
    evaluation  the round's sample grid and quality figures exist, its metrics line not

`FEDGEN_TEST_HOLD_ROUND=<round>:<file>` makes the server wait, before round `<round>`
samples its clients, until `<file>` exists. `tests/test_deployment.py` restarts a
SuperNode in that pause, so the next round's message cannot go to the process it stops.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

__all__ = ["KILL_POINTS", "ENV_VAR", "SIGNAL_VAR", "HOLD_VAR", "kill_point", "hold_point"]

ENV_VAR = "FEDGEN_TEST_KILL_AT"
SIGNAL_VAR = "FEDGEN_TEST_KILL_SIGNAL"
HOLD_VAR = "FEDGEN_TEST_HOLD_ROUND"
KILL_POINTS = ("replied", "checkpoint", "committed", "report", "evaluation")


def kill_point(point: str, server_round: int) -> None:
    """SIGKILL this process group if `ENV_VAR` names `point` of `server_round`."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    named, _, at = wanted.partition(":")
    if named not in KILL_POINTS or not at.isdigit():
        raise ValueError(
            f"{ENV_VAR}={wanted!r} is not <point>:<round> with a point of {KILL_POINTS}; "
            "fix or unset it"
        )
    if (named, int(at)) != (point, server_round):
        return
    if os.environ.get(SIGNAL_VAR) == "INT":
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            # Started with SIGINT ignored (a background job, a pytest-xdist worker's
            # child): the interrupt would be lost and this thread held for ever.
            raise RuntimeError(f"{SIGNAL_VAR}=INT, but this process does not handle SIGINT")
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread
        threading.Event().wait()  # this thread goes no further
    os.killpg(os.getpgid(0), signal.SIGKILL)


def hold_point(server_round: int) -> None:
    """Wait until the file `HOLD_VAR` names exists, if it names `server_round`."""
    wanted = os.environ.get(HOLD_VAR)
    if not wanted:
        return
    at, _, path = wanted.partition(":")
    if not at.isdigit() or not path:
        raise ValueError(f"{HOLD_VAR}={wanted!r} is not <round>:<file>; fix or unset it")
    if int(at) != server_round:
        return
    while not Path(path).exists():
        time.sleep(0.1)
