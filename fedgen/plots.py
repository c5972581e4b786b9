"""The figures of a run: image grids, epsilon per client against rounds, and sample
quality against rounds and epsilon. Each is written beside its target and renamed."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedgen.console import client_sort_key

__all__ = ["plot_epsilon", "plot_quality", "save_image_grid"]


def save_image_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Save images in [-1, 1] of shape (rows*cols, 1, H, W) as one PNG grid."""
    arr = ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, _, h, w = arr.shape
    cols = math.ceil(n / rows)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 40, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i, 0]
    img = Image.fromarray(grid, mode="L")
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Any) -> None:
    """Rounds are whole numbers: no tick at 1.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save_figure(fig: Any, path: Path) -> None:
    # Written beside the target and renamed: a reader never sees half a PNG.
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_epsilon(report: dict[str, Any], path: Path) -> None:
    if not report["private"]:
        return
    plt = _pyplot()
    # Constrained layout keeps labels and legend inside the figure at any size.
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100, layout="constrained")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in report["rounds"]:
        for cid, eps in entry["epsilon"].items():
            xs, ys = series.setdefault(cid, ([], []))
            xs.append(entry["round"])
            ys.append(eps)
    for cid, (xs, ys) in sorted(series.items(), key=lambda kv: client_sort_key(kv[0])):
        ax.plot(xs, ys, marker="o", label=f"client {cid}")
    target = report["target_epsilon"]
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", label="target")
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative epsilon (delta {report['delta']:g})")
    ax.set_title(f"Privacy spent per client ({report['accountant']} accountant)")
    last = max((x for xs, _ in series.values() for x in xs), default=1)
    ax.set_xlim(0, last + 0.5)
    top = max([target or 0.0, *(y for _, ys in series.values() for y in ys)])
    ax.set_ylim(0, top * 1.12 or 1.0)  # room above the target line for the legend
    _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        # Cumulative epsilon rises from the left: the lower right stays clear.
        ax.legend(fontsize="small", loc="lower right")
    _save_figure(fig, path)


QUALITY_PANELS = (
    ("frechet_distance", "Frechet distance", "in the evaluator's features; lower is better"),
    (
        "label_consistency",
        "label consistency",
        "the evaluator recognises the class asked for; higher is better",
    ),
    (
        "downstream_accuracy",
        "downstream accuracy",
        "a classifier trained on generated images, tested on real ones; higher is better",
    ),
)
BOUNDED_QUALITY = ("label_consistency", "downstream_accuracy")  # fractions in [0, 1]


def plot_quality(lines: list[dict[str, Any]], path: Path) -> None:
    """Quality figures of the evaluated rounds against the round and, for a private run,
    against the epsilon spent by then: where the privacy went, and what it bought."""
    plt = _pyplot()
    private = any(line.get("max_epsilon") is not None for line in lines)
    axes_x = [("round", "round")] + (
        [("max_epsilon", "max epsilon over clients")] if private else []
    )
    fig, axes = plt.subplots(
        len(QUALITY_PANELS),
        len(axes_x),
        figsize=(5.5 * len(axes_x), 9),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    for row, (key, name, meaning) in enumerate(QUALITY_PANELS):
        points = [line for line in lines if line.get("eval", {}).get(key) is not None]
        for col, (xkey, xlabel) in enumerate(axes_x):
            ax = axes[row][col]
            xs = [p[xkey] for p in points if p.get(xkey) is not None]
            ys = [p["eval"][key] for p in points if p.get(xkey) is not None]
            ax.plot(xs, ys, marker="o")
            ax.set_title(meaning, fontsize="small")
            ax.set_ylabel(name)
            ax.set_xlabel(xlabel)
            # Both start at nothing spent; a lone point is then not alone on its axis.
            ax.set_xlim(0, max(xs, default=1) * 1.08 + (0.5 if xkey == "round" else 0))
            if xkey == "round":
                _integer_ticks(ax.xaxis)
            if key in BOUNDED_QUALITY:
                ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    fig.suptitle("Sample quality: generated images measured against the real test images")
    _save_figure(fig, path)
