"""Run a federation on one machine with Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import math
import os

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from clients.app import app as client_app
from fedgen.config import FedgenConfig
from fedgen.console import RoundProgress
from fedgen.reports import RunDir
from server.app import make_server_app


def _actor_share(cpus: int, actors: int) -> float:
    """The largest share with 4 decimals (Ray's resolution) of which `cpus` holds
    `actors`, as Flower counts it (`int(cpus / share)`, in floating point)."""
    share = math.floor(cpus / actors * 1e4) / 1e4
    while share > 1e-4 and int(cpus / share) < actors:  # 7 / 0.28 is 24.999...
        share = round(share - 1e-4, 4)
    return share


def backend_config(cfg: FedgenConfig) -> dict:
    """Ray's resources for the run. Flower starts one actor per `client_cpus` of the
    machine's cores, and each actor imports torch and Opacus (seconds of CPU) before its
    first client: more actors than a round trains clients would only pay that. Each actor
    is then reserved the cores the round leaves it (floored to Ray's 1e-4 resolution, so
    the actors still fit); its torch threads are `federation.torch_threads`."""
    fed = cfg.federation
    cpus = max(os.cpu_count() or 1, math.ceil(fed.client_cpus))
    per_actor = max(fed.client_cpus, _actor_share(cpus, fed.clients_per_round))
    init_args: dict = {"num_cpus": cpus, "include_dashboard": False}
    resources: dict = {"num_cpus": per_actor}
    if fed.client_gpus > 0:
        # Fractional GPUs: e.g. 0.25 lets four clients share one device.
        resources["num_gpus"] = fed.client_gpus
        import torch

        init_args["num_gpus"] = torch.cuda.device_count()
    return {"init_args": init_args, "client_resources": resources}


def simulate(
    cfg: FedgenConfig,
    run_dir: RunDir,
    client: ClientApp | None = None,
    resume: bool = False,
    progress: RoundProgress | None = None,
) -> None:
    """Run the whole federation (with `resume`, the rounds after the last intact one in
    `run_dir`); raises if it did not complete. `client` replaces the ClientApp (tests
    inject faults this way); `progress` hears of each round's replies as they arrive.

    `run_simulation` is Flower 1.41's only way to run a simulation inside this process;
    it warns that it is deprecated in favour of `flwr run`, which needs a SuperLink and a
    built Flower App (fedgen supports that too, see README). `fedgen simulate` sends the
    warning to the run's log with Flower's other output (`fedgen.console.RunConsole`)."""
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, resume, progress),
            client_app=client or client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
        )
    except KeyboardInterrupt:
        # Flower leaves the Ray cluster it started running when interrupted; stop it, or
        # its processes outlive the command.
        import ray

        if ray.is_initialized():
            ray.shutdown()
        raise
    manifest = run_dir.path / "manifest.json"
    status = json.loads(manifest.read_text()).get("status") if manifest.is_file() else None
    if status != "completed":
        raise RuntimeError(
            f"the simulation did not complete (status: {status}); Flower's log says why, "
            f"and {run_dir.path} holds what was written so far"
        )
