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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Client:
    """Who this client is, its data, and where its privacy state is kept."""

    client_id: str
    data: Dataset
    seed_index: int  # partition id, or a number from the data fingerprint on a device
    ledger: DeviceLedger | None  # None: the state lives in context.state only
    max_epsilon: float | None
    skipped_files: int | None


def _client(context: Context, config: ConfigRecord, config_json: str) -> _Client:
    node = context.node_config
    run_id = str(config.get("run-id", ""))
    if "data-path" in node:
        # Deployment: the device's own files, and a ledger on its own disk.
        device, fingerprint = _load_device(
            str(node["data-path"]), str(node.get("data-format", "auto"))
        )
        folder = Path(str(node.get("ledger-dir", "")) or default_ledger_dir()).expanduser()
        client_id = str(node.get("client-name", "")) or f"node-{fingerprint[:8]}"
        return _Client(
            client_id=client_id,
            data=device.data,
            seed_index=int(fingerprint[:8], 16) % 100_003,
            ledger=DeviceLedger(folder, run_id, fingerprint, client_id),
            max_epsilon=float(node["max-epsilon"]) if "max-epsilon" in node else None,
            skipped_files=len(device.skipped),
        )
    client_id, pid, num_partitions = _client_identity(context)
    data = _load_partition(config_json, pid, num_partitions)
    # Simulation: the server names a folder (in the run directory) standing in for each
    # simulated device's disk, so a resumed simulation continues every client's history.
    folder = str(config.get("sim-ledger-dir", ""))
    ledger = (
        DeviceLedger(Path(folder), run_id, data_fingerprint(data), client_id) if folder else None
    )
    return _Client(client_id, data, pid, ledger, None, None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    config_json = str(config["fedgen-config"])
    cfg = config_from_dict(json.loads(config_json))
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    server_round = int(config["server-round"])
    client = _client(context, config, config_json)
    data, ledger, p = client.data, client.ledger, cfg.privacy

    if ledger is not None:
        cached = ledger.cached_reply(server_round)
        if cached is not None:
            # This round was trained before a restart: send the same update again. Sending
            # an output twice costs no privacy; training again would.
            weights, metrics = cached
            state = ledger.state()
            assert state is not None
            return _reply(msg, client.client_id, len(data), weights, metrics, state)
        privacy = ledger.state() or plan_privacy(cfg, len(data))
    else:
        privacy = _load_privacy_state(context, cfg, len(data))

    if client.max_epsilon is not None:
        steps = cfg.local_steps_for(cfg.stage(server_round))
        after = epsilon_after(privacy, steps, p.delta, p.accountant) if p.enabled else float("inf")
        if after > client.max_epsilon:
            return _decline(msg, client, privacy, server_round, after)

    result, privacy = client_round(
        cfg,
        msg.content["arrays"].to_torch_state_dict(),
        data,
        privacy,
        client_seed(cfg.seed, client.seed_index, server_round),
        float(config.get("proximal-mu", 0.0)),
        server_round,
    )
    metrics = dict(result.metrics)
    if client.skipped_files is not None:
        metrics["skipped-files"] = float(client.skipped_files)
    if ledger is not None:
        # On disk before the reply leaves: an update that was released is always accounted.
        ledger.write(
            privacy,
            client_id=client.client_id,
            accountant=p.accountant,
            delta=p.delta,
            server_round=server_round,
            num_examples=len(data),
            reply=(result.state_dict, metrics),
        )
    # The accountant's history lives in the node's state for the whole run, so the
    # epsilon after round r covers rounds 1..r.
    context.state.config_records[PRIVACY_STATE_KEY] = ConfigRecord(
        {"state": json.dumps(privacy.to_plain())}
    )
    return _reply(msg, client.client_id, len(data), result.state_dict, metrics, privacy)


def _decline(
    msg: Message, client: _Client, privacy: ClientPrivacyState, server_round: int, after: float
) -> Message:
    spent = client.ledger.read() if client.ledger is not None else None
    reason = (
        f"declined: this round would take epsilon to {after:.4g}, past this device's "
        f"max-epsilon {client.max_epsilon:g} (spent so far {(spent or {}).get('epsilon', 0.0):.4g})"
    )
    print(f"[fedgen] {client.client_id}, round {server_round}: {reason}", flush=True)
    declined = ConfigRecord(
        {
            "client-id": client.client_id,
            "reason": reason,
            "num-examples": len(client.data),
            **_privacy_fields(privacy),
        }
    )
    return Message(content=RecordDict({"declined": declined}), reply_to=msg)


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
