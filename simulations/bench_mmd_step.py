"""The `mmd` fit's generator step, two ways side by side: the wavelet features computed by
a convolution (how `ScatterFeatures` computed them before 2026-11-24, and still does for
inputs without a gradient) against the unfolded-patch product it now uses for generated
images. Same generator, same latents, same loss; trials alternate so machine noise hits
both alike, and the medians are compared.

A step is what `fedgen.embedding.train_mmd_locally` does once: generate
`--per-class` images of each class, embed them, the unbiased MMD estimate against a
target, backward, Adam. One thread by default, as a simulated client gets.

    python simulations/bench_mmd_step.py                       # the quickstart's generator
    python simulations/bench_mmd_step.py --channels 32         # configs/mnist_mmd.yaml's

With `--frequencies 1000,4000` it compares instead the same step at several widths of the
mean embedding (`model.embedding_frequencies`), each with its own fixed frequencies, the
first the baseline. With `--compile` it compares the step eager (the baseline) against
the same forward and loss under `torch.compile` (inductor; its compile time is reported
apart, not in the step).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch
from timing import alternating_medians  # simulations/timing.py

from fedgen.config import load_config
from fedgen.embedding import mmd_estimate
from fedgen.models import build_model


def print_record(args: argparse.Namespace, figures: dict) -> None:
    """One JSON line: the date, machine and settings a figure was measured with, then it."""
    print(json.dumps({
        "date": date.today().isoformat(), "machine": platform.machine(),
        "processor": platform.processor(), "torch": torch.__version__,
        "channels": args.channels, "per_class": args.per_class, "threads": args.threads,
        **figures,
    }))  # fmt: skip


def step_parts(args: argparse.Namespace):
    """The product's generator and embedding at `--channels`, Adam at the family's rate,
    `--per-class` labels of each class and a zero target: what one step needs."""
    cfg = load_config(None, [f"model.generator_channels={args.channels}"])
    model = build_model(cfg.model, seed=0)
    gen, embed = model.generator, model.embedding
    optimizer = torch.optim.Adam(gen.parameters(), lr=cfg.training.lr_generator)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    return gen, embed, optimizer, labels, torch.zeros(10, embed.dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=16, help="model.generator_channels")
    parser.add_argument("--per-class", type=int, default=10, help="mmd_samples_per_class")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per trial")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--frequencies", help="compare these embedding widths (comma-separated) instead"
    )
    parser.add_argument(
        "--compile", action="store_true", help="compare eager against torch.compile instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        compare_compiled(args)
        return
    if args.frequencies:
        compare_frequencies(args, [int(f) for f in args.frequencies.split(",")])
        return

    gen, embed, optimizer, labels, target = step_parts(args)

    def features(images: torch.Tensor, baseline: bool) -> torch.Tensor:
        # The product's own code both ways; only how the wavelet responses are computed
        # differs (`embed(images)` takes the patches for a generated image).
        return embed.embed(embed.scatter.features(images, patches=not baseline), images)

    def step(baseline: bool) -> None:
        fake = gen(torch.randn(len(labels), gen.latent_dim), labels)
        phi = features(fake, baseline).view(10, args.per_class, -1)
        loss = mmd_estimate(phi, target).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # The two paths compute the same features (up to float rounding).
    probe = gen(torch.randn(len(labels), gen.latent_dim), labels)
    gap = (features(probe, True) - features(probe, False)).abs().max().item()

    def steps(baseline: bool) -> None:
        for _ in range(args.steps):
            step(baseline)

    ways = {"convolution": lambda: steps(True), "unfolded": lambda: steps(False)}
    conv, unf = (m / args.steps for m in alternating_medians(ways, args.trials).values())
    print(f"generator width {args.channels}, {len(labels)} images per step, "
          f"{args.threads} thread(s), feature gap {gap:.1e}")  # fmt: skip
    print(f"  convolution (baseline)  {conv * 1000:7.1f} ms/step")
    print(f"  unfolded patches        {unf * 1000:7.1f} ms/step   x{conv / unf:.2f} the steps/s")
    print_record(args, {
        "convolution_ms": round(conv * 1000, 2), "unfolded_ms": round(unf * 1000, 2),
        "speedup": round(conv / unf, 3),
    })  # fmt: skip


def compare_frequencies(args: argparse.Namespace, widths: list[int]) -> None:
    """The product's step at each embedding width: one generator and optimizer shared by
    all (their trials alternate), one embedding per width."""
    sets = [f"model.generator_channels={args.channels}"]
    cfg = load_config(None, sets)
    gen = build_model(cfg.model, seed=0).generator
    optimizer = torch.optim.Adam(gen.parameters(), lr=cfg.training.lr_generator)
    labels = torch.arange(10).repeat_interleave(args.per_class)

    def way(width: int):
        embed = build_model(
            load_config(None, [*sets, f"model.embedding_frequencies={width}"]).model, seed=0
        ).embedding
        target = torch.zeros(10, embed.dim)

        def steps() -> None:
            for _ in range(args.steps):
                fake = gen(torch.randn(len(labels), gen.latent_dim), labels)
                phi = embed(fake).view(10, args.per_class, -1)
                loss = mmd_estimate(phi, target).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return steps

    medians = alternating_medians({str(w): way(w) for w in widths}, args.trials)
    ms = {w: medians[str(w)] / args.steps * 1000 for w in widths}
    print(f"generator width {args.channels}, {len(labels)} images per step, "
          f"{args.threads} thread(s)")  # fmt: skip
    for width in widths:
        print(
            f"  {width:6d} frequencies  {ms[width]:7.1f} ms/step   "
            f"x{ms[width] / ms[widths[0]]:.2f} the time"
        )
    print_record(args, {
        "ms_per_step": {w: round(t, 2) for w, t in ms.items()},
    })  # fmt: skip


def compare_compiled(args: argparse.Namespace) -> None:
    """The product's step eager against the same generator, embedding and loss compiled
    by `torch.compile` (the backward too, through AOTAutograd); Adam stays eager."""
    gen, embed, optimizer, labels, target = step_parts(args)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        phi = embed(gen(z, labels)).view(10, args.per_class, -1)
        return mmd_estimate(phi, target).sum()

    compiled = torch.compile(loss_of)
    started = time.perf_counter()
    compiled(torch.randn(len(labels), gen.latent_dim)).backward()
    compile_seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)

    def way(loss_fn):
        def steps() -> None:
            for _ in range(args.steps):
                loss = loss_fn(torch.randn(len(labels), gen.latent_dim))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return steps

    medians = alternating_medians({"eager": way(loss_of), "compiled": way(compiled)}, args.trials)
    eager, comp = (medians[k] / args.steps * 1000 for k in ("eager", "compiled"))
    print(f"generator width {args.channels}, {len(labels)} images per step, "
          f"{args.threads} thread(s), compile {compile_seconds:.0f} s")  # fmt: skip
    print(f"  eager (baseline)  {eager:7.1f} ms/step")
    print(f"  torch.compile     {comp:7.1f} ms/step   x{eager / comp:.2f} the steps/s")
    print_record(args, {
        "eager_ms": round(eager, 2), "compiled_ms": round(comp, 2),
        "speedup": round(eager / comp, 3), "compile_seconds": round(compile_seconds, 1),
    })  # fmt: skip


if __name__ == "__main__":
    main()
