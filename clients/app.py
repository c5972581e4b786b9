"""Flower ClientApp: moves one round between Flower messages and `fedgen.device`.

The device decides (`fedgen.device.device_round`): its own privacy policy, its own ledger,
one round at a time. This adapter only resolves who the device is, where its data and
ledger are, and what policy it holds, then turns the decision into a reply: an update
(weights, scalar metrics, accountant history), a decline with a reason code, or a failure
with a reason code. No image, label, per-example value, file name or exception text leaves.

Where things come from depends on the SuperNode's node config:
- deployment (`data-path`, optional `data-format`, `ledger-dir`, `client-name`, and the
  privacy policy: `privacy-policy` naming a file and/or `max-epsilon`,
  `lifetime-max-epsilon`, `delta`, `neighboring`, `accountant`, `min-noise-multiplier`,
  `max-sample-rate`, `public-num-examples`): the device's own files, policy and ledger;
- simulation (`partition-id`, `num-partitions`): a slice of the configured dataset, the
  experiment's config as policy, and a ledger in the run directory that the server names
  (standing in for each simulated device's disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.config import FedgenConfig, config_from_dict
from fedgen.data import (
    Dataset,
    DeviceData,
    SplitDataset,
    data_fingerprint,
    load_device_data,
    split_dataset,
)
from fedgen.device import DeviceReply, close_run, device_round, failure_code
from fedgen.ledger import DeviceLedger, default_ledger_dir, device_id
from fedgen.policy import DevicePolicy
from fedgen.privacy import ClientPrivacyState

app = ClientApp()
log = logging.getLogger("fedgen.device")


@lru_cache(maxsize=1)
def _federation_split(config_json: str, num_partitions: int) -> SplitDataset:
    # One copy of the training set and its split per process: a simulation actor serves
    # many clients in turn, and each takes only its own slice, while it trains.
    return split_dataset(config_from_dict(json.loads(config_json)), num_partitions)


def _load_partition(
    config_json: str, partition_id: int, num_partitions: int
) -> tuple[Dataset, str]:
    data = _federation_split(config_json, num_partitions).client(partition_id)
    return data, data_fingerprint(data)


@lru_cache(maxsize=2)
def _load_device(path: str, fmt: str) -> tuple[DeviceData, str]:
    device = load_device_data(path, fmt)
    # Logged on the device only: file names stay here; the server gets the count.
    for name, reason in device.skipped:
        log.warning("skipped %s: %s", name, reason)
    return device, data_fingerprint(device.data)


@dataclass(frozen=True)
class _Device:
    """Who this client is and where its ledger lives (no data needed)."""

    client_id: str
    ledger: DeviceLedger
    deployed: bool


def _device(context: Context, config: ConfigRecord) -> _Device:
    node = context.node_config
    if "data-path" in node:
        folder = Path(str(node.get("ledger-dir", "")) or default_ledger_dir()).expanduser()
        client_id = str(node.get("client-name", "")) or device_id(folder)
        return _Device(client_id, DeviceLedger(folder, client_id), deployed=True)
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode names no data: start it with --node-config "
            "'data-path=/path/to/images' (a device's own data) or, in simulation, "
            "'partition-id=0 num-partitions=N'"
        )
    folder = str(config.get("sim-ledger-dir", ""))
    if not folder:
        raise ValueError("a simulated client needs the server's sim-ledger-dir")
    client_id = str(int(node["partition-id"]))
    return _Device(client_id, DeviceLedger(Path(folder), client_id), deployed=False)


def _policy(context: Context, cfg: FedgenConfig, device: _Device) -> DevicePolicy:
    return (
        DevicePolicy.from_node_config(dict(context.node_config))
        if device.deployed
        else (DevicePolicy.from_config(cfg))
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    client_id = "?"
    try:
        config = msg.content["config"]
        config_json = str(config["fedgen-config"])
        cfg = config_from_dict(json.loads(config_json))
        torch.set_num_threads(cfg.federation.torch_threads)
        device = _device(context, config)
        client_id = device.client_id
        policy = _policy(context, cfg, device)
        node = context.node_config
        skipped: int | None = None
        if device.deployed:
            device_data, fingerprint = _load_device(
                str(node["data-path"]), str(node.get("data-format", "auto"))
            )
            data, skipped = device_data.data, len(device_data.skipped)
            # Seeds the fake batches only; from the device's name, never from its data
            # (a data-derived seed would be an un-noised function of the data).
            seed_index = int(hashlib.sha256(device.client_id.encode()).hexdigest()[:8], 16)
        else:
            pid, parts = int(node["partition-id"]), int(node["num-partitions"])
            data, fingerprint = _load_partition(config_json, pid, parts)
            seed_index = pid
        reply = device_round(
            policy=policy,
            ledger=device.ledger,
            cfg=cfg,
            run_id=str(config.get("run-id", "")),
            server_round=int(config["server-round"]),
            global_state=msg.content["arrays"].to_torch_state_dict(),
            data=data,
            data_fingerprint=fingerprint,
            seed_index=seed_index,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            pooled=_pooled_target(msg),
        )
        return _message(msg, client_id, policy, len(data), reply, skipped)
    except Exception as err:  # the detail stays in this device's log; a code leaves
        code = failure_code(err)
        log.error("round failed (%s)", code, exc_info=True)
        failed = ConfigRecord({"client-id": client_id, "code": code})
        return Message(content=RecordDict({"failed": failed}), reply_to=msg)


def _pooled_target(msg: Message) -> tuple[torch.Tensor, int] | None:
    """The server's sum of every client's earlier releases (`federation.pooled_target`),
    when it sent one. Whatever it holds, this device's data meets it only after the
    release: a wrong target costs the fit, never privacy."""
    if "pooled" not in msg.content:
        return None
    record = msg.content["pooled"].to_torch_state_dict()
    count = int(record["count"].item())
    if count < 1 or not torch.isfinite(record["sum"]).all():
        raise ValueError(f"the pooled target counts {count} releases or is not finite")
    return record["sum"], count


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's end-of-run collection: close the run on this device and send its
    final history (a round trained after its reply was given up on is counted here)."""
    try:
        config = msg.content["config"]
        device = _device(context, config)
        state = close_run(device.ledger, str(config.get("run-id", "")))
        record: dict = {"client-id": device.client_id, "closed": 1}
        if state is not None:
            record.update(_privacy_fields(state))
        return Message(content=RecordDict({"tally": ConfigRecord(record)}), reply_to=msg)
    except Exception as err:
        code = failure_code(err)
        log.error("query failed (%s)", code, exc_info=True)
        failed = ConfigRecord({"client-id": "?", "code": code})
        return Message(content=RecordDict({"failed": failed}), reply_to=msg)


