"""Datasets and federated partitions.

Images are returned as uint8 arrays (N, 28, 28) with int64 labels; `to_tensors` turns
them into the float range [-1, 1] the models use. Partitioners return index arrays:
deterministic for a seed, disjoint, and covering every example.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fedgen.config import DataConfig, FedgenConfig
from fedgen.console import plural
from fedgen.files import cache_root, write_atomic

__all__ = [
    "DataError",
    "Dataset",
    "load_mnist",
    "make_glyphs",
    "glyph_cache_dir",
    "load_dataset",
    "DeviceData",
    "load_device_data",
    "data_fingerprint",
    "partition",
    "SplitDataset",
    "client_partition",
    "split_dataset",
    "federated_partitions",
    "to_tensors",
    "GLYPH_CLASSES",
]

IMAGE_SIZE = 28
NUM_CLASSES = 10

# sha256 of the uncompressed IDX files, as published with the dataset.
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# Space-separated base URLs that replace MNIST_MIRRORS (a local mirror behind a firewall).
MIRRORS_ENV = "FEDGEN_MNIST_MIRRORS"

GLYPH_CLASSES = (
    "circle", "square", "triangle", "plus", "cross",
    "diamond", "hbar", "vbar", "disc", "two-lines",
)  # fmt: skip


class DataError(RuntimeError):
    """Data is missing, corrupt or cannot be split as asked."""


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int64 (N,)
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.name)


# --------------------------------------------------------------------------- MNIST


def default_mnist_root() -> Path:
    env = os.environ.get("FEDGEN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedgen" / "mnist"


def _open_idx(root: Path, name: str) -> bytes | None:
    raw, gz = root / name, root / f"{name}.gz"
    if raw.is_file():
        return raw.read_bytes()
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as err:
            raise DataError(f"{gz} is not a valid gzip file ({err}); delete it and retry") from None
    return None


def _parse_idx(buf: bytes, source: str) -> np.ndarray:
    if len(buf) < 8 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise DataError(f"{source} is not an unsigned-byte IDX file")
    ndim = buf[3]
    dims = struct.unpack(f">{ndim}I", buf[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims))
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != expected:
        raise DataError(f"{source} is truncated: {data.size} bytes of data, header says {expected}")
    return data.reshape(dims)


def _mirrors() -> tuple[str, ...]:
    env = os.environ.get(MIRRORS_ENV, "").split()
    return tuple(m if m.endswith("/") else f"{m}/" for m in env) or MNIST_MIRRORS


def _download(name: str, root: Path) -> None:
    """Fetch one file into `root`. The folder is created only to store a file whose
    checksum matched: a failed attempt leaves nothing behind."""
    errors = []
    for mirror in _mirrors():
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                payload = resp.read()
            data = gzip.decompress(payload)
        except (urllib.error.URLError, OSError, EOFError) as err:
            errors.append(f"{url}: {err}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != MNIST_FILES[name]:
            errors.append(f"{url}: checksum mismatch (sha256 {digest})")
            continue
        root.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash never leaves a half-written file under the real name.
        with tempfile.NamedTemporaryFile(dir=root, delete=False) as tmp:
            tmp.write(payload)
        shutil.move(tmp.name, root / f"{name}.gz")
        return
    raise DataError(
        f"could not download MNIST file {name} ({'; '.join(errors)}). Without network access, "
        f"put the four MNIST IDX files (gzip or raw) in {root}, point data.root or "
        f"FEDGEN_DATA_DIR at the folder that holds them, or {MIRRORS_ENV} at a mirror you "
        "can reach."
    )


def load_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = True
) -> Dataset:
    """Load MNIST from IDX files (gzip or raw); download them when absent and allowed."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root).expanduser() if root else default_mnist_root()
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{prefix}-{kind}"
        buf = _open_idx(folder, name)
        if buf is None:
            if not download:
                raise DataError(
                    f"MNIST file {name}(.gz) not found in {folder}; put the IDX files there, "
                    "point data.root or FEDGEN_DATA_DIR at them, or set data.download=true"
                )
            _download(name, folder)
            buf = _open_idx(folder, name)
            assert buf is not None
        arrays.append(_parse_idx(buf, str(folder / name)))
    images, labels = arrays
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST files in {folder} have unexpected shapes {images.shape}, {labels.shape}"
        )
    return Dataset(images, labels.astype(np.int64), "mnist")


# --------------------------------------------------------------------------- glyphs


