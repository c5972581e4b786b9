"""What a released generator does, in pictures: `fedgen explain RUN_DIR`.

GAN: every class drawn from the same latents, interpolations (between two latents of one
class, spherical; between two classes at one latent, linear in the label embedding), and
traversals along the generator's main directions of variation, the top eigenvectors of
E[J^T J] with J the Jacobian of the generated image with respect to the latent.
VQ-VAE: a codebook atlas (each code filling the grid, and each code in the middle of a
typical grid), per-class code usage over the 7x7 grid and the prior's per-position code
distribution for a class, all from the prior's own samples.
Both: integrated-gradients saliency of the discriminator's (GAN) and the evaluator's
decision on generated images.

Privacy: everything here reads the released global weights of one round and images
generated from them; no client data, update or gradient. By the post-processing property
of differential privacy it spends no epsilon (`PRIVACY_NOTE`). The evaluator whose
saliency is shown is the evaluation side's classifier (`fedgen.quality`).

It writes PNGs and `explain.json` (each figure's file, title and one-sentence caption,
plus the settings and measured figures) into one folder; it knows nothing of Flower.
"""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedgen.data import GLYPH_CLASSES, NUM_CLASSES

__all__ = [
    "PRIVACY_NOTE",
    "ExplainSettings",
    "FigureEntry",
    "slerp",
    "class_latent_grid",
    "latent_interpolation",
    "class_interpolation",
    "principal_directions",
    "traversal",
    "integrated_gradients",
    "prior_code_samples",
    "position_marginals",
    "typical_grid",
    "codebook_atlas",
    "explain_model",
]

PRIVACY_NOTE = (
    "No privacy cost: these figures read only the released global weights of round {round} "
    "and images generated from them, never a client's data, update or gradient, so they are "
    "post-processing of the DP release and spend no epsilon. The evaluator in the saliency "
    "figure is the evaluation side's classifier, trained without DP on the evaluation "
    "side's own copy of the data (in a simulation, the same images the clients hold; see "
    "docs/PRIVACY.md, 'The evaluation side's data'); it reads no client update."
)

DPI = 100
TILE_IN = 0.62  # inches per 28x28 tile (with its 2-pixel gap): about 2 screen pixels a pixel
GAP = 2  # pixels between tiles
_CHAR_IN = 0.075  # width of one 9-point character, for margins and wrapping
ATLAS_CODES = 64  # codes drawn in the atlas at most (the most used, for a larger codebook)


@dataclass(frozen=True)
class ExplainSettings:
    """How much to draw; every default keeps a CPU run to seconds."""

    columns: int = 8  # latents in the class grid, examples per class elsewhere
    steps: int = 9  # interpolation and traversal steps
    directions: int = 6  # traversal rows (main directions shown)
    jacobian_samples: int = 100  # latents the directions are averaged over
    span: float = 3.0  # traversal from -span to +span along a unit direction
    label: int = 0  # the class of the per-class figures (traversal, prior)
    prior_samples: int = 64  # prior samples per class behind the VQ-VAE statistics
    ig_steps: int = 32  # integrated-gradients steps
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.label < NUM_CLASSES:
            raise ValueError(f"--label {self.label} is not a class; use 0..{NUM_CLASSES - 1}")
        if self.columns < 2:
            raise ValueError(f"--columns {self.columns}: use at least 2 (two latents to compare)")
        for name in ("directions", "jacobian_samples", "prior_samples", "ig_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use at least 1")
        if self.steps < 2:
            raise ValueError(f"steps={self.steps}: an interpolation needs at least 2 steps")
        if self.span <= 0:
            raise ValueError(f"span={self.span}: use a positive traversal span")


@dataclass
class FigureEntry:
    """One PNG as `explain.json` lists it."""

    file: str
    title: str
    caption: str
    width: int = 0
    height: int = 0
    details: dict[str, Any] = field(default_factory=dict)


# --- GAN ------------------------------------------------------------------------------


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between latents `a` and `b` (d,) at fractions `t` (n,): for
    Gaussian latents it keeps the norm typical, where a straight line passes through
    unlikely low-norm latents midway. Falls back to linear for (anti)parallel vectors."""
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    t = t[:, None]
    if float(torch.sin(omega).abs()) < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def class_latent_grid(
    generator: nn.Module, columns: int, rng: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(images (classes * columns, 1, 28, 28), latents (columns, d)): row c is class c, and
    column j uses latent j in every row."""
    z = torch.randn(columns, generator.latent_dim, generator=rng)
    classes = generator.num_classes
    labels = torch.arange(classes).repeat_interleave(columns)
    return generator(z.repeat(classes, 1), labels), z


@torch.no_grad()
def latent_interpolation(
    generator: nn.Module, labels: Sequence[int], z_a: Tensor, z_b: Tensor, steps: int
) -> Tensor:
    """One row per label: z_a to z_b spherically in `steps` steps, label fixed."""
    path = slerp(z_a, z_b, torch.linspace(0, 1, steps))
    rows = [generator(path, torch.full((steps,), c, dtype=torch.long)) for c in labels]
    return torch.cat(rows)


