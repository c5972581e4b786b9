"""Flower ServerApp: runs the configured strategy for the configured rounds and keeps the
run directory (checkpoints, samples, metrics, privacy report) current after each round.

Under `flwr run .` the run config (pyproject.toml, `--run-config`) names the experiment:
`config` (a YAML path, absolute or relative to this app; empty: built-in quickstart),
`overrides` (space-separated `key.sub=value`) and `out` (run directory; empty: under
`run.out_dir`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgen.config import FedgenConfig, load_config, load_run_config, resumable_config
from fedgen.console import RoundProgress, plural, say
from fedgen.files import write_atomic
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder
from server.strategy import build_strategy, restore_strategy_state, tally_report

APP_ROOT = Path(__file__).resolve().parents[1]


def config_from_run_config(run_config: dict) -> tuple[FedgenConfig, str | None]:
    path = str(run_config.get("config", "") or "")
    if path and not Path(path).is_absolute():
        path = str(APP_ROOT / path)
    overrides = str(run_config.get("overrides", "") or "").split()
    out = str(run_config.get("out", "") or "") or None
    return load_config(path or None, overrides), out


def _overrides(run_config: dict) -> bool:
    return bool(
        str(run_config.get("config", "") or "") or str(run_config.get("overrides", "") or "")
    )


def run_federation(
    grid: Grid,
    cfg: FedgenConfig,
    run_dir: RunDir,
    resume: bool = False,
    progress: RoundProgress | None = None,
) -> None:
    """Run every round of the experiment, or, with `resume`, the rounds after the last
    one `run_dir` holds intact; `progress` hears of each round's replies as they arrive."""
    recorder = RoundRecorder(cfg, run_dir)
    first_round, weights = 1, recorder.initial_state()
    strategy_tensors: dict = {}
    if resume:
        last, saved, state, strategy_tensors = run_dir.resume_point()
        # Round 0: stopped before a round was committed; round 1 is sent again.
        weights = saved or weights
        recorder.restore(state, run_dir.saved_privacy_clients(), saved or None)
        first_round = last + 1
        say(
            f"[fedgen] resuming {run_dir.path} after round {last}"
            if last
            else f"[fedgen] resuming {run_dir.path} from its first round (none was completed)"
        )
    strategy = build_strategy(cfg, recorder, first_round)
    restore_strategy_state(strategy, strategy_tensors)
    run_dir.write_manifest(cfg)
    if run_dir.finish_if_done(cfg, first_round - 1):
        return
    train_config = {
        "fedgen-config": cfg.to_json(),
        # Devices key their privacy ledgers by the run id.
        "run-id": run_dir.run_id,
        # Simulated clients keep their ledgers here (a stand-in for each device's disk);
        # real devices use the ledger-dir of their own node config instead.
        "sim-ledger-dir": str(run_dir.path / "client-ledgers"),
    }
    fed = cfg.federation
    grid = FirstRoundTimeout(grid, fed.first_round_timeout or fed.round_timeout, progress)
    try:
        strategy.start(
            grid=grid,  # type: ignore[arg-type]
            initial_arrays=ArrayRecord(weights),
            num_rounds=cfg.total_rounds - first_round + 1,
            timeout=cfg.federation.round_timeout,
            # Clients validate the config with the same schema: one source for every setting.
            train_config=ConfigRecord(train_config),
        )
        collect_tallies(
            grid, recorder, strategy.node_of, train_config, cfg.federation.round_timeout
        )
    except BaseException:
        run_dir.finish(cfg, status="failed")
        raise
    run_dir.finish(cfg, status="completed")