def _privacy_fields(privacy: ClientPrivacyState) -> dict[str, str | float | int]:
    return {
        "noise-multiplier": privacy.noise_multiplier,
        "sample-rate": privacy.sample_rate,
        "planned-steps": privacy.planned_steps,
        # [[noise_multiplier, sample_rate, steps], ...]: the run's whole accountant history.
        "history": json.dumps([list(h) for h in privacy.history]),
        # {"gan": steps} or {"vqvae": steps, "prior": steps}: which stage spent what.
        "stage-steps": json.dumps(privacy.stage_steps),
    }


def _message(
    msg: Message,
    client_id: str,
    policy: DevicePolicy,
    num_examples: int,
    reply: DeviceReply,
    skipped: int | None,
) -> Message:
    statement: dict[str, str | float | int] = {
        "client-id": client_id,
        "neighboring": policy.neighboring,
        "accountant": policy.accountant,
        "delta": policy.delta,
    }
    if reply.privacy is not None:
        statement.update(_privacy_fields(reply.privacy))
    if reply.kind == "declined":
        declined = ConfigRecord({**statement, "code": str(reply.code)})
        return Message(content=RecordDict({"declined": declined}), reply_to=msg)
    assert reply.state_dict is not None
    # Under add/remove the real n must not leave: the weight is the declared public size.
    weight = policy.public_num_examples if policy.neighboring == "add_remove" else num_examples
    metrics = {"num-examples": weight, **reply.metrics}
    if skipped is not None:
        metrics["skipped-files"] = float(skipped)
    content = RecordDict(
        {
            "arrays": ArrayRecord(reply.state_dict),
            "metrics": MetricRecord(metrics),
            "privacy": ConfigRecord(statement),
        }
    )
    if reply.release is not None:  # the round's DP output, for the server's pooled target
        content["release"] = ArrayRecord({"sum": reply.release})
    return Message(content=content, reply_to=msg)