@torch.no_grad()
def class_interpolation(
    generator: nn.Module, pairs: Sequence[tuple[int, int]], z: Tensor, steps: int
) -> Tensor:
    """One row per (a, b) pair: the latent fixed, the label embedding blended linearly from
    class a's to class b's (labels are embedded vectors, not Gaussian latents)."""
    t = torch.linspace(0, 1, steps)[:, None]
    table = generator.label_embedding.weight
    rows = []
    for a, b in pairs:
        vectors = (1 - t) * table[a] + t * table[b]
        rows.append(generator.from_embedding(z.expand(steps, -1), vectors))
    return torch.cat(rows)


def principal_directions(
    fn: Callable[[Tensor, Tensor], Tensor], latents: Tensor, conditions: Tensor, batch: int = 256
) -> tuple[Tensor, Tensor]:
    """The main directions of variation of `fn` ((latents (N, d), conditions (N,)) ->
    outputs (N, ...); the conditions are the labels, held fixed):
    eigenvectors of M = mean_n J_n^T J_n, J_n the Jacobian of the flattened output at
    latent n. v^T M v is the mean squared change of the output per unit step along v, so
    the eigenvectors are orthonormal directions in latent space ordered by how much they
    change the output (to first order), the eigenvalues how much.

    Returns (directions (d, d), one per row, eigenvalues (d,)), in decreasing order. J is
    measured column by column with forward-mode autodiff (d passes)."""
    n, d = latents.shape
    m = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, batch):
        z, held = latents[start : start + batch], conditions[start : start + batch]
        columns = []
        for i in range(d):
            tangent = torch.zeros_like(z)
            tangent[:, i] = 1.0
            _, jv = torch.func.jvp(lambda v, held=held: fn(v, held), (z,), (tangent,))
            columns.append(jv.detach().reshape(len(z), -1).double())
        jac = torch.stack(columns, dim=2)  # (batch, outputs, d)
        m += torch.einsum("bod,boe->de", jac, jac)
    m /= n
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    order = torch.argsort(values, descending=True)
    return vectors[:, order].T.float(), values[order].clamp_min(0).float()


@torch.no_grad()
def traversal(
    generator: nn.Module, label: int, z: Tensor, directions: Tensor, steps: int, span: float
) -> Tensor:
    """One row per direction: z + t * direction, t from -span to span, label fixed."""
    t = torch.linspace(-span, span, steps)[:, None]
    labels = torch.full((steps,), label, dtype=torch.long)
    return torch.cat([generator(z + t * v, labels) for v in directions])


# --- saliency -------------------------------------------------------------------------


def integrated_gradients(
    score: Callable[[Tensor], Tensor], images: Tensor, baseline: Tensor, steps: int
) -> Tensor:
    """Integrated gradients (Sundararajan et al., 2017) of `score` (images (N,...) -> (N,)):
    (x - baseline) times the mean gradient on the straight path from the baseline to x,
    by the midpoint rule. The attributions of an image add up to score(x) -
    score(baseline), up to the rule's error."""
    delta = images - baseline
    total = torch.zeros_like(images)
    for k in range(steps):
        point = (baseline + (k + 0.5) / steps * delta).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score(point).sum(), point)
        total += grad
    return delta * total / steps


# --- VQ-VAE ---------------------------------------------------------------------------


@torch.no_grad()
def prior_code_samples(prior: nn.Module, per_class: int, rng: torch.Generator) -> Tensor:
    """(classes, per_class, 7, 7) code grids drawn from the prior, class by class."""
    labels = torch.arange(prior.num_classes).repeat_interleave(per_class)
    codes = prior.sample(labels, generator=rng)
    return codes.view(prior.num_classes, per_class, *codes.shape[1:])


@torch.no_grad()
def position_marginals(prior: nn.Module, codes: Tensor, label: int) -> Tensor:
    """The prior's distribution of the code at every grid position for class `label`,
    (K, 7, 7): its conditional probabilities given each sample's earlier codes, averaged
    over samples `codes` (N, 7, 7) drawn from it (an unbiased estimate of the marginal with
    less variance than counting the drawn codes)."""
    labels = torch.full((len(codes),), label, dtype=torch.long)
    return prior(codes, labels).softmax(1).mean(0)


def typical_grid(codes: Tensor) -> Tensor:
    """Among code grids (N, 7, 7), the one that agrees with the most common code at the
    most positions: a real sample, not a patchwork of modes."""
    flat = codes.reshape(len(codes), -1)
    mode = flat.mode(dim=0).values
    return codes[int((flat == mode).sum(1).argmax())]


