import atexit
import copy
import json
import shutil
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict
from opacus.validators import ModuleValidator

from clients.app import train as client_train
from fedgen.config import PrivacyConfig
from fedgen.data import client_partition
from fedgen.dp_sgd import make_private
from fedgen.models import Discriminator, Generator, build_gan
from fedgen.privacy import epsilon_of
from fedgen.secure_random import SecureRandom
from fedgen.training import (
    discriminator_step,
    generator_step,
    mode_seeking_penalty,
)

from .helpers import small_config, train_message


def test_discriminator_passes_opacus_validator_unchanged():
    cfg = small_config()
    disc = build_gan(cfg.model).discriminator
    assert ModuleValidator.validate(disc, strict=False) == []
    assert not any(getattr(m, "inplace", False) for m in disc.modules())


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _private(disc, opt, x, y, clip):
    return make_private(
        disc,
        opt,
        (x, y),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=1.0,
        expected_batch_size=len(x),
        history=[],
        rng=SecureRandom(),
    )


def _one_update(x, y, private: bool, clip: float) -> torch.Tensor:
    torch.manual_seed(0)
    disc = Discriminator(channels=8, num_classes=10, groups=4)
    before = _flat(disc).clone()
    opt = torch.optim.SGD(disc.parameters(), lr=1.0)
    module = disc
    if private:
        module, opt, _, _ = _private(disc, opt, x, y, clip)
    discriminator_step(module, opt, x, y)
    return _flat(disc) - before


def test_clipping_bounds_one_examples_influence(mnist_dir):
    from fedgen.data import load_mnist, to_tensors

    x, y = to_tensors(load_mnist(mnist_dir, "test", download=False).subset(np.arange(16)))
    x_big = x.clone()
    x_big[3] *= 1000.0
    clip = 1.0
    change = (_one_update(x, y, True, clip) - _one_update(x_big, y, True, clip)).norm()
    # With SGD(lr=1) the update is -(sum of clipped per-example grads)/B: changing one
    # example moves the sum by at most 2C, the update by at most 2C/B.
    bound = 2 * clip / len(x)
    assert change <= bound * (1 + 1e-4)
    assert change > 0.01 * bound  # the example did matter
    unclipped = (_one_update(x, y, False, clip) - _one_update(x_big, y, False, clip)).norm()
    assert unclipped > 2 * bound  # without clipping the same change breaks the bound


def _train_message(cfg, weights, server_round, ledger_dir=None, run_id="run-a"):
    # The server names the folder standing in for each simulated device's disk.
    if ledger_dir is None:
        ledger_dir = tempfile.mkdtemp(prefix="fedgen-ledgers-")
        atexit.register(shutil.rmtree, ledger_dir, True)  # not left in /tmp by every run
    return train_message(
        cfg, weights, server_round, **{"run-id": run_id, "sim-ledger-dir": str(ledger_dir)}
    )


def _context(cfg, partition_id: int) -> Context:
    # The context a simulated SuperNode gives its ClientApp; `state` persists across rounds.
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": cfg.federation.num_clients},
        state=RecordDict(),
        run_config={},
    )


@pytest.mark.parametrize(
    ("settings", "threads"),
    [
        ([], 1),
        (["federation.client_cpus=2"], 2),
        (["federation.client_cpus=2", "federation.client_threads=1"], 1),
    ],
)
def test_a_client_trains_with_the_threads_its_config_gives(tmp_path, settings, threads):
    cfg = small_config("training.local_steps=2", *settings)
    assert cfg.federation.torch_threads == threads
    weights = build_gan(cfg.model, seed=0).state_dict()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither answer: the ClientApp must set it
        reply = client_train(_train_message(cfg, weights, 1, tmp_path), _context(cfg, 0))
        assert "arrays" in reply.content
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_client_reply_holds_only_weights_scalars_and_its_cumulative_history(tmp_path):
    cfg = small_config()
    model = build_gan(cfg.model, seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    data = client_partition(cfg, 1, cfg.federation.num_clients)
    context = _context(cfg, 1)
    weights = model.state_dict()
    epsilons = []
    for server_round in (1, 2, 3):
        reply = client_train(_train_message(cfg, weights, server_round, tmp_path), context)
        content = reply.content
        assert set(content.keys()) == {"arrays", "metrics", "privacy"}
        arrays = content["arrays"].to_torch_state_dict()
        # Exactly the model's weights: nothing shaped like an image batch or label vector.
        assert {k: tuple(v.shape) for k, v in arrays.items()} == shapes
        for v in arrays.values():
            assert v.shape[0:1] != (len(data),)
            assert tuple(v.shape[-3:]) != (1, 28, 28)
        metrics = dict(content["metrics"])
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        assert metrics["num-examples"] == len(data)
        privacy = dict(content["privacy"])
        assert all(isinstance(v, (str, int, float)) for v in privacy.values())
        history = json.loads(privacy["history"])
        assert all(len(h) == 3 for h in history)
        # Cumulative: the history covers every round so far, and a fresh accountant agrees.
        assert sum(h[2] for h in history) == server_round * cfg.training.local_steps
        recomputed = epsilon_of(
            [tuple(h) for h in history], cfg.privacy.delta, "pld", "replace_one"
        )
        assert metrics["epsilon"] == pytest.approx(recomputed, rel=1e-9)
        epsilons.append(metrics["epsilon"])
        weights = copy.deepcopy(arrays)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] <= cfg.privacy.target_epsilon