def _draw_glyph(label: int, rng: np.random.Generator) -> np.ndarray:
    # Draw at 2x and downsample: antialiased strokes look like handwriting-scale images.
    scale = 2
    size = IMAGE_SIZE * scale
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = (size / 2 + rng.uniform(-4, 4, size=2) * scale).tolist()
    r = rng.uniform(7, 11) * scale
    w = int(rng.integers(2, 4) * scale)
    box = [cx - r, cy - r, cx + r, cy + r]
    if label == 0:
        draw.ellipse(box, outline=255, width=w)
    elif label == 1:
        draw.rectangle(box, outline=255, width=w)
    elif label == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], outline=255, width=w)
    elif label == 3:
        draw.line([cx - r, cy, cx + r, cy], fill=255, width=w)
        draw.line([cx, cy - r, cx, cy + r], fill=255, width=w)
    elif label == 4:
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=255, width=w)
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=255, width=w)
    elif label == 5:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], outline=255, width=w)
    elif label == 6:
        draw.line([cx - r, cy, cx + r, cy], fill=255, width=w)
    elif label == 7:
        draw.line([cx, cy - r, cx, cy + r], fill=255, width=w)
    elif label == 8:
        draw.ellipse([cx - r * 0.6, cy - r * 0.6, cx + r * 0.6, cy + r * 0.6], fill=255)
    else:
        gap = r * 0.45
        draw.line([cx - gap, cy - r, cx - gap, cy + r], fill=255, width=w)
        draw.line([cx + gap, cy - r, cx + gap, cy + r], fill=255, width=w)
    angle = float(rng.uniform(-15, 15))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


# Bump when `_draw_glyph` or `_draw_glyphs` changes what it draws: the cached files of
# another version are then never read.
GLYPHS_VERSION = 1
# Smaller sets are drawn faster than a file is read and written.
_GLYPHS_WORTH_CACHING = 1000


def glyph_cache_dir() -> Path:
    """Where drawn glyph sets are kept: $FEDGEN_CACHE_DIR/glyphs, else
    ~/.cache/fedgen/glyphs."""
    return cache_root() / "glyphs"


def _draw_glyphs(per_class: int, seed: int, split: str) -> Dataset:
    # Train and test draw from different streams so they never share an image.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    rng.shuffle(labels)
    images = np.stack([_draw_glyph(int(y), rng) for y in labels])
    return Dataset(images, labels.astype(np.int64), "glyphs")


def _read_glyphs(path: Path, per_class: int) -> Dataset | None:
    """The cached set at `path`, or None when it is missing or not a whole set."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    n = per_class * NUM_CLASSES
    if (
        images.shape != (n, IMAGE_SIZE, IMAGE_SIZE)
        or images.dtype != np.uint8
        or labels.shape != (n,)
        or labels.dtype != np.int64
        or np.bincount(labels, minlength=NUM_CLASSES).tolist() != [per_class] * NUM_CLASSES
    ):
        return None
    return Dataset(images, labels, "glyphs")


def _write_glyphs(path: Path, data: Dataset) -> None:
    """Best effort: a cache that cannot be written costs a draw next time, nothing else."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=data.images, labels=data.labels)
    with contextlib.suppress(OSError):
        write_atomic(path, buffer.getvalue())  # whole or absent: never half a file


@lru_cache(maxsize=4)
def make_glyphs(per_class: int, seed: int = 0, split: str = "train") -> Dataset:
    """Built-in dataset: procedurally drawn, class-labelled 28x28 shapes (no download).

    Drawing takes about 0.2 ms a glyph, so a set is drawn once per machine (kept under
    `glyph_cache_dir()`, like a downloaded dataset) and read once per process: a
    simulation's pre-flight check draws it, and its clients and evaluator read it. The
    arrays are read-only, as they are shared (`Dataset.subset` copies)."""
    cached = per_class * NUM_CLASSES >= _GLYPHS_WORTH_CACHING
    path = glyph_cache_dir() / f"glyphs-v{GLYPHS_VERSION}-{split}-seed{seed}-{per_class}.npz"
    data = _read_glyphs(path, per_class) if cached else None
    if data is None:
        data = _draw_glyphs(per_class, seed, split)
        if cached:
            _write_glyphs(path, data)
    data.images.flags.writeable = data.labels.flags.writeable = False
    return data


# --------------------------------------------------------------------------- selection


