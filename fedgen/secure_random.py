"""The DP mechanism's randomness from a cryptographically secure stream.

DP-SGD's guarantee assumes its noise and its Poisson sampling cannot be predicted by whoever
reads the released update. PyTorch's generators are Mersenne Twisters: fast, but their state
can be recovered from their output, and Opacus's `secure_mode` needs torchcsprng, which has
no release for current torch. This module draws both from ChaCha20 (the `cryptography`
package) keyed with 256 bits from the OS:

- uniforms: 53 random bits per float64, centred in their interval, so never 0 or 1;
- Gaussians: Box-Muller in float64 from those uniforms, then, against the floating-point
  attacks on sampled noise (Mironov 2012; Jin et al., "Are We There Yet? Timing and
  Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022), each value is the
  sum of four independent standard normals divided by two (the construction of Holohan and
  Braghin, "Secure Random Sampling in Differential Privacy", 2021, which Opacus's secure
  mode also uses): the sum has the same distribution but no longer the gaps that let an
  attacker tell noise from signal in its low-order bits;
- Poisson sampling: each example is in the batch when its uniform is below the sample rate.

`SecureRandom.from_seed` exists for reproducible research runs only: a key derived from a
seed is known to whoever knows the seed.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["SecureRandom"]

_TWO_POW_53 = float(2**53)
SUMMED_NORMALS = 4  # Holohan and Braghin: sum of 4 N(0, 1) / 2 is N(0, 1)


class SecureRandom:
    """A ChaCha20 key stream turned into uniforms, Gaussians and Poisson masks."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("a ChaCha20 key is 32 bytes")
        # 16-byte nonce (counter and nonce in cryptography's API); one key, one stream.
        self._stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()

    @classmethod
    def from_seed(cls, seed: int) -> SecureRandom:
        """A replayable stream (research only: anyone who knows `seed` knows the noise)."""
        return cls(hashlib.sha256(f"fedgen-dp-noise:{seed}".encode()).digest())

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def _uniform(self, n: int) -> np.ndarray:
        bits = (self._words(n) >> np.uint64(11)).astype(np.float64)
        return (bits + 0.5) / _TWO_POW_53

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 values uniform on (0, 1): 53 bits each, never exactly 0 or 1."""
        return torch.from_numpy(self._uniform(n))

    def _standard_normal(self, n: int) -> np.ndarray:
        # NumPy, not torch: on a busy CPU its single-threaded math is several times faster
        # for vectors of this size (measured with simulations/bench_dp_step.py).
        pairs = (n + 1) // 2
        u = self._uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def standard_normal(self, n: int) -> torch.Tensor:
        """n float64 standard normals (Box-Muller), one pair per two uniforms."""
        return torch.from_numpy(self._standard_normal(n))

    def gaussian(
        self,
        shape: torch.Size | tuple[int, ...],
        std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Noise N(0, std^2) of `shape`, hardened against floating-point attacks."""
        n = math.prod(shape)
        normals = self._standard_normal(SUMMED_NORMALS * n).reshape(SUMMED_NORMALS, n)
        noise = normals.sum(axis=0) * (std / math.sqrt(SUMMED_NORMALS))
        return torch.from_numpy(noise).view(shape).to(dtype=dtype, device=device)

    def poisson_indices(self, n: int, sample_rate: float) -> torch.Tensor:
        """Indices of a Poisson sample: each of n examples independently with `sample_rate`."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate {sample_rate} must be in (0, 1]")
        return torch.nonzero(self.uniform(n) < sample_rate).flatten()