@torch.no_grad()
def codebook_atlas(
    vqvae: nn.Module, context: Tensor, codes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """What each code (default: all K, in order) decodes to: (alone, in_context), each
    (codes, 1, 28, 28). alone[i]: codes[i] at all 49 positions. in_context[i]: the grid
    `context` (7, 7) with codes[i] at its centre position."""
    codes = torch.arange(vqvae.codebook_size) if codes is None else codes
    k = len(codes)
    alone = codes[:, None, None].expand(k, *context.shape)
    placed = context.expand(k, *context.shape).clone()
    centre = context.shape[0] // 2, context.shape[1] // 2
    placed[:, centre[0], centre[1]] = codes
    return vqvae.decode_codes(alone), vqvae.decode_codes(placed)


# --- drawing --------------------------------------------------------------------------


def class_name(c: int, dataset: str, stacked: bool = False) -> str:
    """'3' for a digit, '3 (plus)' for a glyph; stacked on two lines for a column header,
    which is one tile wide."""
    if dataset != "glyphs":
        return str(c)
    return f"{c}\n{GLYPH_CLASSES[c]}" if stacked else f"{c} ({GLYPH_CLASSES[c]})"


def _pixels(images: Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) float."""
    return images.detach().cpu().clamp(-1, 1)[:, 0].numpy()


@dataclass
class _Row:
    tiles: np.ndarray  # (C, H, W)
    label: str
    cmap: str = "gray"
    vmin: float = -1.0
    vmax: float = 1.0
    # One more tile set apart on the right, in a diverging colour map (e.g. a difference).
    extra: np.ndarray | None = None
    extra_range: float = 1.0
    mark: tuple[int, int, int] | None = None  # (top, left, side) of a square outlined in each tile


def _strip(tiles: np.ndarray) -> np.ndarray:
    """Tiles side by side with NaN gaps (drawn as the background colour)."""
    c, h, w = tiles.shape
    out = np.full((h, c * (w + GAP) - GAP), np.nan)
    for i in range(c):
        out[:, i * (w + GAP) : i * (w + GAP) + w] = tiles[i]
    return out


def _wrap(text: str, width_in: float, char_in: float = _CHAR_IN) -> list[str]:
    return textwrap.wrap(text, max(20, int(width_in / char_in))) if text else []


def _new_figure(width_in: float, height_in: float, **options: Any) -> Any:
    """A figure of whole pixels at DPI, so the PNG's size is known before it is drawn."""
    from matplotlib.figure import Figure

    size = (round(width_in * DPI) / DPI, round(height_in * DPI) / DPI)
    return Figure(figsize=size, dpi=DPI, **options)


def _save(fig: Any, path: Path) -> tuple[int, int]:
    """Write the PNG atomically; returns its size in pixels."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI, facecolor="white")
    os.replace(tmp, path)
    width, height = fig.bbox.size  # whole pixels (see _new_figure)
    return round(width), round(height)


def _tile_figure(
    rows: list[_Row],
    col_labels: Sequence[str],
    title: str,
    subtitle: str,
    path: Path,
    colorbar: str | None = None,
    extra_label: str = "",
) -> tuple[int, int]:
    """A grid of tiles, one axes per row: row labels on the left, column labels on top,
    a title and a wrapped subtitle; each row's `extra` tile set apart on the right; an
    optional colour bar for what is not in grey."""
    from matplotlib import colormaps

    cols = max(len(r.tiles) for r in rows)
    left = 0.25 + _CHAR_IN * max(len(line) for r in rows for line in r.label.split("\n"))
    extra_at = left + cols * TILE_IN + 0.25  # where the extra column starts
    grid_right = extra_at + TILE_IN if any(r.extra is not None for r in rows) else extra_at - 0.25
    right = 1.45 if colorbar else 0.3
    width = grid_right + right
    title_lines = _wrap(title, width - 0.4, 0.095)
    sub_lines = _wrap(subtitle, width - 0.4)
    label_lines = max(len(lbl.split("\n")) for lbl in col_labels) if col_labels else 0
    top = 0.2 + 0.23 * len(title_lines) + 0.17 * len(sub_lines) + 0.16 * label_lines + 0.12
    row_gap = 0.08
    body = len(rows) * TILE_IN + (len(rows) - 1) * row_gap
    height = top + body + 0.25
    fig = _new_figure(width, height)
    y = 1 - 0.15 / height
    for line in title_lines:
        fig.text(0.2 / width, y, line, fontsize=11, weight="bold", va="top")
        y -= 0.23 / height
    for line in sub_lines:
        fig.text(0.2 / width, y, line, fontsize=9, va="top", color="#333333")
        y -= 0.17 / height
    tile_h = rows[0].tiles.shape[1]
    image = None
    for i, row in enumerate(rows):
        bottom = height - top - (i + 1) * TILE_IN - i * row_gap
        strip = _strip(row.tiles)
        ax = fig.add_axes(
            (left / width, bottom / height, len(row.tiles) * TILE_IN / width, TILE_IN / height)
        )
        cmap = colormaps[row.cmap].with_extremes(bad="white")
        shown = ax.imshow(
            strip, cmap=cmap, vmin=row.vmin, vmax=row.vmax, interpolation="nearest", aspect="auto"
        )
        if row.cmap != "gray":
            image = shown
        if row.mark is not None:
            from matplotlib.patches import Rectangle

            top_px, left_px, side_px = row.mark
            for j in range(len(row.tiles)):
                x0 = j * (row.tiles.shape[2] + GAP) + left_px - 0.5
                ax.add_patch(
                    Rectangle(
                        (x0, top_px - 0.5), side_px, side_px, fill=False, lw=0.8, ec="#ff3b30"
                    )
                )
        if row.extra is not None:
            ex = fig.add_axes(
                (extra_at / width, bottom / height, TILE_IN / width, TILE_IN / height)
            )
            image = ex.imshow(
                row.extra,
                cmap="RdBu_r",
                vmin=-row.extra_range,
                vmax=row.extra_range,
                interpolation="nearest",
            )
            ex.set_xticks([(tile_h - 1) / 2] if i == 0 else [], [extra_label] if i == 0 else [])
            ex.xaxis.tick_top()
            ex.tick_params(length=0, labelsize=8)
            ex.set_yticks([])
        step = tile_h + GAP
        ax.set_yticks([(tile_h - 1) / 2], [row.label], fontsize=9)
        if i == 0 and col_labels:
            ax.xaxis.tick_top()
            ax.set_xticks(
                [j * step + (tile_h - 1) / 2 for j in range(len(col_labels))],
                list(col_labels),
                fontsize=8,
            )
        else:
            ax.set_xticks([])
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if colorbar and image is not None:
        # Beside the rows drawn in colour only, so it is not read as a scale for the grey ones.
        coloured = [i for i, r in enumerate(rows) if r.cmap != "gray" or r.extra is not None]
        first, last = coloured[0], coloured[-1]
        bar_top = height - top - first * (TILE_IN + row_gap)
        bar_bottom = height - top - (last + 1) * TILE_IN - last * row_gap
        cax = fig.add_axes(
            (
                (grid_right + 0.25) / width,
                bar_bottom / height,
                0.15 / width,
                (bar_top - bar_bottom) / height,
            )
        )
        bar = fig.colorbar(image, cax=cax)
        bar.set_label(colorbar, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def _rows_of(images: Tensor, n_rows: int, labels: Sequence[str]) -> list[_Row]:
    tiles = _pixels(images)
    per_row = len(tiles) // n_rows
    return [_Row(tiles[i * per_row : (i + 1) * per_row], labels[i]) for i in range(n_rows)]


def _heat_figure(width_in: float, height_in: float, title: str, subtitle: str) -> tuple[Any, Any]:
    """A figure with title and subtitle above heatmap panels; returns (figure, subfigure
    for the panels, laid out by constrained layout below the text, never over it)."""
    title_lines = _wrap(title, width_in - 0.4, 0.095)
    sub_lines = _wrap(subtitle, width_in - 0.4)
    text_in = 0.2 + 0.23 * len(title_lines) + 0.17 * len(sub_lines)
    total = height_in + text_in
    fig = _new_figure(width_in, total, layout="constrained")
    y = 1 - 0.15 / total
    for line in title_lines:
        fig.text(0.2 / width_in, y, line, fontsize=11, weight="bold", va="top")
        y -= 0.23 / total
    for line in sub_lines:
        fig.text(0.2 / width_in, y, line, fontsize=9, va="top", color="#333333")
        y -= 0.17 / total
    below = fig.subfigures(2, 1, height_ratios=[text_in, height_in])[1]
    return fig, below


# --- the figures of a run -------------------------------------------------------------


def _record(
    entries: list[FigureEntry], out: Path, name: str, title: str, caption: str, draw: Any
) -> FigureEntry:
    """Draw one figure into `out / name` (draw(path, title, caption) -> size, details)."""
    size, details = draw(out / name, title, caption)
    entry = FigureEntry(name, title, caption, size[0], size[1], details)
    entries.append(entry)
    return entry


def _gan_figures(
    gan: nn.Module,
    settings: ExplainSettings,
    dataset: str,
    out: Path,
    entries: list[FigureEntry],
    measured: dict[str, Any],
) -> Tensor:
    """Class grid, interpolations and traversals; returns the class grid's latents."""
    g = gan.generator.eval()
    names = [class_name(c, dataset) for c in range(g.num_classes)]
    rng = torch.Generator().manual_seed(settings.seed)
    grid, z = class_latent_grid(g, settings.columns, rng)
    col_z = [f"z{j + 1}" for j in range(settings.columns)]

    def class_grid(path: Path, title: str, caption: str) -> Any:
        size = _tile_figure(_rows_of(grid, g.num_classes, names), col_z, title, caption, path)
        return size, {"rows": g.num_classes, "columns": settings.columns, "tile_px": _tile_px()}

    _record(
        entries,
        out,
        "gan_class_grid.png",
        "Every class from the same latents",
        "Each column uses one latent vector z for every class (one class a row), so a column "
        "shows what the latent holds fixed across classes (thickness, slant, size) and a row "
        "how one class varies.",
        class_grid,
    )

    steps = settings.steps
    fractions = [f"{t:.2g}" for t in np.linspace(0, 1, steps)]
    between = latent_interpolation(g, range(g.num_classes), z[0], z[1], steps)

    def latent_path(path: Path, title: str, caption: str) -> Any:
        rows = _rows_of(between, g.num_classes, names)
        size = _tile_figure(rows, ["z1", *fractions[1:-1], "z2"], title, caption, path)
        return size, {"rows": g.num_classes, "columns": steps, "interpolation": "spherical"}

    _record(
        entries,
        out,
        "gan_interpolation_latent.png",
        "Between two latents, within each class",
        "Spherical interpolation (slerp) from latent z1 to latent z2 of the class grid, the "
        "class held fixed in each row: smooth change means the generator maps nearby latents "
        "to nearby images.",
        latent_path,
    )

    pairs = [(c, (c + 1) % g.num_classes) for c in range(g.num_classes)]
    across = class_interpolation(g, pairs, z[0], steps)

    def class_path(path: Path, title: str, caption: str) -> Any:
        labels = [f"{names[a]} → {names[b]}" for a, b in pairs]
        cols = ["class a", *fractions[1:-1], "class b"]
        size = _tile_figure(_rows_of(across, len(pairs), labels), cols, title, caption, path)
        return size, {"rows": len(pairs), "columns": steps, "interpolation": "linear"}

    _record(
        entries,
        out,
        "gan_interpolation_class.png",
        "Between two classes, same latent",
        "The latent z1 held fixed while the label embedding is blended linearly from class a "
        "to class b (column = weight of class b): where the class changes, and what the "
        "latent keeps.",
        class_path,
    )

    latents = torch.randn(settings.jacobian_samples, g.latent_dim, generator=rng)
    labels = torch.arange(settings.jacobian_samples) % g.num_classes
    directions, variances = principal_directions(g, latents, labels)
    shares = (variances / variances.sum().clamp_min(1e-12)).tolist()
    shown = min(settings.directions, len(directions))
    measured["traversal"] = {
        "method": "eigenvectors of mean J^T J (J: Jacobian of the image w.r.t. z)",
        "latents": settings.jacobian_samples,
        "variance_share": [round(s, 4) for s in shares[:shown]],
        "variance_share_shown": round(sum(shares[:shown]), 4),
    }
    moved = traversal(g, settings.label, z[0], directions[:shown], steps, settings.span)
    ends = _pixels(moved).reshape(shown, steps, *moved.shape[2:])
    change = ends[:, -1] - ends[:, 0]  # what moving from -span to +span does, per direction
    change_range = max(float(np.abs(change).max()), 1e-3)
    measured["traversal"]["largest_pixel_change"] = round(change_range, 4)

    def traverse(path: Path, title: str, caption: str) -> Any:
        rows = _rows_of(
            moved, shown, [f"direction {i + 1}\n{shares[i]:.1%} of change" for i in range(shown)]
        )
        for row, diff in zip(rows, change, strict=True):
            row.extra, row.extra_range = diff, change_range
        cols = [f"{t:+.1f}" for t in np.linspace(-settings.span, settings.span, steps)]
        size = _tile_figure(
            rows,
            cols,
            title,
            caption,
            path,
            colorbar=f"right-hand column: image at +{settings.span:g}\nminus image at "
            f"-{settings.span:g} (pixel values in -2..2)",
            extra_label="change",
        )
        return size, {"rows": shown, "columns": steps, "label": settings.label}

    _record(
        entries,
        out,
        "gan_traversals.png",
        f"Main directions of variation (class {names[settings.label]})",
        f"Latent z1 moved from -{settings.span:g} to +{settings.span:g} along the "
        f"generator's {shown} main directions: the top eigenvectors of the average J^T J, J "
        "the Jacobian of the image with respect to z over "
        f"{settings.jacobian_samples} latents of every class; the share is each direction's "
        "part of the total squared change, and the last column shows where the image "
        "changes.",
        traverse,
    )
    return z


def _tile_px() -> int:
    """Screen pixels a 28-pixel tile (with its gap) is drawn at."""
    return round(TILE_IN * DPI)


def _vq_figures(
    model: nn.Module,
    settings: ExplainSettings,
    dataset: str,
    out: Path,
    entries: list[FigureEntry],
    measured: dict[str, Any],
) -> Tensor:
    """Codebook atlas, code usage and the prior's distribution; returns the prior's code
    samples (classes, per_class, 7, 7)."""
    from matplotlib.colors import Normalize

    model.eval()
    vqvae, prior = model.vqvae, model.prior
    k = vqvae.codebook_size
    names = [class_name(c, dataset) for c in range(prior.num_classes)]
    rng = torch.Generator().manual_seed(settings.seed)
    codes = prior_code_samples(prior, settings.prior_samples, rng)
    classes, per_class, side, _ = codes.shape

    shown = min(settings.columns, per_class)
    samples = vqvae.decode_codes(codes[:, :shown].reshape(-1, side, side))

    def sample_grid(path: Path, title: str, caption: str) -> Any:
        cols = [f"#{j + 1}" for j in range(shown)]
        size = _tile_figure(_rows_of(samples, classes, names), cols, title, caption, path)
        return size, {"rows": classes, "columns": shown, "tile_px": _tile_px()}

    _record(
        entries,
        out,
        "vq_samples.png",
        "Samples of the prior, decoded",
        f"The first {shown} of the {per_class} code grids drawn from the prior for each class "
        "(one class a row), decoded: the samples the usage statistics below are counted on.",
        sample_grid,
    )

    counts = torch.zeros(classes, k, side, side)
    for c in range(classes):
        onehot = torch.nn.functional.one_hot(codes[c], k).float()  # (N, 7, 7, K)
        counts[c] = onehot.sum(0).permute(2, 0, 1)

    context = typical_grid(codes[settings.label])
    # Every code, or for a large codebook the ATLAS_CODES the prior's samples use most.
    capped = k > ATLAS_CODES
    chosen = (
        counts.sum((0, 2, 3)).topk(ATLAS_CODES).indices.sort().values if capped else torch.arange(k)
    )
    alone, placed = codebook_atlas(vqvae, context, chosen)
    shown_codes = len(chosen)
    per_row = min(8, shown_codes)
    atlas_rows = math.ceil(shown_codes / per_row)
    base = _pixels(vqvae.decode_codes(context[None]))[0]
    change = _pixels(placed) - base  # what putting code k at the centre changes
    change_range = max(float(np.abs(change).max()), 1e-3)
    cell = 28 // side  # pixels per grid position
    centre_box = ((side // 2) * cell, (side // 2) * cell, cell)

    def atlas(path: Path, title: str, caption: str) -> Any:
        def rows_for(tiles: np.ndarray, what: str, **style: Any) -> list[_Row]:
            rows = []
            for r in range(atlas_rows):
                in_row = chosen[r * per_row : (r + 1) * per_row].tolist()
                # A range when every code is shown; the row's codes when only some are.
                named = " ".join(map(str, in_row)) if capped else f"codes {in_row[0]}-{in_row[-1]}"
                rows.append(
                    _Row(tiles[r * per_row : (r + 1) * per_row], f"{what}: {named}", **style)
                )
            return rows

        diff = {"cmap": "RdBu_r", "vmin": -change_range, "vmax": change_range}
        rows = (
            rows_for(_pixels(alone), "alone")
            + rows_for(_pixels(placed), "in context", mark=centre_box)
            + rows_for(change, "change", mark=centre_box, **diff)
        )
        cols = [] if capped else [f"+{j}" for j in range(per_row)]
        size = _tile_figure(
            rows, cols, title, caption, path, colorbar="change\n(in context minus context)"
        )
        return size, {
            "codes": k,
            "codes_shown": chosen.tolist(),
            "tiles": 3 * shown_codes,
            "tiles_per_panel": shown_codes,
            "columns": per_row,
        }

    context_str = " ".join(str(int(c)) for c in context.flatten())
    measured["atlas_context_grid"] = context_str
    _record(
        entries,
        out,
        "vq_codebook_atlas.png",
        f"Codebook atlas: what each of the {k} codes decodes to"
        if not capped
        else f"Codebook atlas: the {ATLAS_CODES} most used of the {k} codes",
        (
            "Three tiles per code k (row 'codes a-b', column +(k - a)): "
            if not capped
            else "Three tiles per code k (the row label lists its codes left to right): "
        )
        + "'alone', k fills all 49 "
        "positions of the 7x7 grid; 'in context', k replaces the centre position (red box) "
        f"of a typical prior sample of class {names[settings.label]} (the one agreeing most "
        "with the most common code at each position); 'change', that image minus the "
        "typical sample's own (red: brighter).",
        atlas,
    )

    share = counts / per_class
    mode_share, mode_code = share.max(1)  # (classes, 7, 7)

    def usage_grid(path: Path, title: str, caption: str) -> Any:
        cols = 5
        n_rows = math.ceil(classes / cols)
        fig, below = _heat_figure(11.0, 2.35 * n_rows + 0.5, title, caption)
        axes = below.subplots(n_rows, cols, squeeze=False)
        norm = Normalize(0, 1)
        image = None
        for c in range(n_rows * cols):
            ax = axes[c // cols][c % cols]
            if c >= classes:
                ax.axis("off")
                continue
            image = ax.imshow(mode_share[c].numpy(), cmap="viridis", norm=norm)
            for (r, q), value in np.ndenumerate(mode_code[c].numpy()):
                light = mode_share[c, r, q] < 0.6
                ax.text(
                    q,
                    r,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
            ax.set_title(f"class {names[c]}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        bar = below.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label("share of samples using the most common code", fontsize=8)
        return _save(fig, path), {"classes": classes, "grid": side}

    _record(
        entries,
        out,
        "vq_code_usage.png",
        "Code usage per class over the 7x7 grid",
        f"For each class, over {per_class} prior samples: the most common code at each grid "
        "position (number) and the share of samples that use it there (colour); bright "
        "cells are where the class always draws the same thing.",
        usage_grid,
    )

    by_class = counts.sum((2, 3)) / (per_class * side * side)  # (classes, K)
    measured["codes_used_per_class"] = [int((row > 0).sum()) for row in by_class]
    measured["codes_used"] = int((by_class.sum(0) > 0).sum())

    def usage_matrix(path: Path, title: str, caption: str) -> Any:
        width = min(14.0, max(7.0, 2.0 + 0.16 * k))
        fig, below = _heat_figure(width, 3.6, title, caption)
        ax = below.subplots()
        image = ax.imshow(by_class.numpy(), cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(classes), names, fontsize=8)
        tick = max(1, math.ceil(k / 32))
        ax.set_xticks(range(0, k, tick), [str(i) for i in range(0, k, tick)], fontsize=7)
        ax.set_xlabel("code", fontsize=9)
        bar = below.colorbar(image, ax=ax)
        bar.set_label("share of the class's grid cells", fontsize=8)
        return _save(fig, path), {"classes": classes, "codes": k}

    _record(
        entries,
        out,
        "vq_code_usage_by_class.png",
        "Which codes each class uses",
        "Share of each class's grid cells (all positions of its prior samples) that use each "
        "code: codes used by one class only carry its identity, codes used by all are "
        "background or shared strokes.",
        usage_matrix,
    )

    label = settings.label
    marginal = position_marginals(prior, codes[label], label)  # (K, 7, 7)
    entropy = -(marginal * marginal.clamp_min(1e-12).log2()).sum(0)
    top_p, top_k = marginal.topk(min(3, k), dim=0)
    measured["prior_entropy_bits"] = {
        "label": label,
        "mean": round(float(entropy.mean()), 4),
        "max": round(float(entropy.max()), 4),
        "uniform": round(math.log2(k), 4),
    }

    def prior_map(path: Path, title: str, caption: str) -> Any:
        fig, below = _heat_figure(12.0, 5.6, title, caption)
        left_ax, right_ax = below.subplots(1, 2)
        image = left_ax.imshow(
            entropy.numpy(), cmap="viridis", vmin=0, vmax=math.log2(k), interpolation="nearest"
        )
        for (r, q), value in np.ndenumerate(entropy.numpy()):
            left_ax.text(
                q,
                r,
                f"{value:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value < 0.6 * math.log2(k) else "black",
            )
        left_ax.set_title("entropy of the code at each position (bits)", fontsize=9)
        bar = below.colorbar(image, ax=left_ax, shrink=0.85)
        bar.set_label(f"bits (uniform over {k} codes: {math.log2(k):.1f})", fontsize=8)
        right_ax.imshow(top_p[0].numpy(), cmap="Greens", vmin=0, vmax=1.6)
        for (r, q), _ in np.ndenumerate(top_p[0].numpy()):
            lines = [
                f"{int(top_k[i, r, q])}: {float(top_p[i, r, q]):.2f}" for i in range(len(top_k))
            ]
            right_ax.text(q, r, "\n".join(lines), ha="center", va="center", fontsize=6.5)
        right_ax.set_title("most likely codes at each position, with probability", fontsize=9)
        for ax in (left_ax, right_ax):
            ax.set_xticks(range(side), [str(i) for i in range(side)], fontsize=7)
            ax.set_yticks(range(side), [str(i) for i in range(side)], fontsize=7)
            ax.set_xlabel("column", fontsize=8)
            ax.set_ylabel("row", fontsize=8)
        return _save(fig, path), {"label": label, "grid": side, "top_codes": len(top_k)}

    _record(
        entries,
        out,
        f"vq_prior_class{label}.png",
        f"The prior's code distribution for class {names[label]}",
        "The prior's probability of each code at each of the 49 positions for this class, "
        f"averaged over {per_class} of its own samples: its entropy (left; low = the position "
        "is decided) and its three most likely codes (right).",
        prior_map,
    )
    return codes


def _saliency_figure(
    model: nn.Module,
    family: str,
    settings: ExplainSettings,
    dataset: str,
    evaluator: nn.Module | None,
    out: Path,
    entries: list[FigureEntry],
    measured: dict[str, Any],
) -> None:
    """Integrated gradients on one generated image per class: the discriminator's logit
    (GAN) and the evaluator's log-probability of the class asked for."""
    classes = model.num_classes
    labels = torch.arange(classes)
    rng = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        images = model.sample(labels, generator=rng).clamp(-1, 1)
    baseline = torch.full_like(images, -1.0)  # a blank image: background everywhere
    rows = [_Row(_pixels(images), "generated")]
    headers = [class_name(c, dataset, stacked=True) for c in range(classes)]
    gaps: dict[str, float] = {}

    def attribute(score: Callable[[Tensor], Tensor], row: str, key: str) -> np.ndarray:
        attr = integrated_gradients(score, images, baseline, settings.ig_steps)
        with torch.no_grad():
            change = score(images) - score(baseline)
        gap = (attr.flatten(1).sum(1) - change).abs() / change.abs().clamp_min(1e-6)
        gaps[key] = round(float(gap.median()), 4)
        maps = attr[:, 0].detach().numpy()
        # Each map scaled to its own 99th percentile of |attribution| (larger values drawn
        # at full colour), so weak and strong images both show and one pixel cannot wash
        # out the rest.
        scale = np.percentile(np.abs(maps).reshape(len(maps), -1), 99, axis=1).clip(min=1e-12)
        rows.append(_Row(np.clip(maps / scale[:, None, None], -1, 1), row, "RdBu_r"))
        return change.detach().numpy()

    scores: dict[str, list[float]] = {}
    if family == "gan":
        disc = model.discriminator.eval()
        with torch.no_grad():
            logits = disc(images, labels)
        scores["discriminator_logit"] = [round(float(v), 3) for v in logits]
        attribute(lambda x: disc(x, labels), "discriminator", "discriminator")
        headers = [f"{h}\nD {float(v):+.1f}" for h, v in zip(headers, logits, strict=True)]
    if evaluator is not None:
        evaluator.eval()

        def log_prob(x: Tensor) -> Tensor:
            return evaluator(x).log_softmax(1)[torch.arange(len(x)), labels]

        with torch.no_grad():
            probs = log_prob(images).exp()
        scores["evaluator_probability"] = [round(float(v), 3) for v in probs]
        attribute(log_prob, "evaluator", "evaluator")
        headers = [f"{h}\np {float(v):.2f}" for h, v in zip(headers, probs, strict=True)]
    if len(rows) == 1:
        return
    measured["saliency"] = {
        "method": f"integrated gradients, blank (all-background) baseline, {settings.ig_steps} "
        "midpoint steps",
        "completeness_gap_median": gaps,
        **scores,
    }
    judges = " and ".join(
        w
        for w, on in (("discriminator", family == "gan"), ("evaluator", evaluator is not None))
        if on
    )
    what = []
    if family == "gan":
        what.append("the discriminator's real-vs-fake logit (D)")
    if evaluator is not None:
        what.append("the evaluator's log-probability of the class asked for (p: its probability)")

    def draw(path: Path, title: str, caption: str) -> Any:
        size = _tile_figure(
            rows,
            headers,
            title,
            caption,
            path,
            colorbar="attribution\n(scaled per image)",
        )
        return size, {"rows": len(rows), "columns": classes, "scores": list(scores)}

    _record(
        entries,
        out,
        "saliency.png",
        f"Which pixels drive the {judges}",
        "Integrated gradients from a blank image to one generated image per class, of "
        + " and of ".join(what)
        + ": red pixels raise the score, blue ones lower it (each map scaled to its own 99th "
        "percentile).",
        draw,
    )


def explain_model(
    model: nn.Module,
    family: str,
    server_round: int,
    out: Path,
    settings: ExplainSettings | None = None,
    dataset: str = "mnist",
    evaluator: nn.Module | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Draw every figure of `model` (a `ConditionalGAN` or `VQVAEWithPrior` holding the
    released weights of `server_round`) into `out`, write `out / explain.json` and return
    it. `evaluator`: the evaluation side's classifier, for its saliency (None: skipped)."""
    from fedgen.files import write_atomic

    settings = settings or ExplainSettings()
    settings.check()
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    entries: list[FigureEntry] = []
    measured: dict[str, Any] = {}
    with torch.random.fork_rng():  # leaves the caller's global random state as it was
        torch.manual_seed(settings.seed)
        if family in ("gan", "mmd"):  # both draw with the same class-conditional generator
            _gan_figures(model, settings, dataset, out, entries, measured)
        else:
            _vq_figures(model, settings, dataset, out, entries, measured)
        _saliency_figure(model, family, settings, dataset, evaluator, out, entries, measured)
    index = {
        "round": server_round,
        "model": family,
        "dataset": dataset,
        "privacy": PRIVACY_NOTE.format(round=server_round),
        "privacy_cost_epsilon": 0.0,
        "reads": "released weights of round "
        f"{server_round} and images generated from them"
        + ("; the evaluation side's classifier" if evaluator is not None else ""),
        "figures": [asdict(e) for e in entries],
        "measured": measured,
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - started, 2),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads",
        "date": datetime.now().isoformat(timespec="seconds"),
        **(source or {}),
    }
    write_atomic(out / "explain.json", json.dumps(index, indent=2))
    return index