def load_dataset(cfg: DataConfig, split: str = "train", seed: int = 0) -> Dataset:
    if cfg.dataset == "mnist":
        data = load_mnist(cfg.root, split, download=cfg.download)
    else:
        per_class = cfg.glyphs_per_class if split == "train" else max(10, cfg.glyphs_per_class // 5)
        data = make_glyphs(per_class, seed=seed, split=split)
    if split == "train" and cfg.num_examples is not None:
        if cfg.num_examples > len(data):
            raise DataError(
                f"data.num_examples={cfg.num_examples} exceeds the {len(data)} training examples "
                f"of {cfg.dataset}; lower it or leave it unset"
            )
        data = data.subset(np.arange(cfg.num_examples))
    return data


def to_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(data.images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(data.labels.copy())  # a copy: the arrays may be shared


# --------------------------------------------------------------------------- device data

# What a device may hold: MNIST IDX files, a folder of images in per-class subfolders
# named 0..9, or an .npz with `images` and `labels` arrays.
DEVICE_FORMATS = ("mnist", "folder", "npz")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class DeviceData:
    """A device's own training data, with the files that could not be used and why."""

    data: Dataset
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    source: str


def _to_model_image(img: Image.Image) -> np.ndarray:
    # Grey or RGB(A) in, the model's 1-channel 28x28 out; alpha is composited on black.
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: scale by the format's range, not clip at 255.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if "16" in img.mode else max(float(values.max()), 1.0)
        img = Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("L")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _class_folders(root: Path) -> list[tuple[int, Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = [p.name for p in folders if not (p.name.isdigit() and int(p.name) < NUM_CLASSES)]
    if bad:
        raise DataError(
            f"{root}: class subfolders must be named by label, 0 to {NUM_CLASSES - 1} (the same "
            f"labels on every device); found {', '.join(sorted(bad)[:5])}"
        )
    if not folders:
        raise DataError(
            f"{root} has no class subfolders; put each class's images in {root}/0, {root}/1, ..."
        )
    return [(int(p.name), p) for p in folders]


def load_image_folder(root: str | Path) -> DeviceData:
    """Images (PNG, JPEG, ...) in per-class subfolders `root/<label>/`; files Pillow cannot
    read are skipped and listed, and a folder with no usable image is an error."""
    root = Path(root).expanduser()
    images, labels, skipped = [], [], []
    for label, folder in _class_folders(root):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(path), f"not an image file ({path.suffix or 'no suffix'})"))
                continue
            try:
                with Image.open(path) as img:
                    img.load()  # decodes every pixel: truncated files fail here, not later
                    images.append(_to_model_image(img))
            except Exception as err:  # Pillow raises several types (SyntaxError among them)
                skipped.append((str(path), f"unreadable image: {err}"))
                continue
            labels.append(label)
    if not images:
        detail = (
            f"; {plural(len(skipped), 'file')} could not be read, e.g. {skipped[0][0]}"
            if skipped
            else ""
        )
        raise DataError(f"no usable images in {root}{detail}")
    data = Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), root.name)
    return DeviceData(data, tuple(skipped), str(root))


def load_npz(path: str | Path) -> DeviceData:
    """`images` (N, H, W) or (N, H, W, C), uint8 0-255 or float 0-1, and integer `labels`."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"images", "labels"} <= keys:
                raise DataError(
                    f"{path} must hold arrays named 'images' and 'labels'; it has "
                    f"{', '.join(sorted(keys)) or 'none'}"
                )
            raw_images, raw_labels = npz["images"], npz["labels"]
    except DataError:
        raise
    except Exception as err:  # e.g. an .npy renamed .npz gives a TypeError
        raise DataError(f"{path} is not a readable .npz file ({err})") from None
    if raw_labels.ndim != 1:
        raise DataError(
            f"{path}: labels must be one integer per image, shape (N,); got {raw_labels.shape}"
        )
    if raw_images.ndim not in (3, 4) or raw_images.shape[0] != raw_labels.shape[0]:
        raise DataError(
            f"{path}: images must be (N, H, W) or (N, H, W, C) with one label each; got "
            f"images {raw_images.shape}, labels {raw_labels.shape}"
        )
    if len(raw_labels) == 0:
        raise DataError(f"{path} holds no examples")
    if not np.issubdtype(raw_labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers, got {raw_labels.dtype}")
    if raw_labels.min() < 0 or raw_labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{path}: labels must lie in 0..{NUM_CLASSES - 1}; found {int(raw_labels.min())}"
            f"..{int(raw_labels.max())}"
        )
    if raw_images.ndim == 4 and raw_images.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{path}: images have {raw_images.shape[-1]} channels; use 1 (grey), 3 (RGB) or 4"
        )
    if raw_images.dtype == np.bool_:
        raw_images = raw_images.astype(np.uint8) * 255
    if np.issubdtype(raw_images.dtype, np.floating):
        if not np.isfinite(raw_images).all():
            raise DataError(f"{path}: images contain NaN or infinite values")
        # 0-1 floats are scaled up; 0-255 floats are taken as they are.
        scale = 255.0 if raw_images.max() <= 1.0 else 1.0
        raw_images = raw_images * scale
    if raw_images.min() < 0 or raw_images.max() > 255:
        raise DataError(
            f"{path}: pixel values span {raw_images.min()}..{raw_images.max()}; use 0-255 "
            "(integers or floats) or 0-1 (floats)"
        )
    pixels = np.asarray(raw_images).round().astype(np.uint8)
    if pixels.ndim == 4 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    needs_conversion = pixels.ndim == 4 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
    if needs_conversion:
        pixels = np.stack([_to_model_image(Image.fromarray(x)) for x in pixels])
    data = Dataset(pixels, raw_labels.astype(np.int64), path.stem)
    return DeviceData(data, (), str(path))


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(n.startswith("train-images-idx3-ubyte") for n in names):
            return "mnist"
        return "folder"
    raise DataError(
        f"cannot tell the format of {path}: give a folder of class subfolders, an .npz file "
        "or a folder with MNIST IDX files, or set data-format"
    )


def load_device_data(path: str | Path, fmt: str = "auto") -> DeviceData:
    """A device's own training data, from `path` in `fmt` (auto: detected)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist; check data-path in the node config")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "folder":
        return load_image_folder(path)
    if fmt == "npz":
        return load_npz(path)
    if fmt == "mnist":
        return DeviceData(load_mnist(path, "train", download=False), (), str(path))
    raise DataError(f"unknown data format {fmt!r}; use one of auto, {', '.join(DEVICE_FORMATS)}")


