"""Local training of a class-conditional GAN with DP-SGD on the discriminator.

Why this is private (sample level, per client):
- Only the discriminator's loss on *real* images reads private data. Its gradient is taken
  per example, clipped to `max_grad_norm` and noised by Opacus's DPOptimizer, on
  Poisson-sampled batches; the accountant records every such step.
- The discriminator's loss on *fake* images and the FedProx proximal term depend only on
  the generator, the current (already privatised) weights and fresh randomness. Their
  gradient is added after clipping and noising, so it is post-processing of DP outputs:
  it costs no privacy and is not noised (Opacus issue #418 makes the same point about the
  DCGAN example, which clips real and fake gradients together). The fake-image gradient
  is clipped per example at the same bound, for balance only (see _split_fake_rows).
- The generator sees private data only through the discriminator's weights, so its
  updates are post-processing too (the optional mode-seeking term reads generated images
  only).
- Metrics that leave the client are computed on generated data only (the loss on real
  images is not reported: it is an un-noised statistic of private data; neither are
  timings, which depend on the sampled batches).
- The DP randomness (noise, Poisson sampling) comes from a ChaCha20 stream keyed from OS
  entropy on the client (`fedgen.secure_random`), unless `privacy.reproducible_noise` asks
  for seeded, replayable runs (simulation only; devices refuse it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedgen.config import PrivacyConfig, TrainingConfig
from fedgen.models import ConditionalGAN
from fedgen.privacy import HistoryEntry, StepRecord
from fedgen.secure_random import SecureRandom

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


def _opacus() -> tuple[type, type]:
    """Opacus's GradSampleModule and DPOptimizer, imported on first use rather than with
    this module: the import costs about 2 CPU-seconds, and the `mmd` family's rounds
    (which import this module for its optimizer-state helpers) never use Opacus."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    import fedgen.opacus_logging  # noqa: F401  (undoes Opacus's import-time logging setup)

    return GradSampleModule, DPOptimizer


def _is_grad_sample_module(module: object) -> bool:
    return isinstance(module, _opacus()[0])


def _is_dp_optimizer(optimizer: object) -> bool:
    return isinstance(optimizer, _opacus()[1])


__all__ = [
    "DPRound",
    "LocalResult",
    "resolve_device",
    "train_dp_locally",
    "discriminator_step",
    "generator_step",
    "mode_seeking_penalty",
    "train_gan_locally",
    "export_adam",
    "import_adam",
]

