"""Flower ClientApp: receives the global weights and the run's config, trains one round
locally with DP-SGD (`fedgen.rounds.client_round`) and replies with weights, scalar
metrics and its accountant history. No image, label or per-example value leaves here.

Where its data comes from depends on the SuperNode's node config:
- simulation (`partition-id`, `num-partitions`): a slice of the configured dataset; the
  accountant history lives in the node's `context.state` for the run.
- deployment (`data-path`, optional `data-format`, `ledger-dir`, `client-name`,
  `max-epsilon`): the device's own files; the history lives in a ledger file on the
  device (`fedgen.ledger`), so a restarted SuperNode continues from it. A device whose
  next round would pass its own `max-epsilon` declines to train and says why."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.config import FedgenConfig, config_from_dict
from fedgen.data import Dataset, DeviceData, client_partition, data_fingerprint, load_device_data
from fedgen.ledger import DeviceLedger, default_ledger_dir, epsilon_after
from fedgen.rounds import ClientPrivacyState, client_round, client_seed, plan_privacy

app = ClientApp()

PRIVACY_STATE_KEY = "fedgen.privacy"


@lru_cache(maxsize=4)
def _load_partition(config_json: str, partition_id: int, num_partitions: int) -> Dataset:
    # Cached per process: a simulation actor serves many rounds (and clients) in turn.
    return client_partition(config_from_dict(json.loads(config_json)), partition_id, num_partitions)


@lru_cache(maxsize=2)
def _load_device(path: str, fmt: str) -> tuple[DeviceData, str]:
    device = load_device_data(path, fmt)
    # Logged on the device only: file names stay here; the server gets the count.
    for name, reason in device.skipped:
        print(f"[fedgen] skipped {name}: {reason}", flush=True)
    return device, data_fingerprint(device.data)


def _client_identity(context: Context) -> tuple[str, int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode names no data: start it with --node-config "
            "'data-path=/path/to/images' (a device's own data) or, in simulation, "
            "'partition-id=0 num-partitions=N'"
        )
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    return str(pid), pid, n


def _load_privacy_state(
    context: Context, cfg: FedgenConfig, num_examples: int
) -> ClientPrivacyState:
    record = context.state.config_records.get(PRIVACY_STATE_KEY)
    if record is None:
        return plan_privacy(cfg, num_examples)  # first round: calibrate once for the whole run
    return ClientPrivacyState.from_plain(json.loads(str(record["state"])))


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    config_json = str(config["fedgen-config"])
    cfg = config_from_dict(json.loads(config_json))
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    server_round = int(config["server-round"])
    proximal_mu = float(config.get("proximal-mu", 0.0))
    global_state = msg.content["arrays"].to_torch_state_dict()
    if "data-path" in context.node_config:
        return _train_on_device(msg, context, cfg, str(config["run-id"]), global_state)

    client_id, pid, num_partitions = _client_identity(context)
    data = _load_partition(config_json, pid, num_partitions)
    privacy = _load_privacy_state(context, cfg, len(data))
    seed = client_seed(cfg.seed, pid, server_round)
    result, privacy = client_round(
        cfg, global_state, data, privacy, seed, proximal_mu, server_round
    )
    # The accountant's history lives in the node's state for the whole run, so the
    # epsilon after round r covers rounds 1..r.
    context.state.config_records[PRIVACY_STATE_KEY] = ConfigRecord(
        {"state": json.dumps(privacy.to_plain())}
    )
    return _reply(msg, client_id, len(data), result.state_dict, result.metrics, privacy)


def _train_on_device(
    msg: Message,
    context: Context,
    cfg: FedgenConfig,
    run_id: str,
    global_state: dict[str, torch.Tensor],
) -> Message:
    node = context.node_config
    config = msg.content["config"]
    server_round = int(config["server-round"])
    device, fingerprint = _load_device(str(node["data-path"]), str(node.get("data-format", "auto")))
    data = device.data
    client_id = str(node.get("client-name", "")) or f"node-{fingerprint[:8]}"
    ledger = DeviceLedger(
        Path(str(node.get("ledger-dir", "")) or default_ledger_dir()).expanduser(),
        run_id,
        fingerprint,
    )
    privacy = ledger.state() or plan_privacy(cfg, len(data))
    p = cfg.privacy
    if "max-epsilon" in node:
        budget = float(node["max-epsilon"])
        steps = cfg.local_steps_for(cfg.stage(server_round))
        after = epsilon_after(privacy, steps, p.delta, p.accountant) if p.enabled else float("inf")
        if after > budget:
            spent = ledger.read() or {}
            reason = (
                f"declined: this round would take epsilon to {after:.4g}, past this device's "
                f"max-epsilon {budget:g} (spent so far {spent.get('epsilon', 0.0):.4g})"
            )
            print(f"[fedgen] {client_id}, round {server_round}: {reason}", flush=True)
            declined = ConfigRecord(
                {
                    "client-id": client_id,
                    "reason": reason,
                    "num-examples": len(data),
                    **_privacy_fields(privacy),
                }
            )
            return Message(content=RecordDict({"declined": declined}), reply_to=msg)

    seed = int(fingerprint[:8], 16) % (2**31)
    result, privacy = client_round(
        cfg,
        global_state,
        data,
        privacy,
        client_seed(seed, 0, server_round),
        float(config.get("proximal-mu", 0.0)),
        server_round,
    )
    # On disk before the reply leaves: an update that was released is always accounted.
    ledger.write(
        privacy,
        client_id=client_id,
        accountant=p.accountant,
        delta=p.delta,
        server_round=server_round,
        num_examples=len(data),
    )
    metrics = {**result.metrics, "skipped-files": float(len(device.skipped))}
    return _reply(msg, client_id, len(data), result.state_dict, metrics, privacy)


def _privacy_fields(privacy: ClientPrivacyState) -> dict[str, str | float | int]:
    return {
        "noise-multiplier": privacy.noise_multiplier,
        "sample-rate": privacy.sample_rate,
        "planned-steps": privacy.planned_steps,
        # [[noise_multiplier, sample_rate, steps], ...]: the whole accountant history.
        "history": json.dumps([list(h) for h in privacy.history]),
        # {"gan": steps} or {"vqvae": steps, "prior": steps}: which stage spent what.
        "stage-steps": json.dumps(privacy.stage_steps),
    }


def _reply(
    msg: Message,
    client_id: str,
    num_examples: int,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, float],
    privacy: ClientPrivacyState,
) -> Message:
    report = ConfigRecord({"client-id": client_id, **_privacy_fields(privacy)})
    content = RecordDict(
        {
            "arrays": ArrayRecord(state_dict),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
            "privacy": report,
        }
    )
    return Message(content=content, reply_to=msg)