class FirstRoundTimeout:
    """The grid, with a timeout of its own for the first exchange of this process, and
    with each training round's replies counted as they arrive when given a `progress`.

    Flower's `Strategy.start` gives every round one timeout, but the first round also waits
    for every client to start (on a busy machine, minutes), so a timeout right for later
    rounds would fail it, and one right for it would make every later round wait as long
    for a client that is gone."""

    def __init__(
        self, grid: Grid, first_timeout: float, progress: RoundProgress | None = None
    ) -> None:
        self._grid = grid
        self._first: float | None = first_timeout
        self._progress = progress

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        first, self._first = self._first, None
        timeout = first or timeout
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if self._progress is None or not train:
            return self._grid.send_and_receive(messages, timeout=timeout)
        return self._send_and_count(messages, timeout, _server_round(train[0]), self._progress)

    def _send_and_count(
        self,
        messages: list[Message],
        timeout: float | None,
        server_round: int,
        progress: RoundProgress,
    ) -> list[Message]:
        """Flower's `send_and_receive` (push, then pull until every reply is in or the
        timeout has passed), telling `progress` of each reply as it arrives."""
        waiting = set(self._grid.push_messages(messages))
        progress.round_started(server_round, len(waiting))
        end = time.time() + (timeout if timeout is not None else 0.0)
        # Flower's own pull interval: the in-memory grid's, else its HTTP grid's 3 s.
        interval = float(getattr(self._grid, "pull_interval", 3.0))
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            arrived = list(self._grid.pull_messages(waiting))
            if arrived:
                replies.extend(arrived)
                waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
                progress.replies(len(replies), _max_epsilon(arrived))
            if not waiting:
                break
            time.sleep(interval)
        progress.replies_done()
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _server_round(message: Message) -> int:
    # Flower writes the round into every train message's config ("server-round").
    try:
        return int(message.content["config"]["server-round"])
    except (KeyError, TypeError, ValueError):
        return 0


def _max_epsilon(replies: list[Message]) -> float | None:
    """The largest cumulative epsilon these replies report (each client's own figure; the
    report recomputes it)."""
    values = []
    for reply in replies:
        try:
            if not reply.has_error() and "metrics" in reply.content:
                values.append(float(reply.content["metrics"]["epsilon"]))
        except (KeyError, TypeError, ValueError):
            continue
    return max(values, default=None)


def collect_tallies(
    grid: Grid,
    recorder: RoundRecorder,
    node_of: dict[str, int],
    train_config: dict[str, str],
    timeout: float,
) -> None:
    """After the last round, ask every client still carried as provisional (sampled, no
    update) for its final history, and close the run on it: a round it trained after the
    server stopped waiting is counted, and no later message can train for this run."""
    outstanding = [who for who in recorder.ledger.outstanding() if who in node_of]
    if not outstanding:
        return
    config = ConfigRecord({k: train_config[k] for k in ("run-id", "sim-ledger-dir")})
    messages = [
        Message(
            content=RecordDict({"config": config}),
            dst_node_id=node_of[who],
            message_type=MessageType.QUERY,
        )
        for who in outstanding
    ]
    say(f"[fedgen] collecting the final tally of {plural(len(messages), 'client')}")
    label_of = {node_of[who]: who for who in outstanding}
    tallies = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error() or "tally" not in reply.content:
            continue  # stays provisional: counted as spent
        try:
            tallies.append((label_of[reply.metadata.src_node_id], tally_report(reply)))
        except Exception:  # a malformed tally leaves the client provisional
            continue
    recorder.record_tallies(tallies)


def make_server_app(
    cfg: FedgenConfig | None = None,
    run_dir: RunDir | None = None,
    resume: bool = False,
    progress: RoundProgress | None = None,
) -> ServerApp:
    """A ServerApp for a config prepared by the caller (fedgen simulate, which passes its
    `progress` view), or, with no arguments, one that reads the experiment from Flower's
    run config (flwr run): a non-empty `resume` there names a run directory to continue."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, run, resuming = cfg, run_dir, resume
        if run_cfg is None:
            run_config = dict(context.run_config)
            run_cfg, out = config_from_run_config(run_config)
            resume_dir = str(run_config.get("resume", "") or "")
            if resume_dir:
                run = RunDir(Path(resume_dir).resolve())
                requested = None
                if _overrides(run_config):
                    # Overrides alone apply to the run's own config, not the quickstart.
                    if str(run_config.get("config", "") or ""):
                        requested = run_cfg
                    else:
                        overrides = str(run_config.get("overrides", "") or "").split()
                        requested = load_run_config(run.path, overrides)
                run_cfg = resumable_config(run.path, requested)
                write_atomic(run.path / "config.yaml", run_cfg.to_yaml())
                resuming = True
            else:
                run = RunDir.create(run_cfg, out)
            print(f"[fedgen] run directory: {run.path}", flush=True)
        assert run is not None
        run_federation(grid, run_cfg, run, resume=resuming, progress=progress)

    return server_app


app = make_server_app()
