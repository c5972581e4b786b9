"""Class-conditional DCGAN-style generator and discriminator for 28x28 grey images.

The discriminator is the network DP-SGD trains, so it is built for Opacus as it stands:
GroupNorm instead of BatchNorm (per-example gradients must not mix examples) and no
in-place activations (they break Opacus's backward hooks).
"""

from __future__ import annotations

import torch
from torch import nn

from fedgen.config import ModelConfig

__all__ = [
    "Generator",
    "Discriminator",
    "ConditionalGAN",
    "VQVAEWithPrior",
    "build_gan",
    "build_model",
]

IMAGE_SIZE = 28


class Generator(nn.Module):
    """(z, label) -> image in [-1, 1]: 7x7 -> 14x14 -> 28x28 by nearest upsampling and 3x3
    convolutions (transposed stride-2 convolutions leave checkerboard speckle), then a 3x3
    convolution to one channel."""

    def __init__(self, latent_dim: int, channels: int, num_classes: int, groups: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        wide = 2 * channels
        self.label_embedding = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(2 * latent_dim, wide * 7 * 7)
        self.wide = wide
        self.body = nn.Sequential(
            nn.GroupNorm(groups, wide),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),  # 14x14
            nn.Conv2d(wide, channels, 3, padding=1),
            nn.GroupNorm(groups // 2 or 1, channels),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),  # 28x28
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.GroupNorm(groups // 4 or 1, channels // 2),
            nn.ReLU(),
            nn.Conv2d(channels // 2, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.label_embedding(labels)], dim=1)
        h = self.project(h).view(-1, self.wide, 7, 7)
        return self.body(h)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator).to(device)


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


class ConditionalGAN(nn.Module):
    """Both networks in one module, so one state_dict carries `generator.*` and
    `discriminator.*` weights between server and clients."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10) -> None:
        super().__init__()
        self.generator = Generator(cfg.latent_dim, cfg.generator_channels, num_classes, cfg.groups)
        self.discriminator = Discriminator(cfg.discriminator_channels, num_classes, cfg.groups)
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

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        was_training = self.training
        self.eval()
        codes = self.prior.sample(labels, generator=generator)
        out = self.vqvae.decode_codes(codes)
        self.train(was_training)
        return out


def build_model(cfg: ModelConfig, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """The configured model family; every family has `sample(labels, generator)`."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.type == "vqvae":
        return VQVAEWithPrior(cfg, num_classes)
    return ConditionalGAN(cfg, num_classes)
