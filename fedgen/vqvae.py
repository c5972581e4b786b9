"""VQ-VAE for 28x28 grey images and a class-conditional autoregressive prior over its codes.

Both networks are trained with DP-SGD, so every design choice here serves exact per-example
gradients under Opacus (hooks mode):
- The codebook is an `nn.Embedding` and is *called* (`self.codebook(codes)`), never indexed
  as a raw tensor: the codebook loss then reaches it through the Embedding's output, where
  Opacus's hooks see it and produce a per-example gradient. Indexing `codebook.weight`
  directly would bypass the hooks: the codebook would have no per-example gradient
  (Opacus 1.6 then refuses the step) or, written otherwise, move by DP noise alone.
- No EMA codebook update: it would read private data outside DP-SGD.
- GroupNorm instead of BatchNorm, Upsample + Conv2d instead of ConvTranspose2d, no in-place
  activations.
- The prior's masked convolution is a small custom module whose parameters are only the
  kernel's unmasked part, with its own registered per-example gradient (an unfold + batched
  matmul per part, like Opacus's Conv2d one). Opacus's fallback for unknown layers,
  functorch, is exact too but crashes on the empty batches Poisson sampling draws. The
  prior has no normalisation layer: GroupNorm's statistics over the grid would leak later
  codes into earlier positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

import fedgen.opacus_logging  # noqa: F401  (undoes its import-time logging setup)
from fedgen.config import ModelConfig

__all__ = [
    "GRID",
    "VQVAE",
    "vqvae_loss",
    "encode_codes",
    "codebook_stats",
    "MaskedConv2d",
    "CodePrior",
    "prior_loss",
]

GRID = 7  # side of the code grid: 28x28 images, two stride-2 downsamplings


def _nchw(grid: Tensor) -> Tensor:
    """(B,H,W,C) embeddings -> contiguous (B,C,H,W). Contiguous matters: a permuted tensor
    is channels-last in memory, convolutions keep that layout downstream, and Opacus 1.6's
    Conv2d per-example gradient (unfold2d's as_strided) assumes NCHW strides and is then
    silently wrong."""
    return grid.permute(0, 3, 1, 2).contiguous()


class VQVAE(nn.Module):
    """(B,1,28,28) in [-1,1] -> 7x7 grid of codebook indices -> reconstruction in [-1,1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, g, d = cfg.vq_channels, cfg.groups, cfg.code_dim
        if c % g:
            raise ValueError(
                f"model.groups={g} must divide model.vq_channels={c}; pick groups among its "
                "divisors"
            )
        self.codebook_size = cfg.codebook_size
        self.code_dim = d
        self.commitment = cfg.commitment
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, stride=2, padding=1),  # 14x14
            nn.GroupNorm(g, c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),  # 7x7
            nn.GroupNorm(g, 2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.GroupNorm(g, 2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, d, 1),
        )
        self.codebook = nn.Embedding(cfg.codebook_size, d)
        # Small entries around the origin: the nearest code is then chosen mostly by the
        # direction of z_e, so many codes are in use from the start (N(0,1) entries would
        # be far from the encoder's small outputs and a few would win everywhere).
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * c, 3, padding=1),
            nn.GroupNorm(g, 2 * c),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),  # 14x14
            nn.Conv2d(2 * c, c, 3, padding=1),
            nn.GroupNorm(g, c),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),  # 28x28
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(g, c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 1, 3, padding=1),
            nn.Tanh(),
        )

    def encode(self, images: Tensor) -> Tensor:
        """(B,1,28,28) -> z_e (B, code_dim, 7, 7)."""
        return self.encoder(images)

    @torch.no_grad()
    def nearest_codes(self, z_e: Tensor) -> Tensor:
        """Index of the nearest codebook entry (squared L2) for each of the 7x7 vectors."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        weight = self.codebook.weight
        # |z|^2 is the same for every code, so it does not change the argmin.
        dist = (weight * weight).sum(1) - 2.0 * flat @ weight.t()
        return dist.argmin(1).view(b, h, w)

    def quantize(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z_e -> (z_q with straight-through gradient, codes (B,7,7), vq loss per example (B,))."""
        codes = self.nearest_codes(z_e)
        # Through the Embedding module, so Opacus records a per-example codebook gradient.
        # contiguous(): see _nchw.
        e = _nchw(self.codebook(codes))
        codebook_term = (e - z_e.detach()).pow(2).flatten(1).mean(1)
        commitment_term = (z_e - e.detach()).pow(2).flatten(1).mean(1)
        vq_loss = codebook_term + self.commitment * commitment_term
        # Forward value e, gradient to the encoder as if quantisation were the identity.
        z_q = z_e + (e - z_e).detach()
        return z_q, codes, vq_loss

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, code_dim, 7, 7) -> (B,1,28,28) in [-1,1]."""
        return self.decoder(z_q)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B,7,7) codebook indices -> images."""
        device = self.codebook.weight.device
        return self.decode(_nchw(self.codebook(codes.to(device))))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_q, codes, vq_loss = self.quantize(self.encode(images))
        return self.decode(z_q), codes, vq_loss


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus's GradSampleModule keeps the wrapped model in `_module`.
    return getattr(model, "_module", model)


