"""A ServerApp that tries, round after round, to make devices spend more privacy than
their owners allow: DP off, a larger delta, replayable noise, a bigger batch, a higher
target, another neighbouring relation, and a new run on the same devices. It records every
reply in `out/hostile.json` for the test to judge."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgen.config import load_config
from fedgen.models import build_model

app = ServerApp()

# (name, overrides on top of the honest config, run id, round)
ATTEMPTS = [
    ("honest", [], "run-1", 1),
    ("dp-off", ["privacy.enabled=false"], "run-1", 2),
    ("raise-delta", ["privacy.delta=0.2"], "run-1", 2),
    ("reproducible-noise", ["privacy.reproducible_noise=true"], "run-1", 2),
    ("bigger-batch", ["training.batch_size=48"], "run-1", 2),
    ("higher-target", ["privacy.target_epsilon=50"], "run-1", 2),
    (
        "add-remove",
        [
            "privacy.neighboring=add_remove",
            "privacy.accountant=rdp",
            "privacy.public_num_examples=50000",
        ],
        "run-1",
        2,
    ),  # fmt: skip
    ("new-run", [], "run-2", 1),
]


def _reply(msg: Message) -> dict:
    if msg.has_error():
        return {"records": ["error"], "reason": msg.error.reason}
    records = sorted(msg.content.keys())
    out: dict = {"records": records}
    for key in ("declined", "failed"):
        if key in records:
            out["code"] = str(msg.content[key]["code"])
            out["client"] = str(msg.content[key]["client-id"])
    if "privacy" in records:
        out["client"] = str(msg.content["privacy"]["client-id"])
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    overrides = str(run_config["overrides"]).split()
    out = Path(str(run_config["out"]))
    out.mkdir(parents=True, exist_ok=True)
    expected = int(run_config["nodes"])
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    honest = load_config(None, overrides)
    weights = ArrayRecord(build_model(honest.model, 10, seed=0).state_dict())
    results: dict[str, list[dict]] = {}

    def messages_for(
        extra: list[str], run_id: str, server_round: int, to: list[int]
    ) -> list[Message]:
        cfg = load_config(None, [*overrides, *extra])
        config = ConfigRecord(
            {"fedgen-config": cfg.to_json(), "server-round": server_round, "run-id": run_id}
        )
        return [
            Message(
                content=RecordDict({"arrays": weights, "config": config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in to
        ]

    # The honest round first, on every device (the hostile ones judge against its ledger),
    # then every hostile request at once, each to one device in turn (the devices run the
    # same policy; each message starts a ClientApp process, seconds of CPU): each device
    # answers them one by one under its lock, and nothing in a decline depends on the order.
    (name, extra, run_id, server_round), *hostile = ATTEMPTS
    honest_round = messages_for(extra, run_id, server_round, nodes)
    results[name] = [_reply(r) for r in grid.send_and_receive(honest_round, timeout=300)]
    sent: dict[str, str] = {}
    for i, (name, extra, run_id, server_round) in enumerate(hostile):
        batch = messages_for(extra, run_id, server_round, [nodes[i % len(nodes)]])
        for message_id in grid.push_messages(batch):
            sent[message_id] = name
        results[name] = []
    waiting, deadline = set(sent), time.monotonic() + 300
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(waiting):
            asked = reply.metadata.reply_to_message_id
            waiting.discard(asked)
            results[sent[asked]].append(_reply(reply))
        time.sleep(0.5)
    (out / "hostile.json").write_text(json.dumps(results, indent=2))
