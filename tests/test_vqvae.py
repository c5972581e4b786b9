"""VQ-VAE and code prior: exact per-example gradients under Opacus, shapes, causality."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedgen.config import ModelConfig
from fedgen.training import train_dp_locally
from fedgen.vqvae import (
    GRID,
    VQVAE,
    CodePrior,
    MaskedConv2d,
    codebook_stats,
    encode_codes,
    prior_loss,
    vqvae_loss,
)

from .helpers import small_config

B = 6
NUM_CLASSES = 10


def tiny(*overrides: str) -> ModelConfig:
    return small_config(
        "model.type=vqvae",
        "model.vq_channels=8",
        "model.code_dim=4",
        "model.codebook_size=16",
        "model.prior_channels=16",
        "model.prior_layers=3",
        *overrides,
    ).model


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen) * 2 - 1


def vqvae_with_used_codebook(cfg: ModelConfig, images: torch.Tensor) -> VQVAE:
    """A VQ-VAE whose codebook entries sit on some of the encoder's outputs, so that many
    codes are nearest somewhere in `images` (the codebook gradient is then not trivially 0)."""
    torch.manual_seed(0)
    model = VQVAE(cfg)
    with torch.no_grad():
        z = model.encode(images).permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
        pick = torch.randperm(z.shape[0])[: cfg.codebook_size]
        model.codebook.weight.copy_(z[pick] + 0.01 * torch.randn(cfg.codebook_size, cfg.code_dim))
    return model


def assert_per_sample_grads_exact(
    model: nn.Module, loss_fn: Callable[[nn.Module, int | None], torch.Tensor], n: int
) -> GradSampleModule:
    """Opacus's grad_sample rows (one batched backward) == plain autograd on each example
    alone, for every trainable parameter. `loss_fn(m, None)` is the batch loss,
    `loss_fn(m, i)` the loss of a batch holding example i only."""
    gsm = GradSampleModule(copy.deepcopy(model))  # hooks mode, loss_reduction="mean"
    loss_fn(gsm, None).backward()
    wrapped = dict(gsm._module.named_parameters())
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss_fn(model, i).backward()
        for name, p in model.named_parameters():
            gs = wrapped[name].grad_sample
            assert gs is not None and gs.shape == (n, *p.shape), name
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(gs[i], expected, rtol=1e-4, atol=1e-6, msg=name)
    return gsm


def test_vqvae_per_sample_gradients_match_autograd_including_codebook() -> None:
    cfg = tiny()
    images = random_images(B)
    model = vqvae_with_used_codebook(cfg, images)
    _, codes, _ = model(images)
    assert codes.unique().numel() >= 4  # several codebook rows take part

    def loss_fn(m: nn.Module, i: int | None) -> torch.Tensor:
        return vqvae_loss(m, images if i is None else images[i : i + 1])[0]

    gsm = assert_per_sample_grads_exact(model, loss_fn, B)
    codebook_gs = gsm._module.codebook.weight.grad_sample
    assert codebook_gs.abs().sum() > 0
    for i in range(B):
        # Example i moves exactly the codebook rows it uses.
        touched = codebook_gs[i].abs().sum(1) > 0
        used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
        used[codes[i].unique()] = True
        assert torch.equal(touched, used)


@pytest.mark.parametrize(("class_map", "label_scale"), [(False, 1.0), (True, 1.0), (True, 5.0)])
def test_prior_per_sample_gradients_match_autograd(class_map: bool, label_scale: float) -> None:
    cfg = tiny(f"model.prior_class_map={class_map}", f"model.prior_label_scale={label_scale}")
    torch.manual_seed(1)
    prior = CodePrior(cfg, NUM_CLASSES)
    if class_map:  # a non-zero table, so that its gradient is not trivially that of zeros
        nn.init.normal_(prior.class_logits.weight)
    codes = torch.randint(0, cfg.codebook_size, (B, GRID, GRID))
    labels = torch.randint(0, NUM_CLASSES, (B,))

    def loss_fn(m: nn.Module, i: int | None) -> torch.Tensor:
        if i is None:
            return prior_loss(m, codes, labels)
        return prior_loss(m, codes[i : i + 1], labels[i : i + 1])

    assert_per_sample_grads_exact(prior, loss_fn, B)


def test_empty_batch_gives_zero_loss_and_a_dp_step() -> None:
    # Poisson sampling draws empty batches; the DP step (noise only) must still run.
    cfg = tiny()
    cases: list[tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]] = [
        (VQVAE(cfg), lambda m: vqvae_loss(m, random_images(0))[0]),
        (
            CodePrior(cfg, NUM_CLASSES),
            lambda m: prior_loss(
                m, torch.zeros(0, GRID, GRID, dtype=torch.long), torch.zeros(0, dtype=torch.long)
            ),
        ),
    ]
    for model, loss_fn in cases:
        gsm = GradSampleModule(model)
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
        opt.zero_grad()
        loss = loss_fn(gsm)
        assert float(loss.detach()) == 0.0
        loss.backward()
        opt.step()


def test_module_validator_accepts_both_models() -> None:
    cfg = ModelConfig(type="vqvae")
    assert ModuleValidator.validate(VQVAE(cfg), strict=False) == []
    assert ModuleValidator.validate(CodePrior(cfg), strict=False) == []
    mapped = ModelConfig(type="vqvae", prior_class_map=True)
    assert ModuleValidator.validate(CodePrior(mapped), strict=False) == []


def test_shapes_and_ranges() -> None:
    cfg = tiny()
    model = VQVAE(cfg)
    images = random_images(5)
    z_e = model.encode(images)
    assert z_e.shape == (5, cfg.code_dim, GRID, GRID)
    z_q, codes, vq = model.quantize(z_e)
    assert z_q.shape == z_e.shape and vq.shape == (5,)
    assert codes.shape == (5, GRID, GRID) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    out = model.decode(z_q)
    assert out.shape == (5, 1, 28, 28) and out.abs().max() <= 1.0
    recon, fwd_codes, fwd_vq = model(images)
    assert recon.shape == (5, 1, 28, 28) and torch.equal(fwd_codes, codes)
    assert fwd_vq.shape == (5,)
    decoded = model.decode_codes(codes)
    assert decoded.shape == (5, 1, 28, 28) and not decoded.requires_grad
    torch.testing.assert_close(decoded, recon.detach())
    assert torch.equal(encode_codes(model, images, batch_size=2), codes)

    prior = CodePrior(cfg, NUM_CLASSES)
    labels = torch.arange(4)
    assert prior(codes[:4], labels).shape == (4, cfg.codebook_size, GRID, GRID)
    drawn = prior.sample(labels, torch.Generator().manual_seed(3))
    assert drawn.shape == (4, GRID, GRID) and drawn.dtype == torch.long
    assert int(drawn.min()) >= 0 and int(drawn.max()) < cfg.codebook_size
    assert torch.equal(drawn, prior.sample(labels, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(labels, temperature=0.0)


def test_groups_must_divide_width() -> None:
    with pytest.raises(ValueError, match="model.groups"):
        VQVAE(tiny("model.vq_channels=10"))


@pytest.mark.parametrize(
    ("layers", "class_map"), [(2, False), (3, False), (4, False), (7, False), (3, True), (4, True)]
)
def test_prior_is_causal_and_sees_every_earlier_position(layers: int, class_map: bool) -> None:
    cfg = tiny(f"model.prior_layers={layers}", f"model.prior_class_map={class_map}")
    torch.manual_seed(2)
    prior = CodePrior(cfg, NUM_CLASSES).double()  # float64: "unchanged" is then clear-cut
    if class_map:
        nn.init.normal_(prior.class_logits.weight)
    base = torch.randint(0, cfg.codebook_size, (1, GRID, GRID))
    label = torch.tensor([3])
    n = GRID * GRID
    # Row q of the batch: the base grid with the code at raster position q changed.
    changed = base.repeat(n, 1, 1).view(n, n)
    changed[torch.arange(n), torch.arange(n)] = (base.view(n) + 1) % cfg.codebook_size
    with torch.no_grad():
        ref = prior(base, label).flatten(2)[0]  # (K, 49)
        out = prior(changed.view(n, GRID, GRID), label.repeat(n)).flatten(2)  # (49, K, 49)
        depends = (out - ref).abs().amax(1) > 1e-9  # [q, p]: logits at p moved when q did
        expected = torch.arange(n)[None, :] > torch.arange(n)[:, None]  # p after q only
        assert torch.equal(depends, expected)

        # The label reaches every position, the first included.
        other = prior(base, torch.tensor([4])).flatten(2)[0]
        assert bool(((other - ref).abs().amax(0) > 1e-9).all())

        # Sampling computes row r from rows 0..r only: that must give the same logits.
        full = prior(base, label)
        for r in range(GRID):
            torch.testing.assert_close(prior(base[:, : r + 1], label)[:, :, r], full[:, :, r])


@pytest.mark.parametrize(
    ("kernel", "mask"), [((7, 13), "A"), ((3, 3), "B"), ((1, 3), "A"), ((3, 1), "A")]
)
def test_masked_convolution_is_a_convolution_with_the_masked_kernel(kernel, mask) -> None:
    """The split kernel (only its unmasked part is a parameter) computes what a plain
    convolution with the full kernel, masked entries 0, computes; and a full kernel saved
    before the split loads into it, whatever its masked entries held."""
    torch.manual_seed(5)
    layer = MaskedConv2d(4, 6, kernel, mask).double()
    kh, kw = kernel
    x = torch.randn(3, 4, GRID, GRID, dtype=torch.float64)
    full = layer.weight
    assert full.shape == (6, 4, kh, kw)
    masked = torch.zeros(kh, kw, dtype=torch.bool)  # what the layer must not see
    masked[kh // 2 + 1 :] = True
    masked[kh // 2, kw // 2 + (mask == "B") :] = True
    assert bool((full[:, :, masked] == 0).all()) and bool((full[:, :, ~masked] != 0).all())
    conv = nn.functional.conv2d(x, full, layer.bias, padding=(kh // 2, kw // 2))
    torch.testing.assert_close(layer(x), conv)

    old = full + torch.randn_like(full) * masked  # a pre-split checkpoint: junk where masked
    fresh = MaskedConv2d(4, 6, kernel, mask).double()
    fresh.load_state_dict({"weight": old, "bias": layer.bias.detach()})
    torch.testing.assert_close(fresh(x), conv)
    assert set(fresh.state_dict()) == {k for k, _ in fresh.named_parameters()}


def test_a_masked_convolution_that_sees_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="sees nothing"):
        MaskedConv2d(2, 2, (1, 1), "A")


def test_the_label_scale_keeps_the_function_and_scales_the_label_gradients() -> None:
    """prior_label_scale s: the label's tables enter times s with weights divided by s, so
    the prior computes the same function, while the tables' gradients are s times larger
    (a larger share of the clipped per-example gradient) and every other one is unchanged."""
    codes = torch.randint(0, 16, (B, GRID, GRID), generator=torch.Generator().manual_seed(6))
    labels = torch.arange(B) % NUM_CLASSES
    grads, outputs = [], []
    for scale in (1.0, 4.0):
        torch.manual_seed(7)
        prior = CodePrior(tiny(f"model.prior_label_scale={scale}"), NUM_CLASSES).double()
        with torch.no_grad():  # the same non-zero table function at both scales
            table = torch.randn(
                prior.class_logits.weight.shape, generator=torch.Generator().manual_seed(8)
            )
            prior.class_logits.weight.copy_(table / scale)
        prior_loss(prior, codes, labels).backward()
        outputs.append(prior(codes, labels).detach())
        grads.append({n: p.grad for n, p in prior.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0])
    for name, g in grads[0].items():
        factor = 4.0 if name.startswith(("label_embedding", "class_logits")) else 1.0
        torch.testing.assert_close(grads[1][name], factor * g, msg=name)
        assert g.abs().sum() > 0, name


def test_under_dp_a_larger_label_scale_learns_the_class_faster() -> None:
    """What prior_label_scale is for: under DP-SGD (same seeds, noise and steps) the prior
    learns which codes go with which class faster when the label's tables get a larger
    share of each clipped gradient. Synthetic codes: class y puts code y at each position
    with probability 0.7; the figure is how often the prior's most likely code is y."""
    n, steps = 600, 40
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % NUM_CLASSES
    noise = torch.randint(0, 16, (n, GRID, GRID), generator=gen)
    keep = torch.rand(n, GRID, GRID, generator=gen) < 0.7
    codes = torch.where(keep, labels[:, None, None].expand(-1, GRID, GRID), noise)
    learnt = {}
    for scale in (1.0, 30.0):
        cfg = small_config(
            "model.type=vqvae", "model.codebook_size=16", "model.prior_channels=16",
            "model.prior_layers=3", f"model.prior_label_scale={scale}",
            "privacy.reproducible_noise=true",
        )  # fmt: skip
        torch.manual_seed(0)
        prior = CodePrior(cfg.model, NUM_CLASSES)
        train_dp_locally(
            prior, (codes, labels), prior_loss, steps, 64, 0.002, cfg.privacy, 1.0, [],
            torch.device("cpu"), seed=1,
        )  # fmt: skip
        with torch.no_grad():
            guess = prior(codes, labels).argmax(1)
        learnt[scale] = float((guess == labels[:, None, None]).float().mean())
    # Measured: 0.56 at scale 1 against 0.87 at scale 30.
    assert learnt[30.0] > learnt[1.0] + 0.15, learnt


