"""Research probe (issue 13, toward 97% without DP): does the `mmd` kernel gain from
several length scales at once? MMD-GANs found a mixture of Gaussian kernels (or a
rational-quadratic one, itself a mixture) fits better than one scale: broad scales
give the gradient at a distance, narrow ones the detail near the target. Random Fourier
features make a mixture free: each frequency draws its own length scale, so the
embedding has the same size and the step the same arithmetic. Each example's embedding
still has norm exactly 1, so the release's sensitivity and its accounting are unchanged.

Runs `probe_quality.py` with `fedgen.models.MeanEmbedding`'s frequencies cut into equal
shares, share i at `--joint` scale i (the wavelet-and-pixel kernel) and `--wavelet`
scale i (the wavelet-only kernel); the config's own two length scales are ignored.

Measured (docs/RESULTS.md, eighth session): lost. One client, all of MNIST, no DP, the
plain fit: `--joint 12,7,4 --wavelet 6,3,2` read LC 0.902, FD 11.7, DS 93.4%, against
the single scales 7 and 3's 0.919, 10.8 and 94.1%.

    OMP_NUM_THREADS=1 FEDGEN_DATA_DIR=../shared/data/mnist python simulations/probe_kernel_mixture.py \\
        --joint 12,7,4 --wavelet 6,3,2 -- configs/mnist_mmd.yaml --set federation.num_clients=1 \\
        --set federation.min_train_clients=1 --set privacy.enabled=false --downstream
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fedgen.models as models

sys.path.insert(0, str(Path(__file__).parent))
import probe_quality  # noqa: E402


def scales(text: str) -> list[float]:
    return [float(s) for s in text.split(",")]


def per_column(count: int, lengths: list[float]) -> torch.Tensor:
    """Length scale of each of `count` frequencies: equal shares, in order."""
    share = torch.arange(count) * len(lengths) // max(count, 1)
    return torch.tensor(lengths)[share]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--joint", type=scales, required=True, help="e.g. 12,7,4")
    parser.add_argument("--wavelet", type=scales, required=True, help="e.g. 6,3,2")
    args, rest = parser.parse_known_args()
    base = models.MeanEmbedding

    class Mixture(base):  # type: ignore[misc, valid-type]
        def __init__(self, frequencies: int, bandwidth: float, seed: int, *a, **k) -> None:
            wavelet_bandwidth = k.get("wavelet_bandwidth", a[1] if len(a) > 1 else 6.0)
            super().__init__(frequencies, bandwidth, seed, *a, **k)
            # Undo the single scale, then give each column its own.
            self.joint.mul_(bandwidth / per_column(self.joint.shape[1], args.joint))
            self.alone.mul_(wavelet_bandwidth / per_column(self.alone.shape[1], args.wavelet))

    models.MeanEmbedding = Mixture
    print(f"  kernel mixture: joint {args.joint}, wavelet {args.wavelet}", flush=True)
    sys.argv = [sys.argv[0], *[a for a in rest if a != "--"]]
    probe_quality.main()


if __name__ == "__main__":
    main()
