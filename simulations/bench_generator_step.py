"""The `mmd` fit's generator step, two ways side by side: the generator's upsampling
layers as `nn.Upsample` + `nn.Conv2d` (how they were built before 2026-12-06) against
`fedgen.models.NearestUpsampleConv`, which computes the same function at the input's
resolution. Same weights, latents, features, loss and Adam; trials alternate so machine
noise hits both alike, and the medians are compared.

A step is what `fedgen.embedding.train_mmd_locally` does once: generate `--per-class`
images of each class, embed them, the unbiased MMD estimate against a target, backward,
Adam. One thread by default, as a simulated client gets.

    python simulations/bench_generator_step.py                  # widths 16 and 32
    python simulations/bench_generator_step.py --channels 32 --per-class 25
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from datetime import date

import torch
from timing import alternating_medians  # simulations/timing.py
from torch import nn

from fedgen.config import load_config
from fedgen.embedding import mmd_estimate
from fedgen.models import Generator, NearestUpsampleConv, build_model


def upsample_conv_generator(gen: Generator) -> Generator:
    """A copy of `gen` whose folded layers are Upsample + Conv2d again (same weights)."""
    old = copy.deepcopy(gen)
    for index, layer in enumerate(gen.body):
        if isinstance(layer, NearestUpsampleConv):
            out_channels, in_channels = layer.weight.shape[:2]
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
            old.body[index - 1] = nn.Upsample(scale_factor=2, mode="nearest")
            old.body[index] = conv
    return old


def bench(channels: int, per_class: int, trials: int, steps: int) -> dict:
    cfg = load_config(None, [f"model.generator_channels={channels}"])
    model = build_model(cfg.model, seed=0)
    embed = model.embedding
    generators = {"upsample + conv": upsample_conv_generator(model.generator),
                  "folded": model.generator}  # fmt: skip
    optimizers = {
        name: torch.optim.Adam(gen.parameters(), lr=cfg.training.lr_generator)
        for name, gen in generators.items()
    }
    labels = torch.arange(10).repeat_interleave(per_class)
    target = torch.zeros(10, embed.dim)

    # The two generators draw the same images (up to float rounding).
    z = torch.randn(len(labels), cfg.model.latent_dim)
    with torch.no_grad():
        images = [gen(z, labels) for gen in generators.values()]
    gap = (images[0] - images[1]).abs().max().item()

    def step(name: str) -> None:
        gen = generators[name]
        fake = gen(torch.randn(len(labels), gen.latent_dim), labels)
        phi = embed(fake).view(10, per_class, -1)
        loss = mmd_estimate(phi, target).sum()
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    def run(name: str) -> None:
        for _ in range(steps):
            step(name)

    ways = {name: (lambda name=name: run(name)) for name in generators}
    base, new = (m / steps for m in alternating_medians(ways, trials).values())
    print(f"generator width {channels}, {len(labels)} images per step, image gap {gap:.1e}")
    print(f"  upsample + conv (baseline) {base * 1000:7.1f} ms/step")
    print(f"  folded                     {new * 1000:7.1f} ms/step   x{base / new:.2f} the steps/s")  # fmt: skip
    return {"channels": channels, "per_class": per_class,
            "upsample_conv_ms": round(base * 1000, 2), "folded_ms": round(new * 1000, 2),
            "speedup": round(base / new, 3), "image_gap": gap}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32],
                        help="model.generator_channels (16: the quickstart; 32: MNIST)")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=10, help="mmd_samples_per_class")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per trial")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(c, args.per_class, args.trials, args.steps) for c in args.channels]
    print(json.dumps({
        "date": date.today().isoformat(), "machine": platform.machine(),
        "processor": platform.processor(), "torch": torch.__version__,
        "threads": args.threads, "rows": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
