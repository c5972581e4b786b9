"""Build the configured strategy from `flwr.serverapp.strategy`, with round bookkeeping.

Flower's strategies do the sampling and aggregation; the subclass made here only reads
each reply's metrics and privacy record, and hands the aggregated weights and those
reports to `fedgen.rounds.RoundRecorder` after every round."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from fedgen.config import FedgenConfig
from fedgen.rounds import RoundRecorder

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the clients' scalar metrics; epsilon is the maximum, not a mean."""
    weights = [float(r["metrics"][weight_key]) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for key in records[0]["metrics"]:
        if key == weight_key:
            continue
        values = [float(r["metrics"][key]) for r in records]
        if key == "epsilon":
            out[key] = max(values)
        else:
            out[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    return MetricRecord(out)


def client_report(reply: Message) -> dict[str, Any]:
    """The plain report of one client's reply: id, metrics and accountant history."""
    metrics = dict(reply.content["metrics"])
    privacy = reply.content["privacy"]
    return {
        "client_id": str(privacy["client-id"]),
        "num_examples": int(metrics["num-examples"]),
        "epsilon": metrics.get("epsilon"),
        "noise_multiplier": float(privacy["noise-multiplier"]),
        "sample_rate": float(privacy["sample-rate"]),
        "planned_steps": int(privacy["planned-steps"]),
        "history": json.loads(str(privacy["history"])),
        "stage_steps": json.loads(str(privacy.get("stage-steps", "{}"))),
        "metrics": metrics,
    }


def _float32(arrays: ArrayRecord) -> dict:
    # Server optimisers (FedAdam) compute in float64; the model and checkpoints are float32.
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in arrays.to_torch_state_dict().items()
    }


def build_strategy(cfg: FedgenConfig, recorder: RoundRecorder) -> Strategy:
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]
    kwargs: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 0.0,  # quality is measured on the server, not on private data
        "min_train_nodes": fed.min_train_clients,
        "min_available_nodes": fed.min_train_clients,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_lr, tau=fed.server_tau, beta_1=0.9, beta_2=0.99)
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trimmed_beta

    class RecordingStrategy(base):  # type: ignore[valid-type, misc]
        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            recorder.round_started()
            self._sent = arrays
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            frozen = recorder.frozen_prefixes(server_round)
            if arrays is not None and frozen:
                # Clients return frozen parts unchanged, but a server optimiser (FedAdam's
                # momentum) would still move them: keep exactly what was sent.
                for key in arrays:
                    if key.startswith(frozen):
                        arrays[key] = self._sent[key]
            ok = [r for r in replies if not r.has_error()]
            failures = [
                f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()
            ]
            line = recorder.record(
                server_round,
                _float32(arrays) if arrays is not None else None,
                [client_report(r) for r in ok],
                failures,
            )
            recorder.print_progress(line)
            return arrays, metrics

    RecordingStrategy.__name__ = f"Recording{base.__name__}"
    return RecordingStrategy(**kwargs)
