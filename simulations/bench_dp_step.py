"""Discriminator training throughput with DP-SGD against the same model without DP.

Both run in this process, side by side, on the same batches: one step is fedgen's
`discriminator_step` (real batch + fake batch), with Opacus's per-example clipping and
noise in the DP case and a plain Adam step otherwise. Trials alternate between the two so
that machine noise hits both alike; the medians are compared.

    python simulations/bench_dp_step.py                 # CPU or CUDA (auto)
    python simulations/bench_dp_step.py --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from datetime import date

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedgen.config import ModelConfig, PrivacyConfig
from fedgen.models import Discriminator
from fedgen.training import discriminator_step, make_private_discriminator, resolve_device


def _setup(private: bool, cfg: ModelConfig, batch: int, device: torch.device):
    torch.manual_seed(0)
    disc = Discriminator(cfg.discriminator_channels, 10, cfg.groups).to(device)
    opt: torch.optim.Optimizer = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    module: torch.nn.Module = disc
    if private:
        data = TensorDataset(torch.zeros(batch * 10, 1, 28, 28), torch.zeros(batch * 10).long())
        module, opt, _, _ = make_private_discriminator(
            disc, opt, DataLoader(data, batch_size=batch), PrivacyConfig(), 1.0, []
        )
    return module, opt


def _trial(module, opt, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for real, labels, fake, fake_labels in batches:
        discriminator_step(module, opt, real, labels, fake, fake_labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - start)


def main() -> None:
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per trial")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--channels", type=int, default=32, help="model.discriminator_channels")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cfg = ModelConfig(discriminator_channels=args.channels)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            (torch.rand(args.batch_size, 1, 28, 28, generator=gen) * 2 - 1).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=gen).to(device),
            (torch.rand(args.batch_size, 1, 28, 28, generator=gen) * 2 - 1).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=gen).to(device),
        )
        for _ in range(args.steps)
    ]
    runs = {name: _setup(name == "dp", cfg, args.batch_size, device) for name in ("plain", "dp")}
    for module, opt in runs.values():  # warm-up: allocator, kernels, hooks
        _trial(module, opt, batches[:3], device)
    rates: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(args.trials):
        for name, (module, opt) in runs.items():
            rates[name].append(_trial(module, opt, batches, device))
    plain, dp = statistics.median(rates["plain"]), statistics.median(rates["dp"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result = {
        "date": date.today().isoformat(),
        "device": f"{device.type} ({name or platform.machine()}, {torch.get_num_threads()} threads)",
        "batch_size": args.batch_size,
        "discriminator_channels": args.channels,
        "non_private_samples_per_s": round(plain, 1),
        "dp_samples_per_s": round(dp, 1),
        "slowdown_dp_over_non_private": round(plain / dp, 3),
    }
    print(f"device            {result['device']}")
    print(f"batch size        {args.batch_size}   D channels {args.channels}")
    print(f"non-private       {plain:10.1f} samples/s")
    print(f"DP-SGD (Opacus)   {dp:10.1f} samples/s")
    print(f"slowdown DP/plain {plain / dp:10.3f}x   (goal on a GPU: <= 1.5)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
