"""Research probe (issue 13, toward 97% without DP): does the `mmd` kernel gain from
features beyond pixels and first-order wavelets? Runs `probe_quality.py` with the mean
embedding's joint kernel also reading a fixed feature map F(x):

    phi(x) = RFF of [wavelets(x), pixels(x), weight * F(x)]

F is one of:
- `random`: a small convolutional network with random weights (no data at all);
- `font`: the same network trained to classify digits rendered from Pillow's built-in
  font (public data; rotated, sheared, thickened, shifted), as DP-MEPF uses features
  pretrained on public data;
- `digits`: `fedgen.quality.Classifier` (its 128 features) trained on the UCI optical
  handwritten digits that scikit-learn ships (1,797 images of 8x8 pixels by 43 writers,
  public, none of them MNIST's), enlarged to MNIST's 20x20 box and jittered. Needs
  `pip install scikit-learn`.

F is scaled once, from public images (the font's renders, or the UCI digits), so that
its median distance between two images is `--distance`; `--weight` then scales it
against the pixels and wavelets.

Measured (docs/RESULTS.md, seventh and eighth sessions): none gains downstream accuracy.
One client, all of MNIST, no DP: 94.9% with `font` (the plain kernel's 94.9%), 92.8% with
`random`, 94.3% with `digits` (the plain kernel's 94.1% that week; LC 0.934 against
0.919), 93.1% with `digits --weight 2`. The font network reads 27% on real MNIST, the
digits network 79%.

    OMP_NUM_THREADS=1 FEDGEN_DATA_DIR=../shared/data/mnist python simulations/probe_features.py \\
        --features font -- configs/mnist_mmd.yaml --set federation.num_clients=1 \\
        --set federation.min_train_clients=1 --set privacy.enabled=false --downstream
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn

import fedgen.models as models
from fedgen.files import cache_root
from fedgen.quality import Classifier, ClassifierRecipe, train_classifier

sys.path.insert(0, str(Path(__file__).parent))
import probe_quality  # noqa: E402


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 5, padding=2)
        self.c2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self(x))


def render_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits drawn with Pillow's built-in font, in [-1, 1], 28x28."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        y = int(rng.integers(10))
        size = int(rng.integers(18, 28))
        font = ImageFont.load_default(size=size * 2)
        img = Image.new("L", (112, 112), 0)
        draw = ImageDraw.Draw(img)
        draw.text((56, 56), str(y), fill=255, font=font, anchor="mm")
        for _ in range(int(rng.integers(0, 3))):
            img = img.filter(ImageFilter.MaxFilter(3))
        shear = float(rng.uniform(-0.4, 0.4))
        img = img.transform(
            (112, 112),
            Image.Transform.AFFINE,
            (1, shear, -shear * 56, 0, 1, 0),
            resample=Image.Resampling.BILINEAR,
        )
        img = img.rotate(
            float(rng.uniform(-15, 15)),
            resample=Image.Resampling.BILINEAR,
            translate=tuple(rng.uniform(-6, 6, size=2).tolist()),
        )
        img = img.resize((28, 28), Image.Resampling.LANCZOS)
        images.append(np.asarray(img, dtype=np.float32) / 127.5 - 1)
        labels.append(y)
    return torch.tensor(np.stack(images))[:, None], torch.tensor(labels)


def uci_digits(copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits, enlarged to 20x20 in a 28x28 frame (MNIST's
    layout) and jittered (rotation, shear, scale, shift, every third copy thickened), in
    [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit(
            "--features digits reads the UCI digits that scikit-learn ships: "
            "pip install scikit-learn"
        ) from err

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4,) * 4)
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    images = []
    for copy in range(copies):
        n = len(x)
        angle, shear = [(torch.rand(n, generator=gen) - 0.5) * 0.5 for _ in range(2)]
        scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.3
        shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack(
            [
                torch.stack([cos, shear - sin, shift[:, 0]], 1),
                torch.stack([sin, cos, shift[:, 1]], 1),
            ],
            1,
        )
        moved = F.grid_sample(
            x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False
        )
        images.append(F.max_pool2d(moved, 3, 1, 1) if copy % 3 == 1 else moved)
    return torch.cat(images) * 2 - 1, y.repeat(copies)


class DigitFeatures(nn.Module):
    """`fedgen.quality.Classifier`'s feature layer, trained on the UCI digits."""

    def __init__(self) -> None:
        super().__init__()
        cache = cache_root() / "probe_features_digits.pt"
        self.net = Classifier()
        if cache.exists():
            self.net.load_state_dict(torch.load(cache))
        else:
            x, y = uci_digits(10, 0)
            self.net, _ = train_classifier(x, y, ClassifierRecipe(epochs=4))
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.net.state_dict(), cache)
        self.net = self.net.to(memory_format=torch.contiguous_format).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_features(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "digits":
        net: nn.Module = DigitFeatures()
        for p in net.parameters():
            p.requires_grad_(False)
        return net
    net = Features()
    if kind == "font":
        cache = cache_root() / "probe_features_font.pt"
        if cache.exists():
            net.load_state_dict(torch.load(cache))
        else:
            x, y = render_digits(20000, seed)
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            for epoch in range(3):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), 128):
                    idx = perm[i : i + 128]
                    loss = F.cross_entropy(net.logits(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                print(f"  font features: epoch {epoch} loss {loss.item():.3f}", flush=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), cache)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", choices=["random", "font", "digits"], required=True)
    parser.add_argument("--distance", type=float, default=10.0)
    parser.add_argument("--weight", type=float, default=1.0)
    args, rest = parser.parse_known_args()
    net = build_features(args.features)
    with torch.no_grad():
        x = uci_digits(1, 1)[0][:500] if args.features == "digits" else render_digits(500, 1)[0]
        f = net(x)
        median = torch.pdist(f).median().item()
    scale = args.distance / median * args.weight
    print(f"  features {args.features}: median distance {median:.3f}, scale {scale:.3f}")

    base = models.MeanEmbedding

    class WithFeatures(base):  # type: ignore[misc, valid-type]
        def __init__(self, frequencies: int, bandwidth: float, seed: int, *a, **k) -> None:
            super().__init__(frequencies, bandwidth, seed, *a, **k)
            gen = torch.Generator().manual_seed(seed + 1)
            extra = torch.randn(128, self.joint.shape[1], generator=gen) / bandwidth
            self.register_buffer("extra", extra, persistent=False)
            object.__setattr__(self, "_net", net)  # not a submodule: not in the state_dict

        def phases(self, wavelets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            # F(x) joins the joint frequencies' input: add its projection to theirs.
            h = super().phases(wavelets, images)
            h[:, : self.joint.shape[1]] += (self._net(images) * scale) @ self.extra
            return h

    models.MeanEmbedding = WithFeatures
    sys.argv = [sys.argv[0], *[a for a in rest if a != "--"]]
    probe_quality.main()


if __name__ == "__main__":
    main()
