"""The pieces fedgen calls post-processing (the generator, its EMA, its optimizer) read
private data only through the discriminator's DP-trained weights.

The test is a counterfactual replay: train once on data A and record the discriminator's
weights after every DP step; train again on different data B, but instead of training
the discriminator, load the weights recorded on A. If the generator and its EMA read real
images or un-noised gradients of them, the second run's generator would differ from the
first; if they read only the discriminator's weights, it is the same to the last bit.
"""

from __future__ import annotations

import torch

from fedgen import training
from fedgen.data import client_partition, to_tensors
from fedgen.models import build_gan

from .helpers import small_config


def _config():
    return small_config(
        "model.discriminator=scatter",
        "model.discriminator_hidden=16",
        "training.local_steps=6",
        "training.d_steps_per_g_step=1",
        "training.g_steps_per_d_step=2",
        "training.generator_ema=0.9",
        "training.gan_loss=hinge",
        "model.latent_code_dims=2",  # its code head is trained with the generator
    )


def _train(cfg, images, labels, monkeypatch, step, kept=None) -> dict[str, torch.Tensor]:
    """The generator's weights (after its EMA) and its optimizer's state (`g.*`)."""
    monkeypatch.setattr(training, "discriminator_step", step)
    model = build_gan(cfg.model, seed=0)
    result = training.train_gan_locally(
        model,
        images,
        labels,
        cfg.training,
        cfg.privacy,
        noise_multiplier=1.0,
        history=[],
        device=torch.device("cpu"),
        seed=7,
        optimizer_state=kept,
    )
    generator = {k: v for k, v in result.state_dict.items() if k.startswith("generator.")}
    return generator | {k: v for k, v in result.optimizer_state.items() if k.startswith("g.")}


def test_the_generator_reads_real_images_only_through_the_noised_discriminator(monkeypatch):
    cfg = _config()
    images_a, labels_a = to_tensors(client_partition(cfg, 0, 3))
    images_b, labels_b = to_tensors(client_partition(cfg, 1, 3))
    assert not torch.equal(images_a[:10], images_b[:10])
    real_step = training.discriminator_step
    recorded: list[list[torch.Tensor]] = []

    def record(disc, *args, **kwargs):
        loss = real_step(disc, *args, **kwargs)
        recorded.append([p.detach().clone() for p in disc.parameters()])
        return loss

    def replay(disc, *args, **kwargs):
        with torch.no_grad():
            for p, saved in zip(disc.parameters(), recorded.pop(0), strict=True):
                p.copy_(saved)
        return 0.0

    # The client's kept optimizer state from an earlier round: the same in every run.
    kept = {k: v for k, v in _train(cfg, images_a, labels_a, monkeypatch, real_step).items()}
    kept = {k: v for k, v in kept.items() if k.startswith("g.")}
    assert any(k.endswith(".exp_avg_sq") for k in kept)
    on_a = _train(cfg, images_a, labels_a, monkeypatch, record, kept)
    assert len(recorded) == cfg.training.local_steps
    replayed_on_b = _train(cfg, images_b, labels_b, monkeypatch, replay, kept)
    trained_on_b = _train(cfg, images_b, labels_b, monkeypatch, real_step, kept)
    for key, value in on_a.items():
        assert torch.equal(value, replayed_on_b[key]), key
    # The control: data B does reach the generator, through the discriminator's weights.
    assert any(not torch.equal(v, trained_on_b[k]) for k, v in on_a.items())


def test_a_kept_optimizer_state_round_trips_and_is_ignored_for_another_model():
    model = build_gan(_config().model, seed=0)
    opt = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    model.generator(torch.randn(4, model.generator.latent_dim), torch.arange(4)).sum().backward()
    opt.step()
    flat = training.export_adam(opt, "g")
    fresh = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    training.import_adam(fresh, "g", flat)
    stepped = [p for p in model.generator.parameters() if p in opt.state]
    assert stepped and len(fresh.state) == len(stepped)  # the code head was never stepped
    for p in stepped:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][name], opt.state[p][name])
    other = build_gan(small_config("model.generator_channels=8").model, seed=0)
    ignored = torch.optim.Adam(other.generator.parameters(), lr=1e-3)
    training.import_adam(ignored, "g", flat)
    assert not ignored.state  # a state of another shape starts the moments afresh