ExtraGrads = Callable[[list[nn.Parameter]], list[torch.Tensor]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available; use auto or cpu")
    return torch.device(name)


@dataclass
class LocalResult:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    history: list[HistoryEntry] = field(default_factory=list)
    # The client's optimizer state after the round (flat tensors), for the client to keep;
    # it is never sent (see `export_adam`).
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # `mmd`: this round's noised per-class sums, the round's DP output; sent to the server
    # only when the federation pools targets (`federation.pooled_target`).
    release: torch.Tensor | None = None


class DPRound(NamedTuple):
    """What `train_dp_locally` returns: the accountant history after the round, and the
    Adam state a client keeps (empty unless it asked to keep one)."""

    history: list[HistoryEntry]
    optimizer_state: dict[str, torch.Tensor]


def export_adam(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors `<prefix>.<index>.<name>`.

    Built only from the gradients the optimizer stepped with: under DP, clipped and noised
    ones (the discriminator) or post-processing ones (the generator), so a client may keep
    it across rounds; it stays on the client all the same."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value))
            out[f"{prefix}.{i}.{name}"] = t.detach().cpu().clone()
    return out


def import_adam(
    optimizer: torch.optim.Optimizer, prefix: str, flat: dict[str, torch.Tensor]
) -> None:
    """Load what `export_adam` wrote, if it matches this optimizer's parameters; a state
    from another model shape is ignored (the optimizer starts afresh)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for i, p in enumerate(params):
        entry = {
            key.rsplit(".", 1)[1]: value
            for key, value in flat.items()
            if key.startswith(f"{prefix}.{i}.")
        }
        if not entry:
            continue  # never stepped (no gradient reached it yet): it starts afresh
        for name in ("exp_avg", "exp_avg_sq"):
            if name in entry and entry[name].shape != p.shape:
                return
        # Copies: Adam updates its state in place. The step count stays on the CPU (Adam
        # keeps it there unless it is capturable or fused).
        state[p] = {
            k: v.clone() if k == "step" else v.to(p.device, copy=True) for k, v in entry.items()
        }
    for p, entry in state.items():
        optimizer.state[p] = entry


@contextlib.contextmanager
def _hooks_off(module: nn.Module) -> Iterator[None]:
    """Forward/backward through the discriminator without Opacus recording per-example
    gradients (fake images, generator steps)."""
    if _is_grad_sample_module(module):
        module.disable_hooks()
        try:
            yield
        finally:
            module.enable_hooks()
    else:
        yield


def _maybe_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    history: list[HistoryEntry],
    seed: int,
    sample_rate: float | None,
) -> tuple[nn.Module, torch.optim.Optimizer, Iterator[tuple[torch.Tensor, ...]], StepRecord | None]:
    """The training pieces with DP-SGD when privacy is on (Poisson batches at the planned
    `sample_rate`, noise from a ChaCha20 stream), plain shuffled batches if not."""
    if not privacy.enabled:
        loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True)
        return module, optimizer, _batches(loader), None
    rate = sample_rate if sample_rate is not None else batch_size / tensors[0].shape[0]
    # Keyed from OS entropy; from the config's seed only for reproducible research runs.
    rng = SecureRandom.from_seed(seed) if privacy.reproducible_noise else SecureRandom()
    from fedgen.dp_sgd import make_private  # Opacus: on first use (see _opacus)

    private_module, dp_opt, batches, record = make_private(
        module,
        optimizer,
        tensors,
        noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=rate,
        expected_batch_size=batch_size,
        history=history,
        rng=rng,
    )
    return private_module, dp_opt, iter(batches), record


def _history_after(record: StepRecord | None, history: list[HistoryEntry]) -> list[HistoryEntry]:
    entries = record.history if record is not None else history
    return [(float(s), float(q), int(n)) for s, q, n in entries]


def _bce_terms(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Summed binary cross-entropy of logits against a constant target."""
    return F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, target), reduction="sum"
    )


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    # Mean that is 0 (not NaN) on the empty batches Poisson sampling sometimes draws.
    return _bce_terms(logits, target) / max(1, logits.shape[0])


def _d_terms(logits: torch.Tensor, real: bool, loss: str) -> torch.Tensor:
    """The discriminator's summed loss on rows that are all real or all generated."""
    if loss == "hinge":
        return F.relu(1.0 - logits).sum() if real else F.relu(1.0 + logits).sum()
    return _bce_terms(logits, 1.0 if real else 0.0)


def _g_loss(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """The generator's mean loss on its own images (non-saturating, or hinge's -D)."""
    if loss == "hinge":
        return -logits.sum() / max(1, logits.shape[0])
    return _bce(logits, 1.0)


def _noisy(images: torch.Tensor, std: float) -> torch.Tensor:
    # Instance noise: per image, independent of every other row, so per-example
    # gradients (and their sensitivity) are unchanged in kind.
    return images + std * torch.randn_like(images) if std > 0 else images


def _split_fake_rows(
    params: list[nn.Parameter], n_real: int, max_norm: float
) -> list[torch.Tensor]:
    """Keep the real rows of each per-example gradient for Opacus to clip and noise, and
    return the sum of the fake rows, each clipped to `max_norm`.

    Clipping the fake rows is for balance, not privacy (they read no private data and get
    no noise): unclipped, they dwarf the clipped real-image gradient and the discriminator
    learns little more than "everything generated is fake"."""
    fake_rows = [p.grad_sample[n_real:] for p in params]
    for p in params:
        p.grad_sample = p.grad_sample[:n_real]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in fake_rows], dim=1).norm(dim=1)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in fake_rows]


def _chunks(total: int, physical_batch_size: int | None) -> int:
    """How many passes a batch of `total` rows needs to stay within the physical size."""
    if physical_batch_size is None or total <= physical_batch_size:
        return 1
    return math.ceil(total / physical_batch_size)


