"""Class-conditional DCGAN-style generator and discriminator for 28x28 grey images.

The discriminator is the network DP-SGD trains, so it is built for Opacus as it stands:
GroupNorm instead of BatchNorm (per-example gradients must not mix examples) and no
in-place activations (they break Opacus's backward hooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedgen.config import ModelConfig

__all__ = [
    "Generator",
    "NearestUpsampleConv",
    "Discriminator",
    "ScatterFeatures",
    "ScatterDiscriminator",
    "LatentCodeHead",
    "ConditionalGAN",
    "MeanEmbedding",
    "MMDGenerator",
    "VQVAEWithPrior",
    "build_discriminator",
    "build_gan",
    "build_model",
]

IMAGE_SIZE = 28


class NearestUpsampleConv(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution (padding 1), computed at the input's
    resolution: the same function as `nn.Upsample` + `nn.Conv2d`, about 1.7x faster on
    the CPU (`simulations/bench_generator_step.py`).

    Why it is the same: after nearest upsampling, output pixel 2i+a (a in {0, 1}) reads
    input pixels i-1..i+1 with weights that are sums of the kernel's taps (for a = 0:
    w[-1] on i-1, w[0] + w[1] on i; for a = 1: w[-1] + w[0] on i, w[1] on i+1). So
    each of the four output phases is a 3x3 convolution of the input with a folded
    kernel; the four are stacked as channels and interleaved by a pixel shuffle. Only
    the folded kernel is computed, not the 4x larger upsampled input.

    `weight` and `bias` are an `nn.Conv2d`'s (same names, shapes and initialisation), so
    checkpoints of the two forms load into each other. Not for a network DP-SGD trains:
    Opacus has no per-example rule for this layer (the generators never need one)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)  # its initialisation
        self.weight, self.bias = conv.weight, conv.bias
        # fold[a, t, k]: weight of the kernel's tap k (-1, 0, +1) on the input's tap t
        # (-1, 0, +1) for output phase a; in 2-D, one (9, 36) matrix from the kernel's
        # taps (k, l) to the folded kernels' (a, b, t, s).
        fold = torch.zeros(2, 3, 3)
        fold[0, 0, 0] = fold[0, 1, 1] = fold[0, 1, 2] = 1.0
        fold[1, 1, 0] = fold[1, 1, 1] = fold[1, 2, 2] = 1.0
        fold_2d = torch.einsum("atk,bsl->klabts", fold, fold).reshape(9, 36)
        self.register_buffer("fold", fold_2d, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_channels, in_channels = self.weight.shape[:2]
        kernel = (self.weight.reshape(-1, 9) @ self.fold).view(out_channels, in_channels, 4, 9)
        # Output channel o * 4 + a * 2 + b is phase (a, b) of channel o: pixel_shuffle's order.
        kernel = kernel.transpose(1, 2).reshape(out_channels * 4, in_channels, 3, 3)
        y = F.conv2d(x, kernel, self.bias.repeat_interleave(4), padding=1)
        return F.pixel_shuffle(y, 2)


class Generator(nn.Module):
    """(z, label) -> image in [-1, 1]: 7x7 -> 14x14 -> 28x28 by nearest upsampling and 3x3
    convolutions (transposed stride-2 convolutions leave checkerboard speckle), then a 3x3
    convolution to one channel."""

    def __init__(
        self, latent_dim: int, channels: int, num_classes: int, groups: int, code_dims: int = 0
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        # Trained with the generator, on its own images only (`LatentCodeHead`).
        self.code_head = LatentCodeHead(code_dims) if code_dims > 0 else None
        self.num_classes = num_classes
        wide = 2 * channels
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(2 * latent_dim, wide * 7 * 7)
        self.wide = wide
        self.body = nn.Sequential(
            nn.GroupNorm(groups, wide),
            nn.ReLU(),
            # Identity keeps the layers' indices (the checkpoints' keys) of the
            # Upsample + Conv2d pairs that NearestUpsampleConv now computes in one.
            nn.Identity(),
            NearestUpsampleConv(wide, channels),  # 14x14
            nn.GroupNorm(groups // 2 or 1, channels),
            nn.ReLU(),
            nn.Identity(),
            NearestUpsampleConv(channels, channels // 2),  # 28x28
            nn.GroupNorm(groups // 4 or 1, channels // 2),
            nn.ReLU(),
            nn.Conv2d(channels // 2, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.from_embedding(z, self.label_embedding(labels))

    def from_embedding(self, z: torch.Tensor, label_vectors: torch.Tensor) -> torch.Tensor:
        """The image for z and a label *vector*: the label's embedding, or a blend of two
        (`fedgen explain` interpolates between classes this way)."""
        h = torch.cat([z, label_vectors], dim=1)
        h = self.project(h).view(-1, self.wide, 7, 7)
        return self.body(h)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator).to(device)


class LatentCodeHead(nn.Module):
    """Reads the first `dims` latent values back from a generated image: the Q network of
    InfoGAN (Chen et al., 2016) for continuous codes. The generator is trained to make
    them readable, so those latent directions must change the image (against a generator
    that ignores its latent and draws one image per class). It sees generated images
    only, never a real one, and is trained with the generator: post-processing, no
    privacy cost. Fixed wavelet features (no parameters) and a small MLP."""

    def __init__(self, dims: int, hidden: int = 64) -> None:
        super().__init__()
        self.dims = dims
        self.features = ScatterFeatures(stride=2)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.features.out_channels * 49, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, dims),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(images))


class Discriminator(nn.Module):
    """(image, label) -> real/fake logit; the label enters as an extra input channel."""

    def __init__(self, channels: int, num_classes: int, groups: int) -> None:
        super().__init__()
        self.label_map = nn.Embedding(num_classes, IMAGE_SIZE * IMAGE_SIZE)
        self.features = nn.Sequential(
            nn.Conv2d(2, channels, 4, stride=2, padding=1),  # 14x14
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),  # 7x7
            nn.GroupNorm(groups, 2 * channels),
            nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(2 * channels * 7 * 7, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        label_plane = self.label_map(labels).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        h = self.features(torch.cat([images, label_plane], dim=1))
        return self.head(h.flatten(1)).squeeze(1)


def _morlet_bank(scales: int, orientations: int, size: int) -> torch.Tensor:
    """Real and imaginary parts of 2-D Morlet wavelets (kymatio's parameters: width
    0.8 * 2^j, frequency 3pi/4 / 2^j, slant 4/L), zero-mean, unit L1 norm; shape
    (2 * scales * orientations, 1, size, size)."""
    half = size // 2
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    kernels = []
    for j in range(scales):
        sigma, xi = 0.8 * 2**j, 3 * math.pi / 4 / 2**j
        for t in range(orientations):
            theta = math.pi * t / orientations
            u = xx * math.cos(theta) + yy * math.sin(theta)
            v = -xx * math.sin(theta) + yy * math.cos(theta)
            slant = 4.0 / orientations
            envelope = torch.exp(-(u**2 + (slant * v) ** 2) / (2 * sigma**2))
            wave = torch.exp(1j * xi * u)
            beta = (envelope * wave).sum() / envelope.sum()  # makes the wavelet zero-mean
            psi = envelope * (wave - beta)
            psi = psi / psi.abs().sum()
            kernels += [psi.real, psi.imag]
    return torch.stack(kernels).unsqueeze(1).float()


class ScatterFeatures(nn.Module):
    """Fixed first-order scattering of a 28x28 image (a ScatterNet in the sense of Tramer
    and Boneh, ICLR 2021, written out so no extra dependency is needed): the image's local
    mean and the modulus of its Morlet wavelet responses at `scales` scales and
    `orientations` angles, each averaged over 4x4 cells -> (1 + scales * orientations, 7, 7).
    With `stride` 2 the responses are taken every other pixel and averaged over 2x2 of
    those: about 3x cheaper, nearly the same features (the modulus is smooth).

    It has no parameters, only buffers: nothing here is trained, so under DP-SGD it costs
    no privacy and Opacus computes no per-example gradient for it."""

    def __init__(
        self, scales: int = 2, orientations: int = 8, size: int = 9, stride: int = 1
    ) -> None:
        super().__init__()
        self.register_buffer("bank", _morlet_bank(scales, orientations, size), persistent=False)
        self.out_channels = 1 + scales * orientations
        self.padding = size // 2
        self.stride = stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images, patches=images.requires_grad)

    def features(self, images: torch.Tensor, patches: bool) -> torch.Tensor:
        """The features, with the wavelet responses computed as a matrix product of
        unfolded `patches` or as a convolution: the same numbers either way. `forward`
        takes patches for an input that needs a gradient: on the CPU their backward (the
        `mmd` fit's, the latent code head's) is about twice as fast as the convolution's,
        though their forward alone is slower."""
        x = (images + 1) / 2  # background 0, so zero padding adds no false edge
        if patches:
            size = self.bank.shape[-1]
            patches = F.unfold(x, size, padding=self.padding, stride=self.stride)
            side = (x.shape[-1] + 2 * self.padding - size) // self.stride + 1
            response = (self.bank.flatten(1) @ patches).view(len(x), -1, side, side)
        else:
            response = F.conv2d(x, self.bank, padding=self.padding, stride=self.stride)
        re, im = response[:, 0::2], response[:, 1::2]
        modulus = torch.sqrt(re * re + im * im + 1e-8)
        # Scaled so both kinds of feature are of order 1 for a stroke image.
        pooled = F.avg_pool2d(modulus, 4 // self.stride)
        return torch.cat([F.avg_pool2d(x, 4), 4 * pooled], dim=1)


class ScatterDiscriminator(nn.Module):
    """(image, label) -> logit: fixed ScatterFeatures, then a small trainable head, with the
    label entering by projection (Miyato and Koyama, 2018): logit = w.h + e_y.h.

    Why: DP-SGD's noise norm grows with the square root of the number of trained
    parameters, and Opacus's per-example gradients for a convolution at full resolution
    are costly; here only the head (a few thousand to tens of thousands of parameters, on
    7x7 maps) is trained. The label costs 10 x hidden parameters instead of a 784-wide
    embedding plane."""

    def __init__(self, num_classes: int, hidden: int, head: str = "mlp", stride: int = 1) -> None:
        super().__init__()
        self.features = ScatterFeatures(stride=stride)
        c = self.features.out_channels
        if head == "cnn":
            self.head: nn.Module = nn.Sequential(
                nn.Conv2d(c, hidden, 3, padding=1),  # 7x7
                nn.LeakyReLU(0.2),
                nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),  # 4x4
                nn.LeakyReLU(0.2),
                nn.Flatten(),
                nn.Linear(hidden * 16, hidden),
                nn.LeakyReLU(0.2),
            )
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 49, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden)
        nn.init.zeros_(self.embed.weight)  # starts unconditional; the label's role is learnt

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.head(self.features(images))
        return self.out(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def build_discriminator(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The configured discriminator (`model.discriminator`)."""
    if cfg.discriminator == "scatter":
        return ScatterDiscriminator(
            num_classes, cfg.discriminator_hidden, cfg.discriminator_head, cfg.scatter_stride
        )
    return Discriminator(cfg.discriminator_channels, num_classes, cfg.groups)


