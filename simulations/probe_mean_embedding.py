"""Probe (issue 13, research only, not a product feature): does matching a per-class mean
embedding of the real data give the generator the variety the GAN game does not?

The GAN's generator (the quickstart's when this probe was written) draws one image per
class (downstream accuracy ~0.55 at label consistency ~0.99, with or without DP, at 5 or
15 rounds). A per-example discriminator
cannot see that every sample of a class is the same. A kernel mean embedding can (DP-MERF,
Harder et al., 2021): with random Fourier features phi of fixed wavelet features, the
distance between the real and the generated mean embedding of a class is an MMD, which
is small only when the two sets are spread alike.

This probe adds `weight * sum_c ||mu_c - mean phi(G(z, c))||^2` to every generator step of
the product's own client training (`simulations/probe_quality.py`: `client_round`,
`train_gan_locally`, DP-SGD for the discriminator), with mu_c the mean embedding of class
c over the client's own images. Here mu_c is NOT privatised: the probe asks whether the
term helps at all before anyone builds its private release (one Gaussian release per
client, sensitivity 2 max||phi|| / n_c under replace-one, composed into the ledger).

    OMP_NUM_THREADS=1 python simulations/probe_mean_embedding.py --weight 10 --downstream
    OMP_NUM_THREADS=1 python simulations/probe_mean_embedding.py --weight 10 --bandwidth 0.5 --downstream
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_quality  # noqa: E402

from fedgen import training  # noqa: E402
from fedgen.config import load_config  # noqa: E402
from fedgen.data import to_tensors  # noqa: E402
from fedgen.models import ScatterFeatures  # noqa: E402


class MeanEmbedding:
    """Random Fourier features of fixed wavelet features, and per-class means."""

    def __init__(
        self, features: int, seed: int = 0, bandwidth: float = 1.0, space: str = "scatter"
    ) -> None:
        self.scatter = ScatterFeatures(stride=2)
        self.space = space
        self.features = features
        self.bandwidth = bandwidth  # times the median distance
        self.seed = seed
        self.w: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def fit_scale(self, images: torch.Tensor) -> None:
        """Bandwidth: the median distance between wavelet features of real images."""
        with torch.no_grad():
            f = self.base(images[:500])
        width = self.bandwidth * float(torch.cdist(f, f).median())
        gen = torch.Generator().manual_seed(self.seed)
        self.w = torch.randn(f.shape[1], self.features, generator=gen) / width
        self.b = 2 * math.pi * torch.rand(self.features, generator=gen)

    def base(self, images: torch.Tensor) -> torch.Tensor:
        parts = [self.scatter(images).flatten(1)]
        if self.space == "both":
            parts.append(((images + 1) / 2).flatten(1))
        return torch.cat(parts, dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert self.w is not None and self.b is not None
        f = self.base(images)
        return math.sqrt(2.0 / self.features) * torch.cos(f @ self.w + self.b)

    def class_means(self, images: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        with torch.no_grad():
            phi = torch.cat([self(images[i : i + 500]) for i in range(0, len(images), 500)])
        return torch.stack([phi[labels == c].mean(dim=0) for c in range(classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight", type=float, default=10.0)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--bandwidth", type=float, default=1.0, help="x the median distance")
    parser.add_argument("--space", choices=("scatter", "both"), default="scatter")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--downstream", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--save")
    parser.add_argument("--log", default="runs/probe_quality.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.type=gan", *args.set])  # the GAN on the glyphs

    embedding = MeanEmbedding(args.features, cfg.seed, args.bandwidth, args.space)
    targets: dict[int, torch.Tensor] = {}  # id(shard) -> class means
    current: list[torch.Tensor] = []
    real_round = probe_quality.client_round
    real_step = training.generator_step

    def client_round(cfg_, state, shard, plan, seed, **kw):  # type: ignore[no-untyped-def]
        x, labels = to_tensors(shard)
        if embedding.w is None:
            embedding.fit_scale(x)
        if id(shard) not in targets:
            targets[id(shard)] = embedding.class_means(x, labels.long(), 10)
        current[:] = [targets[id(shard)]]
        return real_round(cfg_, state, shard, plan, seed, **kw)

    def generator_step(generator, disc, optimizer, batch_size, num_classes, *rest, **kw):  # type: ignore[no-untyped-def]
        # The product's step, then one more update of the MMD term on a fresh batch.
        loss = real_step(generator, disc, optimizer, batch_size, num_classes, *rest, **kw)
        optimizer.zero_grad(set_to_none=True)
        device = next(generator.parameters()).device
        labels = torch.arange(num_classes, device=device).repeat_interleave(
            max(1, batch_size // num_classes)
        )
        fake = generator(torch.randn(len(labels), generator.latent_dim, device=device), labels)
        phi = embedding(fake)
        means = current[0].to(device)
        gap = torch.stack(
            [((means[c] - phi[labels == c].mean(dim=0)) ** 2).sum() for c in range(num_classes)]
        )
        (args.weight * gap.sum()).backward()
        optimizer.step()
        return loss

    probe_quality.client_round = client_round
    training.generator_step = generator_step
    ns = argparse.Namespace(
        clients=None, eval_every=0, ema=0.0, downstream=args.downstream, tag=args.tag,
        save=args.save, set=[*args.set, f"probe.mean_embedding_weight={args.weight}",
             f"probe.bandwidth={args.bandwidth}"],
    )  # fmt: skip
    probe_quality.log_row(probe_quality.run_probe(cfg, ns), ns.set, args.log)


if __name__ == "__main__":
    main()
