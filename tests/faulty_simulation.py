"""A simulated federation in which some clients fail: run as
`python -m tests.faulty_simulation OUT` by tests/test_faults.py.

The ClientApp wraps fedgen's own: in round 2, partition 1 raises and partition 2 answers
only after the round's timeout; every other call is fedgen's ClientApp unchanged."""

from __future__ import annotations

import sys
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import train as fedgen_train
from fedgen.config import load_config
from fedgen.reports import RunDir
from server.simulation import simulate
from tests.helpers import SMALL

ROUND_TIMEOUT = 45.0
OVERRIDES = [
    *SMALL,
    "federation.num_clients=4",
    "federation.min_train_clients=4",
    "federation.min_replies=2",
    "federation.rounds=3",
    f"federation.round_timeout={ROUND_TIMEOUT}",
    "federation.client_cpus=0.5",
    "run.eval_every=10",
    "evaluation.samples=100",
    "evaluation.downstream=never",
    "evaluation.evaluator_epochs=1",
]

faulty = ClientApp()


@faulty.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if server_round == 2 and pid == 1:
        raise RuntimeError("injected failure: client 1 crashed in round 2")
    if server_round == 2 and pid == 2:
        time.sleep(ROUND_TIMEOUT + 5)  # the server has moved on by then
    return fedgen_train(msg, context)


if __name__ == "__main__":
    cfg = load_config(None, OVERRIDES)
    run = RunDir.create(cfg, sys.argv[1])
    simulate(cfg, run, faulty)
