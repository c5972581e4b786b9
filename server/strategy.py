"""Build the configured strategy from `flwr.serverapp.strategy`, with round bookkeeping.

Flower's strategies do the sampling and aggregation; the subclass made here only reads
each reply's metrics and privacy record, and hands the aggregated weights and those
reports to `fedgen.rounds.RoundRecorder` after every round."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgen.config import FedgenConfig
from fedgen.console import plural
from fedgen.data import NUM_CLASSES
from fedgen.embedding import pool_releases
from fedgen.files import tensors_digest
from fedgen.killpoints import hold_point
from fedgen.policy import FAILURE_CODES
from fedgen.rounds import RoundRecorder
from fedgen.updates import (
    RELEASE_KEY,
    check_release,
    check_update,
    max_weight_change,
    release_shape,
)

STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the clients' scalar metrics; epsilon is the maximum and skipped
    files the sum, not means. A metric only some clients send averages over those."""
    out: dict[str, float] = {}
    keys = dict.fromkeys(k for r in records for k in r["metrics"] if k != weight_key)
    for key in keys:
        pairs = [
            (float(r["metrics"][key]), float(r["metrics"][weight_key]))
            for r in records
            if key in r["metrics"]
        ]
        values = [v for v, _ in pairs]
        if key == "epsilon":
            out[key] = max(values)
        elif key == "skipped-files":
            out[key] = sum(values)
        else:
            total = sum(w for _, w in pairs) or 1.0
            out[key] = sum(v * w for v, w in pairs) / total
    return MetricRecord(out)


def _privacy_fields(record: ConfigRecord) -> dict[str, Any]:
    """A device's privacy record; a device that has not trained in this run yet (a
    decline before its first round) sends no history."""
    fields: dict[str, Any] = {"client_id": str(record["client-id"])}
    if "history" in record:
        fields.update(
            {
                "noise_multiplier": float(record["noise-multiplier"]),
                "sample_rate": float(record["sample-rate"]),
                "planned_steps": int(record["planned-steps"]),
                "history": json.loads(str(record["history"])),
                "stage_steps": json.loads(str(record.get("stage-steps", "{}"))),
            }
        )
    return fields


def client_report(reply: Message) -> dict[str, Any]:
    """The plain report of one client's reply: id, metrics and accountant history."""
    metrics = dict(reply.content["metrics"])
    return {
        **_privacy_fields(reply.content["privacy"]),
        "num_examples": int(metrics["num-examples"]),
        "epsilon": metrics.get("epsilon"),
        "metrics": metrics,
    }


def declined_report(reply: Message) -> dict[str, Any]:
    """A device that refused to train (its own policy): who, its reason code, its history."""
    record = reply.content["declined"]
    return {**_privacy_fields(record), "code": str(record["code"])}


def tally_report(reply: Message) -> dict[str, Any]:
    """A device's end-of-run tally: its id and, if it trained in the run, its history."""
    return _privacy_fields(reply.content["tally"])


SUPERLINK_NODE_ID = 1  # the sender Flower puts on errors the SuperLink makes for a node


def split_replies(
    replies: list[Message], sampled: list[int], names: dict[int, str], timeout: float
) -> tuple[list[Message], list[dict[str, Any]], list[str], list[int]]:
    """Updates to aggregate, declines, one line per node that sent no update (who, where
    an earlier reply named it, and why: a reason code, never free text from a device), and
    the nodes that sent no update and did not decline (they may have trained)."""
    updates, declined, failures = [], [], []
    answered: set[int] = set()
    missing: list[int] = []
    link_errors: list[str] = []
    for reply in replies:
        src = reply.metadata.src_node_id
        if reply.has_error() and src == SUPERLINK_NODE_ID:
            link_errors.append(reply.error.reason)
            continue
        answered.add(src)
        if reply.has_error():
            # Flower's own error (the ClientApp could not run): its code, not its text.
            failures.append(f"{_node_name(src, names)}: flower-error-{reply.error.code}")
            missing.append(src)
            continue
        try:
            if "declined" in reply.content:
                declined.append(declined_report(reply))
                names[src] = declined[-1]["client_id"]
                continue
            if "failed" in reply.content:
                record = reply.content["failed"]
                if str(record.get("client-id", "?")) != "?":
                    names[src] = str(record["client-id"])
                failures.append(f"{_node_name(src, names)}: {_code(record.get('code'))}")
                missing.append(src)
                continue
            names[src] = str(reply.content["privacy"]["client-id"])
        except Exception:  # a hostile or broken client must not stop the server
            failures.append(f"{_node_name(src, names)}: malformed-reply")
            missing.append(src)
            continue
        updates.append(reply)
    # Errors the SuperLink made (node unavailable) do not name the node; the nodes that
    # were sampled and did not answer themselves are the ones they are about.
    silent = [n for n in sampled if n not in answered]
    for i, node in enumerate(silent):
        reason = "node-unavailable" if i < len(link_errors) else f"no reply within {timeout:g}s"
        failures.append(f"{_node_name(node, names)}: {reason}")
    return updates, declined, failures, [*missing, *silent]


