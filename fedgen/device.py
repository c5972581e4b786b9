"""One round on a device, as the device decides it: the Flower-free core of the ClientApp.

Under the device's lock: answer a round it already trained from its cache (sending an
output twice costs nothing), else check the server's request against the device's own
policy, make or continue the run's plan from its own ledger, check the round against the
run's and the lifetime budget, train, and write the ledger before anything is released.
Anything the device refuses or fails at comes back as a fixed code; the detail goes to the
device's own log only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedgen.config import ConfigError, FedgenConfig
from fedgen.data import DataError, Dataset
from fedgen.files import CheckpointError, load_checkpoint, save_tensors
from fedgen.ledger import DeviceLedger, LedgerError
from fedgen.policy import (
    Decline,
    DevicePolicy,
    PolicyError,
    check_request,
    check_round,
    plan_for,
    plan_inputs,
)
from fedgen.privacy import ClientPrivacyState
from fedgen.updates import RELEASE_KEY

__all__ = ["DeviceReply", "device_round", "close_run", "failure_code", "log"]

log = logging.getLogger("fedgen.device")


@dataclass
class DeviceReply:
    """What the device sends back: `kind` is trained, cached, declined or failed."""

    kind: str
    privacy: ClientPrivacyState | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    code: str | None = None
    release: torch.Tensor | None = None  # `mmd` with a pooled target: the round's DP output


def failure_code(err: BaseException) -> str:
    if isinstance(err, DataError):
        return "data-error"
    if isinstance(err, LedgerError):
        return "ledger-error"
    if isinstance(err, ConfigError):
        return "config-error"
    if isinstance(err, PolicyError):
        return "policy-error"
    return "internal-error"


def _state(run: dict[str, Any]) -> ClientPrivacyState:
    return ClientPrivacyState.from_plain(run)


def _optimizer_path(ledger: DeviceLedger) -> Path:
    return ledger.reply_path.with_name(ledger.path.stem + ".optimizer.safetensors")


def _kept_optimizer(ledger: DeviceLedger, run_id: str) -> dict[str, torch.Tensor] | None:
    """The optimizer state this device kept from its last round of `run_id` (it never
    leaves the device); None when there is none or it belongs to another run."""
    path = _optimizer_path(ledger)
    if not path.exists():
        return None
    try:
        tensors, metadata = load_checkpoint(path, with_metadata=True)
    except CheckpointError:
        return None  # a damaged file only costs the moments: the round starts them afresh
    return tensors if metadata.get("run_id") == run_id else None


def device_round(
    *,
    policy: DevicePolicy,
    ledger: DeviceLedger,
    cfg: FedgenConfig,
    run_id: str,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    data: Dataset,
    data_fingerprint: str,
    seed_index: int,
    proximal_mu: float = 0.0,
    pooled: tuple[torch.Tensor, int] | None = None,
) -> DeviceReply:
    """Train one round if the device's policy and budget allow it (see the module doc).
    `pooled`: the server's sum of every client's earlier releases (`mmd` with
    `federation.pooled_target`), which this round fits with its own new release."""
    n = len(data)
    with ledger.locked():
        cached = ledger.cached_reply(run_id, server_round)
        run = ledger.run(run_id, data_fingerprint)
        if cached is not None and run is not None:
            state, release = _split_release(cached[0])
            return DeviceReply("cached", _state(run), state, cached[1], release=release)
        try:
            if run is not None and run.get("closed"):
                raise Decline("run-closed", f"run {run_id} was closed on this device")
            check_request(policy, cfg, n)
            inputs = plan_inputs(policy, cfg, n)
            if run is not None and run.get("plan_inputs") == inputs:
                # Same inputs, same plan: the calibration is not repeated every round.
                sigma, rate, planned_steps = (
                    float(run["noise_multiplier"]), float(run["sample_rate"]),
                    int(run["planned_steps"]),
                )  # fmt: skip
            else:
                sigma, rate, planned_steps = plan_for(policy, cfg, n)
            steps = cfg.local_steps_for(cfg.stage(server_round))
            if run is None:
                privacy = ClientPrivacyState(sigma, rate, planned_steps, [])
                whole_run = (sigma, rate, planned_steps)
            else:
                privacy = _state(run)
                whole_run = None
                mine = (privacy.noise_multiplier, privacy.sample_rate, privacy.planned_steps)
                if cfg.privacy.enabled and (sigma, rate, planned_steps) != mine:
                    raise Decline(
                        "plan-changed",
                        f"request plans {(sigma, rate, planned_steps)}, run has {mine}",
                    )
            if cfg.privacy.enabled:
                check_round(
                    policy,
                    privacy.history,
                    ledger.other_runs_history(run_id),
                    (privacy.noise_multiplier, privacy.sample_rate, steps),
                    whole_run,
                )
        except Decline as decline:
            log.warning("round %s of run %s declined: %s", server_round, run_id, decline)
            state = _state(run) if run is not None else None
            return DeviceReply("declined", state, code=decline.code)

        # The training code (Opacus, the models) loads only when a round trains: a
        # device that declines, or answers a query, replies without it.
        from fedgen.rounds import client_round, client_seed

        result, privacy = client_round(
            cfg,
            global_state,
            data,
            privacy,
            client_seed(cfg.seed, seed_index, server_round),
            proximal_mu,
            server_round,
            _kept_optimizer(ledger, run_id) if cfg.keeps_client_state else None,
            pooled,
        )
        release = result.release if cfg.federation.pooled_target else None
        # Its epsilon is the policy's: delta, relation and accountant were checked equal.
        metrics = dict(result.metrics)
        # On disk before the reply leaves: an update that was released is always accounted.
        ledger.write_round(
            run_id,
            privacy,
            data_fingerprint=data_fingerprint,
            num_examples=n,
            policy=policy.to_plain(),
            epsilon=metrics.get("epsilon", 0.0),
            lifetime_epsilon=policy.epsilon([*ledger.other_runs_history(run_id), *privacy.history]),
            server_round=server_round,
            reply=(_join_release(result.state_dict, release), metrics),
            plan_inputs=inputs,
        )
        if cfg.keeps_client_state and result.optimizer_state:
            save_tensors(_optimizer_path(ledger), result.optimizer_state, {"run_id": run_id})
        return DeviceReply("trained", privacy, result.state_dict, metrics, release=release)


def _join_release(
    state: dict[str, torch.Tensor], release: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The weights and the release as one file's tensors: the kept reply holds both, so a
    restarted device resends exactly what it sent, and its ledger digests both."""
    return state if release is None else {**state, RELEASE_KEY: release}


def _split_release(
    kept: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    state = dict(kept)
    return state, state.pop(RELEASE_KEY, None)


def close_run(ledger: DeviceLedger, run_id: str) -> ClientPrivacyState | None:
    """The run's final tally on this device; no message trains for it afterwards."""
    with ledger.locked():
        run = ledger.close_run(run_id)
    return None if run is None else _state(run)
