"""Flower ServerApp: runs the configured strategy for the configured rounds and keeps the
run directory (checkpoints, samples, metrics, privacy report) current after each round.

Under `flwr run .` the run config (pyproject.toml, `--run-config`) names the experiment:
`config` (a YAML path, absolute or relative to this app; empty: built-in quickstart),
`overrides` (space-separated `key.sub=value`) and `out` (run directory; empty: under
`run.out_dir`)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedgen.config import FedgenConfig, load_config
from fedgen.reports import RunDir
from fedgen.rounds import RoundRecorder
from server.strategy import build_strategy

APP_ROOT = Path(__file__).resolve().parents[1]


def config_from_run_config(run_config: dict) -> tuple[FedgenConfig, str | None]:
    path = str(run_config.get("config", "") or "")
    if path and not Path(path).is_absolute():
        path = str(APP_ROOT / path)
    overrides = str(run_config.get("overrides", "") or "").split()
    out = str(run_config.get("out", "") or "") or None
    return load_config(path or None, overrides), out


def run_federation(grid: Grid, cfg: FedgenConfig, run_dir: RunDir) -> None:
    recorder = RoundRecorder(cfg, run_dir)
    strategy = build_strategy(cfg, recorder)
    run_dir.write_manifest(cfg)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(recorder.initial_state()),
            num_rounds=cfg.total_rounds,
            timeout=cfg.federation.round_timeout,
            # Clients validate this with the same schema: one source for every setting.
            train_config=ConfigRecord(
                # Devices key their privacy ledgers by the run id.
                {"fedgen-config": cfg.to_json(), "run-id": run_dir.run_id}
            ),
        )
    except BaseException:
        run_dir.finish(cfg, status="failed")
        raise
    run_dir.finish(cfg, status="completed")


def make_server_app(cfg: FedgenConfig | None = None, run_dir: RunDir | None = None) -> ServerApp:
    """A ServerApp for a config prepared by the caller (fedgen simulate), or, with no
    arguments, one that reads the experiment from Flower's run config (flwr run)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, run = cfg, run_dir
        if run_cfg is None:
            run_cfg, out = config_from_run_config(dict(context.run_config))
            run = RunDir.create(run_cfg, out)
            print(f"[fedgen] run directory: {run.path}", flush=True)
        assert run is not None
        run_federation(grid, run_cfg, run)

    return server_app


app = make_server_app()