def data_fingerprint(data: Dataset) -> str:
    """SHA-256 of a dataset's pixels and labels: names the data a ledger accounts for."""
    h = hashlib.sha256()
    h.update(str(data.images.shape).encode())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- partitions


def _iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(len(labels)), num_clients))


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    # Per class, split its examples among clients by Dirichlet(alpha) proportions; redraw
    # while a client ends up (nearly) empty, as small alphas often leave one so.
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"dirichlet partition with alpha={alpha} left a client with fewer than {min_size} "
        "examples in 1000 draws; raise federation.dirichlet_alpha or use fewer clients"
    )


def _shards(
    labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * per_client
    if num_shards > len(labels):
        raise DataError(
            f"{num_shards} shards requested for {len(labels)} examples; lower "
            "federation.shards_per_client or federation.num_clients"
        )
    # Sort by label (random order within a label), cut into shards, deal shards out at random.
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split example indices among clients: disjoint, complete, deterministic for a seed."""
    if num_clients > len(labels):
        raise DataError(
            f"{num_clients} clients for {len(labels)} examples: every client needs data; "
            "use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        return _iid(labels, num_clients, rng)
    if method == "dirichlet":
        return _dirichlet(labels, num_clients, alpha, rng, min_size)
    if method == "shards":
        return _shards(labels, num_clients, shards_per_client, rng)
    raise DataError(f"unknown partition method {method!r}; use iid, dirichlet or shards")


def federated_partitions(
    cfg: FedgenConfig, labels: np.ndarray, num_partitions: int
) -> list[np.ndarray]:
    """The simulation's split of the training set, as configured."""
    fed = cfg.federation
    return partition(
        labels,
        num_partitions,
        fed.partition,
        seed=cfg.seed,
        alpha=fed.dirichlet_alpha,
        shards_per_client=fed.shards_per_client,
        min_size=_min_partition_size(cfg),
    )


def _min_partition_size(cfg: FedgenConfig) -> int:
    # Under DP with replace-one, a client's sample rate is batch / n, so n below the batch
    # would make every such client decline; without DP a quarter batch still trains.
    # `mmd` has no batch (it releases all n at rate 1) and would run on fewer, but its
    # per-class means would be mostly noise; the same floor keeps its splits (and the
    # measured rows of docs/RESULTS.md) as they are.
    batch = cfg.training.batch_size
    if cfg.privacy.enabled and cfg.privacy.neighboring == "replace_one":
        return batch
    return max(1, batch // 4)


@dataclass(frozen=True)
class SplitDataset:
    """The training set once, and each simulated client's indices into it: a client's
    examples are copied out only when it asks (while it trains), so a process serving
    a thousand clients holds one dataset, not a thousand slices."""

    cfg: FedgenConfig
    data: Dataset
    parts: list[np.ndarray]

    def client(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < len(self.parts):
            raise DataError(f"partition-id {partition_id} is outside 0..{len(self.parts) - 1}")
        own = self.data.subset(self.parts[partition_id])
        if self.cfg.privacy.canaries:
            from fedgen.canaries import add_canaries  # audit canaries: simulation only

            own = add_canaries(self.cfg, own, partition_id)
        return own


def split_dataset(cfg: FedgenConfig, num_partitions: int) -> SplitDataset:
    data = load_dataset(cfg.data, "train", seed=cfg.seed)
    return SplitDataset(cfg, data, federated_partitions(cfg, data.labels, num_partitions))


def client_partition(cfg: FedgenConfig, partition_id: int, num_partitions: int) -> Dataset:
    """The training examples of one simulated client."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    return split_dataset(cfg, num_partitions).client(partition_id)