def vqvae_loss(model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Mean over the batch of per-example (pixel MSE + vq loss); `model` may be wrapped.

    A sum of per-example terms divided by the batch size is what Opacus's
    loss_reduction="mean" expects: each grad_sample row is then exactly that example's
    gradient. Dividing by max(1, B) makes an empty (Poisson) batch give 0, not NaN. The
    logged floats are statistics of the batch: private if the batch is."""
    recon, _, vq = model(images)
    recon_mse = (recon - images).pow(2).flatten(1).mean(1)
    n = max(1, images.shape[0])
    loss = (recon_mse + vq).sum() / n
    stats = {
        "recon_mse": float(recon_mse.detach().sum()) / n,
        "vq_loss": float(vq.detach().sum()) / n,
    }
    return loss, stats


@torch.no_grad()
def encode_codes(model: VQVAE, images: Tensor, batch_size: int = 512) -> Tensor:
    """(N,1,28,28) images -> (N,7,7) long codes, on the images' device, in chunks."""
    net = _unwrap(model)
    device = net.codebook.weight.device
    out = [
        net.nearest_codes(net.encode(images[i : i + batch_size].to(device))).to(images.device)
        for i in range(0, images.shape[0], batch_size)
    ]
    if not out:
        return torch.zeros(0, GRID, GRID, dtype=torch.long, device=images.device)
    return torch.cat(out)


def codebook_stats(codes: Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the codebook in use, and the perplexity exp(entropy) of the code histogram
    (K for a uniform use of all K codes, 1 for a single code)."""
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=codebook_size).double()
    total = float(counts.sum())
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"usage": float((counts > 0).sum()) / codebook_size, "perplexity": math.exp(entropy)}


class MaskedConv2d(nn.Module):
    """Convolution whose output at a grid position sees only earlier positions in raster
    order: the rows above (within the kernel), the same row to the left and, for mask "B",
    the position itself. "A" (no centre) is for the first layer, which reads the codes.

    Only the kernel's unmasked part exists, as two parameters: `weight_above` (the kernel
    rows above the centre, every column) and `weight_row` (the centre row's columns up to
    the centre). A masked kernel that multiplied a full weight by zeros would spend about
    half of every forward, backward and per-example gradient on entries that do nothing,
    and DP noise on them. `weight` assembles the full masked kernel, for reading.

    Not an nn.Conv2d subclass, so Opacus cannot mistake it for a plain convolution; its
    per-example gradient is `_masked_conv_grad_sample` below."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], mask_type: str
    ) -> None:
        super().__init__()
        kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0 or mask_type not in ("A", "B"):
            raise ValueError(f"MaskedConv2d needs odd kernel sides and mask A or B, got {kh}x{kw}")
        if (kh, kw, mask_type) == (1, 1, "A"):
            raise ValueError(
                "a 1x1 MaskedConv2d with mask A sees nothing; use mask B or a wider kernel"
            )
        self.kernel_size = (kh, kw)
        self.mask_type = mask_type
        self.rows_above = kh // 2
        self.row_width = kw // 2 + (mask_type == "B")  # centre-row columns it sees
        above = torch.empty(out_channels, in_channels, self.rows_above, kw)
        row = torch.empty(out_channels, in_channels, 1, self.row_width)
        self.weight_above = nn.Parameter(above) if self.rows_above else None
        self.weight_row = nn.Parameter(row) if self.row_width else None
        self.bias = nn.Parameter(torch.empty(out_channels))
        # nn.Conv2d's default initialisation, scaled to the unmasked fan-in.
        bound = 1.0 / math.sqrt(in_channels * (self.rows_above * kw + self.row_width))
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self._register_load_state_dict_pre_hook(self._from_masked_weight)

    def _pads(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """F.pad amounts that shift the input so that a plain (valid) convolution with
        `weight_above` / `weight_row` sees, at output (y, x), exactly the rows y-rows..y-1 /
        the columns x-cols..x-cols+row_width-1 of row y."""
        cols = self.kernel_size[1] // 2
        return (cols, cols, self.rows_above, -1), (cols, self.row_width - 1 - cols, 0, 0)

    def forward(self, x: Tensor) -> Tensor:
        pad_above, pad_row = self._pads()
        out = self.bias[:, None, None]
        if self.weight_above is not None:
            out = out + F.conv2d(F.pad(x, pad_above), self.weight_above)
        if self.weight_row is not None:
            out = out + F.conv2d(F.pad(x, pad_row), self.weight_row)
        return out

    @property
    def weight(self) -> Tensor:
        """The full (out, in, kh, kw) kernel, masked entries 0 (a copy, for reading)."""
        kh, kw = self.kernel_size
        ref = self.bias
        full = ref.new_zeros(ref.shape[0], self._in_channels(), kh, kw)
        if self.weight_above is not None:
            full[:, :, : self.rows_above] = self.weight_above.detach()
        if self.weight_row is not None:
            full[:, :, self.rows_above, : self.row_width] = self.weight_row.detach()[:, :, 0]
        return full

    def _in_channels(self) -> int:
        part = self.weight_above if self.weight_above is not None else self.weight_row
        assert part is not None  # the constructor refuses a layer with neither
        return part.shape[1]

    def _from_masked_weight(self, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
        """Weights saved before the kernel was split (one masked `weight`) load as its
        unmasked parts: the masked entries were multiplied by 0, so nothing is lost."""
        full = state_dict.pop(prefix + "weight", None)
        if full is None:
            return
        if self.weight_above is not None:
            state_dict[prefix + "weight_above"] = full[:, :, : self.rows_above].clone()
        if self.weight_row is not None:
            state_dict[prefix + "weight_row"] = full[
                :, :, self.rows_above : self.rows_above + 1, : self.row_width
            ].clone()


@register_grad_sampler(MaskedConv2d)
def _masked_conv_grad_sample(
    layer: MaskedConv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a MaskedConv2d, given its inputs and the gradient of the
    loss at its outputs (already scaled by Opacus for the loss reduction): for each part,
    the unfolded shifted input (what that part of the kernel covers at each output
    position) against the output gradient, as Opacus does for Conv2d. Works for an empty
    batch, where functorch's vmap fails."""
    x = activations[0]
    b = x.shape[0]
    grad_out = backprops.flatten(2)  # (B, Cout, H*W)
    grads = {layer.bias: grad_out.sum(2)}
    pad_above, pad_row = layer._pads()
    for weight, pad in ((layer.weight_above, pad_above), (layer.weight_row, pad_row)):
        if weight is None:
            continue
        patches = F.unfold(F.pad(x, pad), weight.shape[2:])  # (B, Cin*kh*kw, H*W)
        grads[weight] = torch.bmm(grad_out, patches.transpose(1, 2)).view(b, *weight.shape)
    return grads


class CodePrior(nn.Module):
    """p(codes | label) over the 7x7 grid in raster order, PixelCNN-style.

    The first (mask A) layer spans the whole grid width and enough rows that the 3x3
    mask-B layers after it, each reaching one row further up, cover every earlier position:
    a stack of small square masked kernels alone has a blind spot to the upper right.
    The label enters as a per-channel bias map after the first layer (before it, position
    (0,0) would not see it)."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10) -> None:
        super().__init__()
        k, c, layers = cfg.codebook_size, cfg.prior_channels, cfg.prior_layers
        self.codebook_size = k
        self.num_classes = num_classes
        self.code_embedding = nn.Embedding(k, c)
        self.class_map = cfg.prior_class_map
        # A map: what each class looks like where (a per-class template over the grid,
        # learnt from each example's own class only); otherwise one vector per class.
        width = c * GRID * GRID if self.class_map else c
        self.label_embedding = nn.Embedding(num_classes, width)
        # The label's tables enter scaled by label_scale, their weights divided by it: the
        # same function, a larger share of each clipped per-example gradient (see
        # ModelConfig.prior_label_scale).
        self.label_scale = cfg.prior_label_scale
        with torch.no_grad():
            self.label_embedding.weight.div_(self.label_scale)
        rows_up = max(1, (GRID - 1) - (layers - 1))
        self.first = MaskedConv2d(c, c, (2 * rows_up + 1, 2 * (GRID - 1) + 1), "A")
        self.blocks = nn.ModuleList(MaskedConv2d(c, c, (3, 3), "B") for _ in range(layers - 1))
        self.head = nn.Conv2d(c, k, 1)  # 1x1: the position itself only, so still causal
        # With a class map, also a per-class table of code logits at each position: the
        # class's marginal over codes there, which the layers above then correct.
        self.class_logits: nn.Embedding | None = None
        if self.class_map:
            self.class_logits = nn.Embedding(num_classes, k * GRID * GRID)
            nn.init.zeros_(self.class_logits.weight)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """(B,H,7) codes, (B,) labels -> logits (B, K, H, 7); H=7 in training, fewer rows
        while sampling (outputs never depend on rows below)."""
        return self._given_label(self.first(_nchw(self.code_embedding(codes))), labels)

    def _given_label(self, h: Tensor, labels: Tensor) -> Tensor:
        """The label's part: everything after the first (label-free) layer's output `h`."""
        rows = h.shape[2]
        if self.class_map:
            cond = self.label_embedding(labels).view(-1, h.shape[1], GRID, GRID)
            cond = cond[:, :, :rows]  # a function of the label alone: still causal
        else:
            cond = self.label_embedding(labels)[:, :, None, None]
        h = h + self.label_scale * cond
        for block in self.blocks:
            h = h + block(F.leaky_relu(h, 0.2))
        logits = self.head(F.leaky_relu(h, 0.2))
        if self.class_logits is not None:
            table = self.class_logits(labels).view(-1, self.codebook_size, GRID, GRID)
            logits = logits + self.label_scale * table[:, :, :rows]
        return logits

    def guided_log_probs(self, codes: Tensor, labels: Tensor, guidance: float) -> Tensor:
        """Log-probabilities (B, K, H, 7) of each code given the earlier ones, guided
        towards the label: log p(code | label) + guidance * (log p(code | label) -
        log p(code)), where p(code) is the prior's own average over the classes (each
        equally likely). That is classifier-free guidance with no separate unconditional
        model: the prior's class-conditionals are its classifier. guidance 0 is the prior.
        """
        if guidance == 0:
            return self(codes, labels).log_softmax(1)
        b, n = codes.shape[0], self.num_classes
        # The first layer reads codes only: computed once, the rest once per class; each
        # example's own conditional is its label's row of that.
        h = self.first(_nchw(self.code_embedding(codes)))
        every = torch.arange(n, device=labels.device).repeat_interleave(b)
        per_class = self._given_label(h.repeat(n, 1, 1, 1), every).log_softmax(1)
        per_class = per_class.view(n, b, *per_class.shape[1:])
        logp = per_class[labels, torch.arange(b, device=labels.device)]
        unconditional = per_class.logsumexp(0) - math.log(n)
        return logp + guidance * (logp - unconditional)

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        guidance: float = 0.0,
    ) -> Tensor:
        """Draw (B,7,7) codes for `labels`, one position at a time in raster order, from
        `guided_log_probs` at `temperature`."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        device = self.head.weight.device
        labels = labels.to(device)
        codes = torch.zeros(labels.shape[0], GRID, GRID, dtype=torch.long, device=device)
        draw_device = generator.device if generator is not None else device
        for r in range(GRID):
            for col in range(GRID):
                # Rows below r cannot influence row r, so they need not be computed.
                logp = self.guided_log_probs(codes[:, : r + 1], labels, guidance)
                probs = (logp[:, :, r, col] / temperature).softmax(1).to(draw_device)
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                codes[:, r, col] = drawn.to(device)
        return codes


def prior_loss(prior: nn.Module, codes: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of each example's cross-entropy averaged over the 49 positions
    (nats per code); a per-example sum over B, as Opacus's loss_reduction="mean" expects;
    0 for an empty batch."""
    logits = prior(codes, labels)
    per_example = F.cross_entropy(logits, codes, reduction="none").flatten(1).mean(1)
    return per_example.sum() / max(1, codes.shape[0])
