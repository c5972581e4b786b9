"""Small, fast settings shared by tests (a few seconds of CPU per round)."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from fedgen.config import FedgenConfig, load_config

SMALL = [
    "model.type=gan",  # the suite's shared settings are the GAN's; `mmd` tests add their own
    "data.dataset=glyphs",
    "data.glyphs_per_class=30",
    "federation.num_clients=3",
    "federation.min_train_clients=2",
    "federation.rounds=3",
    "training.local_steps=4",
    "training.d_steps_per_g_step=2",
    "training.batch_size=16",
    "model.generator_channels=16",
    "model.discriminator_channels=8",
    "model.latent_dim=16",
    "model.groups=4",
    "privacy.target_epsilon=2.0",
    "device=cpu",
]

# A simulation's clients one after another in one Ray actor with one torch thread, where a
# test's federation is tiny: each actor costs seconds of CPU to start (torch, Opacus,
# fedgen), and on the suite's two busy cores a second actor buys nothing. One thread, not
# the two cores reserved: with the cores busy with other work, a parallel op waits on a
# descheduled thread (client_cpus=2 alone, two threads, took the loaded suite 47 min
# instead of 36).
ONE_ACTOR = ["federation.client_cpus=2.0", "federation.client_threads=1"]

# The tiny real simulation (Flower + Ray, 3 clients, 3 rounds, every client in every
# round, rounds 2 and 3 evaluated) that several test files read: `tiny_run` in conftest.py
# runs it once for the whole suite.
TINY_RUN_ROUNDS = 3
TINY_RUN = [
    *SMALL,
    f"federation.rounds={TINY_RUN_ROUNDS}",
    "federation.min_train_clients=3",  # every client in every round: histories comparable
    *ONE_ACTOR,
    "run.eval_every=2",  # round 2 evaluated, round 1 not: both kinds of round occur
    "evaluation.samples=100",
    "evaluation.downstream=never",
    "evaluation.evaluator_epochs=1",
    "privacy.reproducible_noise=true",  # a resumed run can be compared number for number
]


def small_config(*overrides: str) -> FedgenConfig:
    return load_config(None, [*SMALL, *overrides])


def delivered(content: dict[str, Any], message_type: str = "train", group: str = "1") -> Message:
    """A message as a SuperNode delivers it to the ClientApp (metadata set by the runtime)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m{group}-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=group,
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(RecordDict(content), metadata=metadata)


def train_message(cfg: FedgenConfig, weights: dict, server_round: int, **config: Any) -> Message:
    """A train message of fedgen's server: the weights, the config, the round, and `config`
    (run-id, sim-ledger-dir, ...)."""
    record = {"fedgen-config": cfg.to_json(), "server-round": server_round, **config}
    content = {"arrays": ArrayRecord(weights), "config": ConfigRecord(record)}
    return delivered(content, group=str(server_round))
