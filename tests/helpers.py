"""Small, fast settings shared by tests (a few seconds of CPU per round)."""

from __future__ import annotations

from fedgen.config import FedgenConfig, load_config

SMALL = [
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


def small_config(*overrides: str) -> FedgenConfig:
    return load_config(None, [*SMALL, *overrides])
