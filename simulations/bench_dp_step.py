"""Training throughput with DP-SGD against the same model without DP, side by side.

Both run in this process on the same batches; trials alternate between the two so that
machine noise hits both alike, and the medians are compared. `--model` picks what a step
is:
  gan          fedgen's `discriminator_step` (a real and an equal fake batch; DP:
               per-example clipping of both, noise on the real rows), conv discriminator
  gan-scatter  the same step with the quickstart's ScatterNet discriminator (fixed
               wavelet features, trained head); compare its samples/s with `gan`'s
  vqvae  one Adam step of the VQ-VAE loss on a batch of images (DP: every parameter)
  prior  one Adam step of the code prior's loss on a batch of 7x7 code grids

Three variants run side by side: `plain` (no DP), `dp` (fedgen's DP-SGD: Opacus's
per-example clipping, Gaussian noise from a ChaCha20 stream, fedgen.secure_random) and
`dp-mt` (the same, with the noise from PyTorch's Mersenne Twister as Opacus draws it by
default), so the cost of the secure noise is the ratio dp-mt / dp.

    python simulations/bench_dp_step.py                 # GAN discriminator, CPU or CUDA
    python simulations/bench_dp_step.py --model vqvae --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import types
import warnings
from collections.abc import Callable
from datetime import date

import torch
from opacus.optimizers import DPOptimizer

from fedgen.config import ModelConfig, load_config
from fedgen.dp_sgd import make_private
from fedgen.models import Discriminator, build_discriminator
from fedgen.secure_random import SecureRandom
from fedgen.training import discriminator_step, resolve_device
from fedgen.vqvae import VQVAE, CodePrior, prior_loss, vqvae_loss

Batch = tuple[torch.Tensor, ...]


def _module(kind: str, cfg: ModelConfig) -> torch.nn.Module:
    if kind == "gan-scatter":
        return build_discriminator(cfg.model_copy(update={"discriminator": "scatter"}), 10)
    if kind == "gan":
        return Discriminator(cfg.discriminator_channels, 10, cfg.groups)
    return VQVAE(cfg) if kind == "vqvae" else CodePrior(cfg, 10)


VARIANTS = ("plain", "dp", "dp-mt")


def _setup(
    kind: str, variant: str, cfg: ModelConfig, batch: int, device: torch.device
) -> Callable[[Batch], None]:
    torch.manual_seed(0)
    module = _module(kind, cfg).to(device)
    lr = 2e-4 if kind.startswith("gan") else 1e-3
    opt: torch.optim.Optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    wrapped: torch.nn.Module = module
    if variant != "plain":
        wrapped, opt, _, _ = make_private(
            module,
            opt,
            (torch.zeros(batch * 10, 1),),  # batches come from the benchmark, not sampled
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.1,
            expected_batch_size=batch,
            history=[],
            rng=SecureRandom(),
        )
        if variant == "dp-mt":  # Opacus's own noise: torch.normal from the default generator
            opt.add_noise = types.MethodType(DPOptimizer.add_noise, opt)

    def step(b: Batch) -> None:
        if kind.startswith("gan"):
            discriminator_step(wrapped, opt, *b)
            return
        opt.zero_grad(set_to_none=True)
        loss = vqvae_loss(wrapped, *b)[0] if kind == "vqvae" else prior_loss(wrapped, *b)
        loss.backward()
        opt.step()

    return step


def _batches(kind: str, cfg: ModelConfig, n: int, size: int, device: torch.device) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)

    def images() -> torch.Tensor:
        return (torch.rand(size, 1, 28, 28, generator=gen) * 2 - 1).to(device)

    def labels() -> torch.Tensor:
        return torch.randint(0, 10, (size,), generator=gen).to(device)

    if kind.startswith("gan"):
        return [(images(), labels(), images(), labels()) for _ in range(n)]
    if kind == "vqvae":
        return [(images(),) for _ in range(n)]
    codes = [torch.randint(0, cfg.codebook_size, (size, 7, 7), generator=gen) for _ in range(n)]
    return [(c.to(device), labels()) for c in codes]


def _trial(step: Callable[[Batch], None], batches: list[Batch], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - start)


def main() -> None:
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["gan", "gan-scatter", "vqvae", "prior"], default="gan")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--baseline",
        choices=["gan", "gan-scatter"],
        help="also time this model's DP step, alternating with the others, and print the "
        "DP throughput ratio (e.g. --model gan-scatter --baseline gan)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="model.key=value override, e.g. "
        "model.scatter_stride=2 (applies to --model, not to --baseline)",
    )
    args = ap.parse_args()

    device = resolve_device(args.device)
    # The GAN's default sizes (the family defaults fill the generator's width).
    cfg = load_config(None, ["model.type=gan", *args.set]).model
    batches = _batches(args.model, cfg, args.steps, args.batch_size, device)
    steps = {name: _setup(args.model, name, cfg, args.batch_size, device) for name in VARIANTS}
    if args.baseline:
        base = load_config(None, ["model.type=gan"]).model
        steps["baseline-dp"] = _setup(args.baseline, "dp", base, args.batch_size, device)
    for step in steps.values():  # warm-up: allocator, kernels, hooks
        _trial(step, batches[:3], device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.trials):
        for name, step in steps.items():
            rates[name].append(_trial(step, batches, device))
    plain, dp, dp_mt = (statistics.median(rates[name]) for name in VARIANTS)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result = {
        "date": date.today().isoformat(),
        "model": args.model,
        "device": f"{device.type} ({name or platform.machine()}, {torch.get_num_threads()} threads)",
        "batch_size": args.batch_size,
        "non_private_samples_per_s": round(plain, 1),
        "dp_samples_per_s": round(dp, 1),
        "dp_mersenne_noise_samples_per_s": round(dp_mt, 1),
        "slowdown_dp_over_non_private": round(plain / dp, 3),
        "cost_of_secure_noise": round(dp_mt / dp, 3),
    }
    print(f"model             {args.model} (default sizes)")
    print(f"device            {result['device']}")
    print(f"batch size        {args.batch_size}")
    print(f"non-private       {plain:10.1f} samples/s")
    print(f"DP-SGD (ChaCha20) {dp:10.1f} samples/s")
    print(f"DP-SGD (MT noise) {dp_mt:10.1f} samples/s")
    print(f"slowdown DP/plain {plain / dp:10.3f}x   (goal on a GPU: <= 1.5)")
    print(f"secure noise cost {dp_mt / dp:10.3f}x   (DP with MT noise / DP with ChaCha20)")
    if args.baseline:
        base = statistics.median(rates["baseline-dp"])
        result["baseline"] = args.baseline
        result["baseline_dp_samples_per_s"] = round(base, 1)
        result["dp_throughput_over_baseline"] = round(dp / base, 3)
        print(f"baseline DP-SGD    {base:10.1f} samples/s ({args.baseline}, default sizes)")
        print(f"DP speed-up       {dp / base:10.3f}x   ({args.model} over {args.baseline})")
    result["overrides"] = args.set
    print(json.dumps(result))


if __name__ == "__main__":
    main()