def _chunked_update(x, y, fake, fake_y, private: bool, physical: int | None) -> torch.Tensor:
    torch.manual_seed(0)
    disc = Discriminator(channels=8, num_classes=10, groups=4)
    before = _flat(disc).clone()
    opt = torch.optim.SGD(disc.parameters(), lr=1.0)
    module = disc
    if private:
        module, opt, _, record = _private(disc, opt, x, y, 0.1)
    discriminator_step(module, opt, x, y, fake, fake_y, physical_batch_size=physical)
    if private:  # one logical batch is one accounted step, however many passes it took
        assert record.history == [(0.0, 1.0, 1)]
    return _flat(disc) - before


@pytest.mark.parametrize("private", [True, False])
def test_physical_batches_give_the_logical_batch_update(private):
    gen = torch.Generator().manual_seed(1)
    x, fake = torch.rand(13, 1, 28, 28, generator=gen) * 2 - 1, torch.rand(9, 1, 28, 28) * 2 - 1
    y, fake_y = torch.randint(0, 10, (13,), generator=gen), torch.randint(0, 10, (9,))
    whole = _chunked_update(x, y, fake, fake_y, private, None)
    chunked = _chunked_update(x, y, fake, fake_y, private, 5)  # 22 rows: 5 passes
    assert whole.norm() > 0
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("enabled", [True, False])
def test_physical_batches_in_plain_dp_sgd(enabled):
    from fedgen.training import train_dp_locally

    gen = torch.Generator().manual_seed(2)
    x, target = torch.randn(200, 6, generator=gen), torch.randn(200, 2, generator=gen)
    privacy = PrivacyConfig(enabled=enabled, reproducible_noise=True, max_grad_norm=0.5)

    def run(physical):
        torch.manual_seed(0)
        net = torch.nn.Linear(6, 2)
        history = train_dp_locally(
            net,
            (x, target),
            lambda m, a, b: ((m(a) - b) ** 2).mean(),
            3,
            64,
            0.1,
            privacy,
            0.0,
            [],
            torch.device("cpu"),
            seed=7,
            physical_batch_size=physical,
        )
        return _flat(net), history.history

    (whole, h1), (chunked, h2) = run(None), run(10)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    assert h1 == h2 and len(h1) == (1 if enabled else 0)


def _class_spread(gen, label: int = 3, n: int = 64) -> float:
    """Mean pixel distance between samples of one class drawn from different latents."""
    torch.manual_seed(123)
    with torch.no_grad():
        images = gen(torch.randn(n, gen.latent_dim), torch.full((n,), label))
    return float((images[: n // 2] - images[n // 2 :]).abs().mean())


def _without_adversary(code_dims: int = 0) -> tuple[Generator, Discriminator]:
    """A small generator and a discriminator whose head is zero: it gives the generator no
    adversarial gradient, so whatever moves the generator is the term under test alone."""
    torch.manual_seed(0)
    gen = Generator(latent_dim=16, channels=16, num_classes=10, groups=4, code_dims=code_dims)
    disc = Discriminator(channels=8, num_classes=10, groups=4)
    with torch.no_grad():
        disc.head.weight.zero_()
    return gen, disc


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_mode_seeking_term_spreads_samples_of_one_class(weight):
    gen, disc = _without_adversary()
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    before = _class_spread(gen)
    for _ in range(30):
        generator_step(gen, disc, opt, 32, 10, mode_seeking_weight=weight)
    after = _class_spread(gen)
    if weight == 0.0:
        assert after == pytest.approx(before)
    else:
        assert after > 1.5 * before


def _code_error(gen, n: int = 256) -> float:
    """How far the generator's code head reads its latent codes off its own images."""
    torch.manual_seed(321)
    z = torch.randn(n, gen.latent_dim)
    with torch.no_grad():
        read = gen.code_head(gen(z, torch.randint(0, 10, (n,))))
    return float(F.mse_loss(read, z[:, : gen.code_head.dims]))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_latent_code_term_makes_the_latent_readable_from_the_image(weight):
    """With no adversarial gradient (a zero discriminator head), what moves the generator
    and its code head is the latent-code term alone: with it, the codes become readable
    from the image (error well under their variance, 1), so the image depends on them;
    without it, neither network moves."""
    gen, disc = _without_adversary(code_dims=2)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3, betas=(0.5, 0.999))
    before = _code_error(gen)
    for _ in range(60):
        generator_step(gen, disc, opt, 64, 10, latent_code_weight=weight)
    after = _code_error(gen)
    if weight == 0.0:
        assert after == pytest.approx(before)
    else:
        assert before > 0.8 and after < 0.5 * before, (before, after)


def test_mode_seeking_penalty_falls_as_latents_give_different_images():
    z = torch.randn(8, 4)
    same = torch.zeros(8, 1, 28, 28)
    varied = torch.cat([torch.zeros(4, 1, 28, 28), torch.ones(4, 1, 28, 28)])
    assert mode_seeking_penalty(varied, z) < 1e-3 * mode_seeking_penalty(same, z)