def test_codebook_stats() -> None:
    k = 16
    same = codebook_stats(torch.full((10, GRID, GRID), 5), k)
    assert same["usage"] == pytest.approx(1 / k)
    assert same["perplexity"] == pytest.approx(1.0)
    uniform = codebook_stats(torch.arange(k).repeat(20), k)
    assert uniform["usage"] == pytest.approx(1.0)
    assert uniform["perplexity"] == pytest.approx(k)


def test_training_lowers_the_losses() -> None:
    cfg = tiny()
    torch.manual_seed(4)
    model = VQVAE(cfg)
    images = random_images(16, seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(vqvae_loss(model, images)[0].detach())
    for _ in range(20):
        opt.zero_grad()
        loss, stats = vqvae_loss(model, images)
        loss.backward()
        opt.step()
    assert set(stats) == {"recon_mse", "vq_loss"}
    assert float(vqvae_loss(model, images)[0].detach()) < first

    prior = CodePrior(cfg, NUM_CLASSES)
    codes = encode_codes(model, images)
    labels = torch.arange(16) % NUM_CLASSES
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    first = float(prior_loss(prior, codes, labels).detach())
    for _ in range(20):
        opt.zero_grad()
        prior_loss(prior, codes, labels).backward()
        opt.step()
    assert float(prior_loss(prior, codes, labels).detach()) < first


def test_the_configured_temperature_sharpens_the_samples() -> None:
    # model.prior_temperature reaches the sampler: near 0 every draw is the prior's most
    # likely code (all samples of a class alike), at 1 the draws vary.
    from fedgen.models import build_model

    labels = torch.full((32,), 3)
    spread = {}
    for t in (1.0, 1e-4):
        model = build_model(tiny(f"model.prior_temperature={t}"), NUM_CLASSES, seed=5)
        with torch.no_grad():  # peaked but not degenerate logits
            nn.init.normal_(model.prior.class_logits.weight, std=3.0)
        images = model.sample(labels, torch.Generator().manual_seed(0))
        spread[t] = float((images - images.mean(0)).abs().amax())
    assert spread[1e-4] < 1e-6 < spread[1.0]


def test_guidance_is_the_prior_sharpened_by_its_own_class_posterior() -> None:
    # The shared-first-layer path must equal the definition computed the plain way: the
    # prior run once per class, averaged in probability over the classes.
    cfg = tiny()
    torch.manual_seed(6)
    prior = CodePrior(cfg, NUM_CLASSES).double()
    nn.init.normal_(prior.class_logits.weight)
    codes = torch.randint(0, cfg.codebook_size, (4, 5, GRID))  # 5 rows, as while sampling
    labels = torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        cond = prior(codes, labels).log_softmax(1)
        each = torch.stack(
            [prior(codes, torch.full_like(labels, c)).log_softmax(1) for c in range(NUM_CLASSES)]
        )
        unconditional = each.exp().mean(0).log()
        for g in (0.0, 1.0, 2.5):
            torch.testing.assert_close(
                prior.guided_log_probs(codes, labels, g), cond + g * (cond - unconditional)
            )


def test_the_configured_guidance_reaches_the_sampler() -> None:
    from fedgen.models import build_model

    labels = torch.arange(NUM_CLASSES).repeat(3)
    drawn = {}
    for g in (0.0, 2.0):
        model = build_model(tiny(f"model.prior_guidance={g}"), NUM_CLASSES, seed=5)
        drawn[g] = model.sample(labels, torch.Generator().manual_seed(0))
    assert not torch.equal(drawn[0.0], drawn[2.0])
    with pytest.raises(ValueError, match="guidance"):
        CodePrior(tiny(), NUM_CLASSES).sample(labels, guidance=-1.0)