class ConditionalGAN(nn.Module):
    """Both networks in one module, so one state_dict carries `generator.*` and
    `discriminator.*` weights between server and clients."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10) -> None:
        super().__init__()
        self.generator = Generator(
            cfg.latent_dim, cfg.generator_channels, num_classes, cfg.groups, cfg.latent_code_dims
        )
        self.discriminator = build_discriminator(cfg, num_classes)
        self.num_classes = num_classes

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        z = self.generator.sample_latent(len(labels), generator)
        out = self.generator(z, labels.to(z.device))
        self.generator.train(was_training)
        return out


class MeanEmbedding(nn.Module):
    """A fixed feature map phi with |phi(x)| = 1 for every image: random Fourier features
    (Rahimi and Recht, 2007), so that phi(x).phi(y) approximates a mixture of two Gaussian
    kernels: one on the image's wavelet features alone (a share `wavelet_share` of the
    frequencies, length scale `wavelet_bandwidth`) and one on its wavelet features and
    pixels together (the rest, length scale `bandwidth`). The distance between two sets'
    mean embeddings is then their MMD (as in DP-MERF, Harder et al., 2021), small only
    when the two are spread alike: a generator that draws one image per class cannot
    match it. Why a mixture: the wavelet kernel tells shapes apart (a class's identity),
    the pixel kernel positions and sizes (its variety); either alone loses the other.

    Nothing here is trained; the frequencies come from a public seed and live in buffers
    that are not in the state_dict (every party rebuilds the same ones)."""

    def __init__(
        self,
        frequencies: int,
        bandwidth: float,
        seed: int,
        wavelet_share: float = 0.0,
        wavelet_bandwidth: float = 6.0,
    ) -> None:
        super().__init__()
        self.scatter = ScatterFeatures(stride=2)
        wavelets = self.scatter.out_channels * 49
        inputs = wavelets + IMAGE_SIZE * IMAGE_SIZE
        gen = torch.Generator().manual_seed(seed)
        wavelet_only = round(wavelet_share * frequencies)
        joint = torch.randn(inputs, frequencies - wavelet_only, generator=gen) / bandwidth
        # Drawn for every input, as the joint ones, then cut to the wavelet rows: these
        # frequencies do not read the pixels, and the product skips them.
        alone = torch.randn(inputs, wavelet_only, generator=gen)[:wavelets] / wavelet_bandwidth
        self.register_buffer("joint", joint, persistent=False)
        self.register_buffer("alone", alone.contiguous(), persistent=False)
        self.frequencies = frequencies

    @property
    def dim(self) -> int:
        return 2 * self.frequencies

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.scatter(images), images)

    def phases(self, wavelets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Each image's projection on every frequency: the joint ones (wavelets and
        pixels) first, then the wavelet-only ones."""
        w = wavelets.flatten(1)
        f = torch.cat([w, ((images + 1) / 2).flatten(1)], dim=1)
        return torch.cat([f @ self.joint, w @ self.alone], dim=1)

    def embed(self, wavelets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """phi of `images`, given their wavelet features (`self.scatter(images)`)."""
        h = self.phases(wavelets, images)
        # cos^2 + sin^2 = 1 per frequency, so every row has norm exactly 1.
        return torch.cat([torch.cos(h), torch.sin(h)], dim=1) / math.sqrt(self.frequencies)


class MMDGenerator(nn.Module):
    """A class-conditional generator (the GAN's) fitted to a mean embedding instead of a
    discriminator: `fedgen.embedding` holds the private release and the fit."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10) -> None:
        super().__init__()
        self.generator = Generator(cfg.latent_dim, cfg.generator_channels, num_classes, cfg.groups)
        self.embedding = MeanEmbedding(
            cfg.embedding_frequencies,
            cfg.embedding_bandwidth,
            cfg.embedding_seed,
            cfg.embedding_wavelet_share,
            cfg.embedding_wavelet_bandwidth,
        )
        self.num_classes = num_classes

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        z = self.generator.sample_latent(len(labels), generator)
        out = self.generator(z, labels.to(z.device))
        self.generator.train(was_training)
        return out


def build_gan(cfg: ModelConfig, num_classes: int = 10, seed: int | None = None) -> ConditionalGAN:
    if seed is not None:
        torch.manual_seed(seed)
    return ConditionalGAN(cfg, num_classes)


class VQVAEWithPrior(nn.Module):
    """A VQ-VAE and the class-conditional prior over its codes, in one state_dict
    (`vqvae.*`, `prior.*`): the server aggregates both, whichever stage a round trains."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10) -> None:
        super().__init__()
        from fedgen.vqvae import VQVAE, CodePrior

        self.vqvae = VQVAE(cfg)
        self.prior = CodePrior(cfg, num_classes)
        self.num_classes = num_classes
        self.temperature = cfg.prior_temperature
        self.guidance = cfg.prior_guidance

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        was_training = self.training
        self.eval()
        codes = self.prior.sample(
            labels, generator=generator, temperature=self.temperature, guidance=self.guidance
        )
        out = self.vqvae.decode_codes(codes)
        self.train(was_training)
        return out


def build_model(cfg: ModelConfig, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """The configured model family; every family has `sample(labels, generator)`."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.type == "vqvae":
        return VQVAEWithPrior(cfg, num_classes)
    if cfg.type == "mmd":
        return MMDGenerator(cfg, num_classes)
    return ConditionalGAN(cfg, num_classes)
