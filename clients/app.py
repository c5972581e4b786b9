"""Flower ClientApp: receives the global weights and the run's config, trains one round
locally with DP-SGD (`fedgen.rounds.client_round`) and replies with weights, scalar
metrics and its accountant history. No image, label or per-example value leaves here."""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.config import FedgenConfig, config_from_dict
from fedgen.data import Dataset, client_partition
from fedgen.rounds import ClientPrivacyState, client_round, client_seed, plan_privacy

app = ClientApp()

PRIVACY_STATE_KEY = "fedgen.privacy"


@lru_cache(maxsize=4)
def _load_partition(config_json: str, partition_id: int, num_partitions: int) -> Dataset:
    # Cached per process: a simulation actor serves many rounds (and clients) in turn.
    return client_partition(config_from_dict(json.loads(config_json)), partition_id, num_partitions)


def _client_identity(context: Context) -> tuple[str, int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "this SuperNode has no partition-id/num-partitions in its node config; "
            "start it with --node-config 'partition-id=0 num-partitions=N'"
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
    config_json = str(msg.content["config"]["fedgen-config"])
    cfg = config_from_dict(json.loads(config_json))
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
    server_round = int(msg.content["config"]["server-round"])
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))
    client_id, pid, num_partitions = _client_identity(context)

    data = _load_partition(config_json, pid, num_partitions)
    privacy = _load_privacy_state(context, cfg, len(data))
    global_state = msg.content["arrays"].to_torch_state_dict()
    result, privacy = client_round(
        cfg,
        global_state,
        data,
        privacy,
        client_seed(cfg.seed, pid, server_round),
        proximal_mu,
        server_round,
    )
    # The accountant's history lives in the node's state for the whole run, so the
    # epsilon after round r covers rounds 1..r.
    context.state.config_records[PRIVACY_STATE_KEY] = ConfigRecord(
        {"state": json.dumps(privacy.to_plain())}
    )

    metrics = MetricRecord({"num-examples": len(data), **result.metrics})
    report = ConfigRecord(
        {
            "client-id": client_id,
            "noise-multiplier": privacy.noise_multiplier,
            "sample-rate": privacy.sample_rate,
            "planned-steps": privacy.planned_steps,
            # [[noise_multiplier, sample_rate, steps], ...]: the whole accountant history.
            "history": json.dumps([list(h) for h in privacy.history]),
            # {"gan": steps} or {"vqvae": steps, "prior": steps}: which stage spent what.
            "stage-steps": json.dumps(privacy.stage_steps),
        }
    )
    content = RecordDict(
        {"arrays": ArrayRecord(result.state_dict), "metrics": metrics, "privacy": report}
    )
    return Message(content=content, reply_to=msg)
