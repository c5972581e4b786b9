"""Files that survive a crash: every write goes to a temporary file beside its target,
is flushed to disk and renamed over it, so a reader (or a resumed run) finds the old file
or the new one, never half of either; tensors are safetensors (no pickle) carrying a
SHA-256 of their content, checked on every load."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "cache_root",
    "fsync_dir",
    "load_checkpoint",
    "save_tensors",
    "tensors_digest",
    "write_atomic",
]


def cache_root() -> Path:
    """Where fedgen keeps what it can rebuild (trained evaluators, drawn glyphs):
    $FEDGEN_CACHE_DIR, else ~/.cache/fedgen."""
    env = os.environ.get("FEDGEN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedgen"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write then rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        _plain_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing
        raise
    fsync_dir(path.parent)


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # once, at import: setting and restoring it is process-wide


def _plain_mode(path: Path) -> None:
    # Temporary files are created 0600; give the file the mode a plain open() would.
    os.chmod(path, 0o666 & ~_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint file that is truncated or does not match its checksum."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(
    path: Path,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Safetensors with a SHA-256 of the tensors in its metadata, written atomically: a
    crash leaves the previous file or the new one, never half a file. `before_rename`
    runs between the two (a test's kill point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "sha256": tensors_digest(tensors)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_checkpoint(path: Path, with_metadata: bool = False) -> Any:
    """Weights from a safetensors checkpoint (no pickle), verified against its checksum;
    with `with_metadata`, (weights, metadata)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"checkpoint {path} is unreadable ({err})") from None
    expected = metadata.get("sha256")
    if expected is not None and tensors_digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its checksum (corrupt)")
    return (tensors, metadata) if with_metadata else tensors


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss cannot undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