def _code(value: Any) -> str:
    """A device's failure code, kept only when it is one of the fixed codes."""
    return str(value) if str(value) in FAILURE_CODES else "unknown-code"


EXPECTED_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "privacy": ConfigRecord}


def _malformed(
    reply: Message, report: dict[str, Any], expected: dict[str, type] = EXPECTED_RECORDS
) -> str | None:
    """Why a reply is not a well-formed update (records, weight, metrics), or None."""
    content = reply.content
    if set(content) != set(expected) or any(
        not isinstance(content[k], t) for k, t in expected.items()
    ):
        return f"records {sorted(content)}, expected {sorted(expected)}"
    n = report["metrics"].get("num-examples")
    if not isinstance(n, int | float) or not math.isfinite(n) or n < 1 or n != int(n):
        return f"num-examples {n!r} is not a positive whole number"
    for key, value in report["metrics"].items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"metric {key} = {value!r} is not a finite number"
    return None


def _node_name(node_id: int, names: dict[int, str]) -> str:
    return f"{names[node_id]} (node {node_id})" if node_id in names else f"node {node_id}"


def _float32(arrays: ArrayRecord) -> dict:
    # Server optimisers (FedAdam) compute in float64; the model and checkpoints are float32.
    return {
        k: v.float() if v.is_floating_point() else v
        for k, v in arrays.to_torch_state_dict().items()
    }


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """A server optimiser's moments (FedAdam's m_t and v_t) and the pooled target
    (`federation.pooled_target`), as tensors to checkpoint."""
    out: dict[str, torch.Tensor] = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            out[f"{name}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    pooled = getattr(strategy, "pooled", None)
    if pooled is not None:
        out["pooled/sum"], out["pooled/count"] = pooled[0], torch.tensor(float(pooled[1]))
    return out


def restore_strategy_state(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    for name in ("m_t", "v_t"):
        moments = {
            key.split("/", 1)[1]: value.numpy()
            for key, value in tensors.items()
            if key.startswith(f"{name}/")
        }
        if moments:
            setattr(strategy, name, moments)
    if "pooled/sum" in tensors:
        strategy.pooled = (tensors["pooled/sum"].double(), int(tensors["pooled/count"].item()))


def rotation_turn(node_ids: Iterable[int], server_round: int, size: int) -> list[int]:
    """The `size` nodes whose turn round `server_round` (from 1) is: the connected nodes
    in a fixed order (by id), `size` at a time, wrapping around. Over any run of
    consecutive rounds, no node has more than one turn more than another."""
    ordered = sorted(node_ids)
    start = (server_round - 1) * size
    return [ordered[(start + i) % len(ordered)] for i in range(min(size, len(ordered)))]


def build_strategy(cfg: FedgenConfig, recorder: RoundRecorder, first_round: int = 1) -> Strategy:
    """The configured strategy; `first_round` > 1 when a resumed run continues (Flower
    counts its rounds from 1, so rounds are shifted to the run's own numbering)."""
    offset = first_round - 1
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
    elif fed.strategy in ("krum", "multikrum"):
        kwargs["num_malicious_nodes"] = fed.malicious_clients

    needed, why = fed.min_replies, f"federation.min_replies={fed.min_replies}"
    if fed.strategy in ("krum", "multikrum") and needed < 2 * fed.malicious_clients + 3:
        # Flower's Krum scores with whatever it gets; below 2f+3 updates its tolerance of
        # f hostile clients no longer holds, so such a round must not pass as robust.
        needed = 2 * fed.malicious_clients + 3
        why = (
            f"the {needed} that {fed.strategy} needs to tolerate "
            f"federation.malicious_clients={fed.malicious_clients}"
        )

    class RecordingStrategy(base):  # type: ignore[valid-type, misc]
        _sampled: list[int] = []  # nodes sent a message this round (set by configure_train)
        _names: dict[int, str] = {}  # node id -> client id, learned from replies
        _nodes: int | None = None  # nodes connected when this round sampled
        node_of: dict[str, int] = {}  # client id (or "node N") -> node id, for the tally
        # `federation.pooled_target`: the sum of every accepted release so far, and how
        # many; sent to each client with the weights.
        pooled: tuple[torch.Tensor, int] | None = None

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            server_round += offset
            hold_point(server_round)  # a test hook; does nothing unless its variable is set
            recorder.round_started()
            self._sent = arrays
            self._round, self._grid = server_round, grid  # for the rotation's turn
            messages = list(super().configure_train(server_round, arrays, config, grid))
            if fed.pooled_target and self.pooled is not None:
                total, count = self.pooled
                pooled = ArrayRecord({"sum": total, "count": torch.tensor([float(count)])})
                for message in messages:
                    message.content["pooled"] = pooled
            self._sampled = [m.metadata.dst_node_id for m in messages]
            self._nodes = len(list(grid.get_node_ids()))
            return messages

        def _construct_messages(
            self, record: RecordDict, node_ids: list[int], message_type: str
        ) -> Iterable[Message]:
            # Flower samples at random; under `federation.sampling: rotation` the round's
            # turn replaces that sample (same size), so no client is trained more often
            # than its privacy plan covers.
            if fed.sampling == "rotation" and message_type == MessageType.TRAIN:
                node_ids = rotation_turn(self._grid.get_node_ids(), self._round, len(node_ids))
                # Flower's log has just reported its own sample: say what replaced it.
                log(
                    INFO,
                    "rotation: round %s trains its turn instead, nodes %s",
                    self._round,
                    node_ids,
                )
            return super()._construct_messages(record, node_ids, message_type)

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            server_round += offset
            replies = list(replies)
            waited = fed.round_timeout
            if server_round == first_round and fed.first_round_timeout:
                waited = fed.first_round_timeout
            updates, declined, failures, silent = split_replies(
                replies, self._sampled, self._names, waited
            )
            missing = []
            for node in silent:  # may have trained: provisional until their history says
                label = self._names.get(node, f"node {node}")
                self.node_of[label] = node
                missing.append(label)
            kept, rejected, releases = self._screen(server_round, updates, failures)
            # Every client that trained spent privacy, whatever happens to the round next.
            reports = [*(report for _, report in kept), *rejected]
            if len(kept) < needed:
                recorder.record(
                    server_round, None, reports, failures, declined, missing, nodes=self._nodes
                )
                raise RuntimeError(
                    f"round {server_round}: {plural(len(kept), 'client update')}, fewer than {why}; "
                    f"declined: {[d['client_id'] for d in declined]}, failures: {failures}"
                )
            try:
                arrays, metrics = super().aggregate_train(server_round, [r for r, _ in kept])
            except BaseException:
                recorder.record(
                    server_round, None, reports, failures, declined, missing, nodes=self._nodes
                )
                raise
            # A release joins the pool only with a round that completes.
            self.pooled = pool_releases(self.pooled, releases)
            frozen = recorder.frozen_prefixes(server_round)
            if arrays is not None and frozen:
                # Clients return frozen parts unchanged, but a server optimiser (FedAdam's
                # momentum) would still move them: keep exactly what was sent.
                for key in arrays:
                    if key.startswith(frozen):
                        arrays[key] = self._sent[key]
            # The recorder commits the weights and this server state before it writes
            # anything that claims the round.
            line = recorder.record(
                server_round,
                _float32(arrays) if arrays is not None else None,
                reports,
                failures,
                declined,
                missing,
                strategy=strategy_state(self),
                nodes=self._nodes,
            )
            recorder.print_progress(line)
            return arrays, metrics

        def _screen(
            self, server_round: int, updates: list[Message], failures: list[str]
        ) -> tuple[list[tuple[Message, dict[str, Any]]], list[dict[str, Any]], list[torch.Tensor]]:
            """Keep the well-formed updates that pass `fedgen.updates.check_update`, with
            their reports and (`federation.pooled_target`) their releases, taken out of
            the reply for Flower's aggregation; the others are named in `failures`, and
            those whose privacy record could be read are returned as privacy-only
            reports."""
            sent = self._sent.to_torch_state_dict()
            bound = max_weight_change(cfg, cfg.stage(server_round))
            expected = EXPECTED_RECORDS
            if fed.pooled_target:
                expected = {**EXPECTED_RECORDS, "release": ArrayRecord}
            kept, rejected, releases = [], [], []
            for reply in updates:
                report, release = None, None
                try:
                    report = client_report(reply)
                    received = reply.content["arrays"].to_torch_state_dict()
                    reason = _malformed(reply, report, expected) or check_update(
                        sent, received, bound
                    )
                    if reason is None and fed.pooled_target:
                        release = reply.content["release"].to_torch_state_dict()["sum"]
                        reason = check_release(
                            release,
                            release_shape(cfg, NUM_CLASSES),
                            report["num_examples"],
                            report.get("noise_multiplier", 0.0),
                        )
                        received = {**received, RELEASE_KEY: release}
                    # The audit log names what was received; the device's ledger names
                    # what it sent: the same digest when nothing changed on the way.
                    report["update_sha256"] = tensors_digest(received)
                except Exception:  # whatever a client sends, the server carries on
                    reason = "malformed-reply"
                if reason is None and report is not None:
                    if release is not None:
                        releases.append(release)
                        del reply.content["release"]  # Flower aggregates one ArrayRecord
                    kept.append((reply, report))
                    continue
                failures.append(
                    f"{_node_name(reply.metadata.src_node_id, self._names)}: "
                    f"update rejected: {reason}"
                )
                if report is not None:
                    rejected.append({**report, "metrics": {}})
            # Flower requires the same metric keys from every reply it aggregates.
            if kept:
                common = set.intersection(*(set(r.content["metrics"]) for r, _ in kept))
                for r, _ in kept:
                    r.content["metrics"] = MetricRecord(
                        {k: v for k, v in r.content["metrics"].items() if k in common}
                    )
            return kept, rejected, releases

    RecordingStrategy.__name__ = f"Recording{base.__name__}"
    return RecordingStrategy(**kwargs)