def _accumulate_chunk(optimizer: DPOptimizer) -> None:
    """Clip this pass's per-example gradients into the optimizer's running sum and take no
    step: the mechanism of Opacus's BatchMemoryManager. Noise is added once per logical
    batch, and the accountant records one step."""
    optimizer.signal_skip_step(do_skip=True)
    optimizer.pre_step()
    optimizer.zero_grad(set_to_none=True)  # keeps the running sum (the step was skipped)


def discriminator_step(
    disc: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    extra_grads: ExtraGrads | None = None,
    physical_batch_size: int | None = None,
    loss_kind: str = "nonsaturating",
    instance_noise: float = 0.0,
) -> float:
    """One discriminator update on a real batch (and optionally a fake one).

    Real and fake images go through one forward/backward pass (or several of at most
    `physical_batch_size` rows, with the same result). Under DP, Opacus clips and noises
    the real rows only; the fake rows' (clipped) mean and `extra_grads` are added after the
    noise (see the module doc). Returns the mean loss on fake images."""
    is_dp = _is_dp_optimizer(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    n_real = real.shape[0]
    n_fake = 0 if fake is None else fake.shape[0]
    k = _chunks(n_real + n_fake, physical_batch_size)
    real_parts = list(zip(real.tensor_split(k), real_labels.tensor_split(k), strict=True))
    fake_parts = (
        list(zip(fake.tensor_split(k), fake_labels.tensor_split(k), strict=True))
        if fake is not None and fake_labels is not None
        else [(real[:0], real_labels[:0])] * k
    )
    fake_loss = 0.0
    public: list[torch.Tensor] | None = None
    for i, ((r, r_labels), (f, f_labels)) in enumerate(zip(real_parts, fake_parts, strict=True)):
        nr, nf = r.shape[0], f.shape[0]
        logits = disc(_noisy(torch.cat([r, f]), instance_noise), torch.cat([r_labels, f_labels]))
        fake_sum = _d_terms(logits[nr:], False, loss_kind)
        fake_loss += float(fake_sum.detach())
        real_sum = _d_terms(logits[:nr], True, loss_kind)
        if is_dp:
            # Sum over rows / rows: Opacus rescales by the rows of the pass, so each row's
            # grad_sample is exactly that example's gradient (and an empty real batch is 0).
            loss = (real_sum + fake_sum) / max(1, nr + nf)
        else:  # plain gradients add up over passes: normalise by the whole batch
            loss = real_sum / max(1, n_real) + fake_sum / max(1, n_fake)
        loss.backward()
        if not is_dp:
            continue
        if nf:
            part = _split_fake_rows(params, nr, optimizer.max_grad_norm)
            public = part if public is None else [a + b for a, b in zip(public, part, strict=True)]
        if i < k - 1:
            _accumulate_chunk(optimizer)
    fake_loss /= max(1, n_fake)
    if is_dp and not optimizer.pre_step():  # clip per example, add noise, account
        return fake_loss
    if public is not None or extra_grads is not None:
        extra = extra_grads(params) if extra_grads is not None else None
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if public is not None:
                p.grad.add_(public[i] / n_fake)
            if extra is not None:
                p.grad.add_(extra[i])
    (optimizer.original_optimizer if is_dp else optimizer).step()
    return fake_loss


def mode_seeking_penalty(images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The mode-seeking term of Mao et al. (2019): rows i and i + n/2 share a label; the
    penalty is 1 / (mean image distance / mean latent distance), so it falls as different
    latents give more different images. Reads generated images only."""
    half = images.shape[0] // 2
    image_gap = (images[:half] - images[half : 2 * half]).abs().flatten(1).mean(dim=1)
    latent_gap = (z[:half] - z[half : 2 * half]).abs().mean(dim=1)
    return 1.0 / ((image_gap / latent_gap).mean() + 1e-5)


def generator_step(
    generator: nn.Module,
    disc: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    num_classes: int,
    extra_grads: ExtraGrads | None = None,
    mode_seeking_weight: float = 0.0,
    loss_kind: str = "nonsaturating",
    instance_noise: float = 0.0,
    latent_code_weight: float = 0.0,
) -> float:
    """One generator update through the (frozen) discriminator, plus the mode-seeking term
    and the latent-code term when their weights are positive. Returns the adversarial
    loss."""
    device = next(generator.parameters()).device
    d_params = [p for p in disc.parameters() if p.requires_grad]
    for p in d_params:
        p.requires_grad_(False)
    try:
        optimizer.zero_grad(set_to_none=True)
        labels = torch.randint(0, num_classes, (batch_size,), device=device)
        seek_modes = mode_seeking_weight > 0 and batch_size >= 2
        if seek_modes:
            half = batch_size // 2  # pairs of latents under one label
            labels[half : 2 * half] = labels[:half]
        z = torch.randn(batch_size, generator.latent_dim, device=device)
        with _hooks_off(disc):
            fake = generator(z, labels)
            loss = _g_loss(disc(_noisy(fake, instance_noise), labels), loss_kind)
            total = loss
            if seek_modes:
                total = total + mode_seeking_weight * mode_seeking_penalty(fake, z)
            code_head = getattr(generator, "code_head", None)
            if code_head is not None and latent_code_weight > 0:
                read = code_head(fake)
                total = total + latent_code_weight * F.mse_loss(read, z[:, : code_head.dims])
            total.backward()
        if extra_grads is not None:
            g_params = [p for p in generator.parameters() if p.requires_grad]
            for p, g in zip(g_params, extra_grads(g_params), strict=True):
                p.grad = g if p.grad is None else p.grad.add_(g)
        optimizer.step()
    finally:
        for p in d_params:
            p.requires_grad_(True)
    return float(loss.detach())


def _proximal(mu: float, anchors: dict[int, torch.Tensor]) -> ExtraGrads | None:
    # FedProx: gradient of mu/2 * ||w - w_global||^2, which reads no data.
    if mu <= 0:
        return None
    return lambda params: [mu * (p.detach() - anchors[id(p)]) for p in params]


class GeneratorEMA:
    """An exponential moving average of the generator's parameters over its local steps.
    It reads only the generator's weights, which are post-processing of DP outputs."""

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in generator.parameters()]

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        for s, p in zip(self.shadow, generator.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, generator: nn.Module) -> None:
        for s, p in zip(self.shadow, generator.parameters(), strict=True):
            p.copy_(s)


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def train_gan_locally(
    model: ConditionalGAN,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    history: list[HistoryEntry],
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    sample_rate: float | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train `model` for `training.local_steps` discriminator steps on one client's data.

    `history` is the client's accountant history before this round; the result's history
    covers this round too. `optimizer_state`: the client's Adam state from its previous
    round (`LocalResult.optimizer_state`), to continue rather than restart the moments."""
    torch.manual_seed(seed)
    model.to(device).train()
    gen, disc = model.generator, model.discriminator
    anchors = {id(p): p.detach().clone() for p in model.parameters()}
    prox = _proximal(proximal_mu, anchors)
    betas = (training.beta1, 0.999)
    d_opt: torch.optim.Optimizer = torch.optim.Adam(
        disc.parameters(), lr=training.lr_discriminator, betas=betas
    )
    g_opt = torch.optim.Adam(gen.parameters(), lr=training.lr_generator, betas=betas)
    if optimizer_state:
        import_adam(d_opt, "d", optimizer_state)
        import_adam(g_opt, "g", optimizer_state)
    d_module, d_opt, batches, record = _maybe_private(
        disc,
        d_opt,
        (images, labels),
        training.batch_size,
        privacy,
        noise_multiplier,
        history,
        seed,
        sample_rate,
    )
    d_losses, g_losses = [], []
    ema = GeneratorEMA(gen, training.generator_ema) if training.generator_ema > 0 else None
    try:
        for step in range(training.local_steps):
            real, real_labels = next(batches)
            real, real_labels = real.to(device), real_labels.to(device)
            fake_labels = torch.randint(0, model.num_classes, (training.batch_size,), device=device)
            with torch.no_grad():
                fake = gen(
                    torch.randn(training.batch_size, gen.latent_dim, device=device), fake_labels
                )
            d_losses.append(
                discriminator_step(
                    d_module,
                    d_opt,
                    real,
                    real_labels,
                    fake,
                    fake_labels,
                    prox,
                    training.physical_batch_size,
                    training.gan_loss,
                    training.instance_noise,
                )
            )
            if (step + 1) % training.d_steps_per_g_step != 0:
                continue
            for _ in range(training.g_steps_per_d_step):
                g_losses.append(
                    generator_step(
                        gen,
                        d_module,
                        g_opt,
                        training.batch_size,
                        model.num_classes,
                        prox,
                        training.mode_seeking_weight,
                        training.gan_loss,
                        training.instance_noise,
                        training.latent_code_weight,
                    )
                )
                if ema is not None:
                    ema.update(gen)
    finally:
        if _is_grad_sample_module(d_module):
            d_module._close()  # remove Opacus hooks so the model is plain again
    if ema is not None:
        ema.copy_to(gen)
    new_history = _history_after(record, history)
    metrics = {
        "d_loss_fake": sum(d_losses) / len(d_losses),
        "g_loss": sum(g_losses) / len(g_losses) if g_losses else float("nan"),
        "d_steps": float(training.local_steps),
        "g_steps": float(len(g_losses)),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    d_plain = d_opt.original_optimizer if _is_dp_optimizer(d_opt) else d_opt
    kept = export_adam(d_plain, "d") | export_adam(g_opt, "g")
    return LocalResult(state, metrics, new_history, kept)


LossFn = Callable[..., torch.Tensor]


def train_dp_locally(
    module: nn.Module,
    tensors: tuple[torch.Tensor, ...],
    loss_fn: LossFn,
    steps: int,
    batch_size: int,
    lr: float,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    history: list[HistoryEntry],
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    physical_batch_size: int | None = None,
    sample_rate: float | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    state_prefix: str = "m",
) -> DPRound:
    """Plain DP-SGD (Adam) on `module` for `steps` Poisson-sampled batches of `tensors`:
    every parameter's per-example gradient is clipped and noised. `loss_fn(module, *batch)`
    returns the batch-mean loss. Returns the accountant history after this round and,
    when `optimizer_state` is given (a client keeping its Adam moments; `{}` on its first
    round), Adam's state to keep, under `state_prefix`. No training statistic is returned:
    they are computed on private data."""
    torch.manual_seed(seed)
    module.to(device).train()
    anchors = {id(p): p.detach().clone() for p in module.parameters()}
    prox = _proximal(proximal_mu, anchors)
    opt: torch.optim.Optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    if optimizer_state:  # before Opacus wraps it: the state belongs to the plain Adam
        import_adam(opt, state_prefix, optimizer_state)
    plain = opt
    wrapped, opt, batches, record = _maybe_private(
        module, opt, tensors, batch_size, privacy, noise_multiplier, history, seed, sample_rate
    )
    is_dp = _is_dp_optimizer(opt)
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        for _ in range(steps):
            batch = [t.to(device) for t in next(batches)]
            opt.zero_grad(set_to_none=True)
            n = batch[0].shape[0]
            k = _chunks(n, physical_batch_size)
            for i, chunk in enumerate(zip(*(t.tensor_split(k) for t in batch), strict=True)):
                loss = loss_fn(wrapped, *chunk)
                # DP: Opacus rescales each pass's mean into exact per-example gradients;
                # plain: weight each pass's mean by its share of the batch.
                (loss if is_dp else loss * (chunk[0].shape[0] / max(1, n))).backward()
                if is_dp and i < k - 1:
                    _accumulate_chunk(opt)
            if is_dp and not opt.pre_step():  # clip per example, add noise, account
                continue
            if prox is not None:  # data-independent: added after the noise
                for p, g in zip(params, prox(params), strict=True):
                    p.grad = g if p.grad is None else p.grad.add_(g)
            (opt.original_optimizer if is_dp else opt).step()
    finally:
        if _is_grad_sample_module(wrapped):
            wrapped._close()
    kept = export_adam(plain, state_prefix) if optimizer_state is not None else {}
    return DPRound(_history_after(record, history), kept)
