"""A node's randomness, all from AES-128-CTR: DP-SGD's Gaussian noise and every other draw.

``GaussianStream`` draws DP-SGD's gradient noise; ``CryptoRandom`` makes the uniform,
geometric and byte draws of the integer mechanisms and Poisson sampling (the node's
``rng``), in place of numpy's non-cryptographic PCG64. The rest of this docstring is about
the Gaussian noise.

DP-SGD's guarantee rests on the noise being unpredictable to whoever sees the update. The
party that sees it, the coordinator, also chooses the weights a node trains from, so it
can make coordinates whose gradient is zero for every record (a ReLU unit that never
fires): their update is the noise alone, scaled by a step size it knows. If the noise
stream can be reproduced from what it shows, the coordinator subtracts the noise from
every other coordinate and reads the clipped gradient sum exactly.

torch's CPU generator cannot carry that weight: ``torch.Generator.manual_seed`` keeps only
the low 32 bits of its seed (``manual_seed(s)`` and ``manual_seed(s + 2**32)`` give the same
stream), so a generator seeded per round has 2**32 possible streams, few enough to try
them all against the noise-only coordinates, and Mersenne Twister's state follows linearly
from its outputs even when the seed is strong. This module replaces it:

- **Bits:** AES-128 in counter mode under a fresh 128-bit key per stream (OpenSSL, through
  ``cryptography``): a keystream no one without the key can predict or tell from random.
  A node's Train handler takes each round's key from the OS CSPRNG (``secrets``).
- **Gaussian:** Box-Muller. Each pair of normals takes 96 keystream bits: 53 for the radius
  ``sqrt(-2 ln u1)``, ``u1 = (k + 1/2) 2**-53``, and 24 for the angle. The radius reaches
  8.65 (torch's 24-bit ``u1`` stops at 5.77); the tail mass is within about 1% of the
  Gaussian's out to 8.3 standard deviations (``u1``'s 2**-53 steps show beyond). Arithmetic
  is float32 (``u1`` rounded to 24 significant bits, float32 log/sqrt/cos/sin), as in
  torch's own sampler.
- **Cost:** 1.06-1.21x torch's own ``normal_`` per value on one CPU thread
  (``benchmarks/noise.py``: 0.39 against 0.35 s per 100M values), in pools of up to
  2**18 values. On an accelerator the transform runs on the device but the keystream is
  still made on one CPU core (about 0.07 s per 100M values here) and copied over, where
  torch's device generator costs almost nothing: unmeasured, and likely the larger part
  of a step for big models on a GPU.

The values are still floating point: like Opacus' and torch's samplers this is a
float32 rendering of a continuous Gaussian, with the floating-point caveats the training
module notes. What this fixes is where the randomness comes from.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["KEY_BYTES", "CryptoRandom", "GaussianStream"]

KEY_BYTES = 16  # AES-128
POOL = 1 << 18  # values per refill on the CPU (1 MiB of float32: in cache)
POOL_DEVICE = 1 << 22  # accelerators: fewer, larger kernel launches
_RADIUS_BITS = 53
_ANGLE_BITS = 24
_OUT_DTYPES = (torch.float32, torch.float64)
_PAIR_BYTES = 12  # 8 for the radius (an int64, 53 bits used), 4 for the angle (24 used)


class GaussianStream:
    """Independent N(0, 1) values from AES-128-CTR under one key, handed out in order.

    Each value is drawn once: ``fill`` continues the stream where the last call stopped,
    so the values of every call are independent of every other call's.
    """

    def __init__(
        self, key: bytes, *, device: torch.device | str = "cpu", pool: int | None = None
    ) -> None:
        """Start the stream for ``key`` (16 bytes, used for this stream only).

        One refill makes :data:`POOL` values on the CPU, :data:`POOL_DEVICE` on an
        accelerator, or ``pool`` if that is fewer (rounded up to even): a caller that needs
        fewer values in all saves the memory.

        Raises:
            ValueError: ``key`` is not 16 bytes, or ``pool`` is not positive.
        """
        if len(key) != KEY_BYTES:
            raise ValueError(f"the noise key must be {KEY_BYTES} bytes; got {len(key)}")
        self.device = torch.device(device)
        size = POOL if self.device.type == "cpu" else POOL_DEVICE
        if pool is not None:
            if pool < 1:
                raise ValueError(f"pool must be positive; got {pool}")
            size = min(size, pool)
        pairs = (size + 1) // 2
        # A zero counter block is safe: the key is fresh for this stream.
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(_PAIR_BYTES * pairs)
        # update_into may want up to one block of room past the data (cryptography's rule).
        self._keystream = bytearray(_PAIR_BYTES * pairs + 15)
        raw = torch.frombuffer(self._keystream, dtype=torch.uint8)[: _PAIR_BYTES * pairs]
        self._radius_bits = raw[: 8 * pairs].view(torch.int64)
        self._angle_bits = raw[8 * pairs :].view(torch.int32)
        on = self.device
        self._k64 = torch.empty(pairs, dtype=torch.int64, device=on)
        self._k32 = torch.empty(pairs, dtype=torch.int32, device=on)
        self._radius = torch.empty(pairs, dtype=torch.float32, device=on)
        self._angle = torch.empty(pairs, dtype=torch.float32, device=on)
        self._trig = torch.empty(pairs, dtype=torch.float32, device=on)
        self._pool = torch.empty(2 * pairs, dtype=torch.float32, device=on)
        self.device = self._pool.device  # "cuda" resolved to "cuda:0"
        # On the CPU, fills go through numpy views: a small fill (a logistic regression's
        # 20 values per step) costs ~2 us there, ~8 us through torch's out= ops.
        self._pool_np = self._pool.numpy() if self.device.type == "cpu" else None
        self._next = self._pool.numel()  # empty: the first fill refills

    def _refill(self) -> None:
        """Turn the next keystream block into a pool of normals (Box-Muller)."""
        if self._cipher.update_into(self._zeros, self._keystream) != len(self._zeros):
            raise RuntimeError("the AES-CTR keystream came back short")
        pairs = self._radius.numel()
        radius_bits = self._radius_bits.to(self.device, non_blocking=False)
        angle_bits = self._angle_bits.to(self.device, non_blocking=False)
        # u1 = (k + 1/2) / 2**53 in (0, 1): never 0, so the log is finite; k + 1/2 rounds
        # to float32 first, which keeps 24 significant bits of u1 at every scale.
        torch.bitwise_and(radius_bits, (1 << _RADIUS_BITS) - 1, out=self._k64)
        radius = self._radius
        radius.copy_(self._k64)
        radius.add_(0.5).mul_(2.0**-_RADIUS_BITS).log_().mul_(-2.0).sqrt_()
        torch.bitwise_and(angle_bits, (1 << _ANGLE_BITS) - 1, out=self._k32)
        angle = self._angle
        angle.copy_(self._k32)
        angle.mul_(2.0 * math.pi * 2.0**-_ANGLE_BITS)
        torch.cos(angle, out=self._trig)
        torch.mul(radius, self._trig, out=self._pool[:pairs])
        torch.sin(angle, out=self._trig)
        torch.mul(radius, self._trig, out=self._pool[pairs:])
        self._next = 0

    def fill(self, out: torch.Tensor, scale: float = 1.0) -> None:
        """Overwrite ``out`` (contiguous float32 or float64 on this device) with N(0, scale**2).

        The values have float32's precision in either dtype (the pool is float32).
        """
        if out.dtype not in _OUT_DTYPES or not out.is_contiguous() or out.device != self.device:
            raise ValueError(
                "out must be a contiguous float32 or float64 tensor on "
                f"{self.device}; got {out.dtype} on {out.device}"
            )
        size = self._pool.numel()
        done, total = 0, out.numel()
        pool_np = self._pool_np
        if pool_np is None:
            flat = out.view(-1)
        else:
            flat_np = out.detach().numpy().reshape(-1)
            factor = np.float32(scale)
        while done < total:
            if self._next == size:
                self._refill()
            take = min(total - done, size - self._next)
            start, stop = self._next, self._next + take
            if pool_np is None:
                torch.mul(self._pool[start:stop], scale, out=flat[done : done + take])
            else:
                np.multiply(pool_np[start:stop], factor, out=flat_np[done : done + take])
            self._next = stop
            done += take


_BUFFER = 1 << 14
_ZEROS = bytes(_BUFFER)


class CryptoRandom:
    """A node's generator for every other DP draw: AES-128-CTR under one key.

    It has the draws ``federation.privacy``'s samplers and Poisson sampling make
    (``random``, ``geometric``, ``bytes``; a ``federation.privacy.RandomSource``), so a node
    hands it out where a ``numpy.random.Generator`` would go. numpy's generators (PCG64)
    are not cryptographic: one Analyze request can show a consumer tens of thousands of
    noise values whose true cells it knows (a wide histogram of known-empty bins at a tiny
    epsilon), and whoever recovered the generator's state from them would read the other
    cells' noise too. Here every draw is keystream.
    """

    def __init__(self, key: bytes) -> None:
        """Start the stream for ``key`` (16 bytes, used for this generator only).

        Raises:
            ValueError: ``key`` is not 16 bytes.
        """
        if len(key) != KEY_BYTES:
            raise ValueError(f"the key must be {KEY_BYTES} bytes; got {len(key)}")
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        # The next keystream bytes, made _BUFFER at a time: small draws (a few hundred
        # geometric gaps per DP-SGD step) then cost a slice, not a cipher call.
        self._buffer = b""
        self._at = 0

    def bytes(self, length: int) -> bytes:
        """The next ``length`` keystream bytes (in stream order, whatever the call sizes)."""
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        head = self._buffer[self._at : self._at + length]
        self._at += len(head)
        need = length - len(head)
        if need == 0:
            return head
        if need >= _BUFFER:
            return head + self._cipher.update(bytes(need))
        self._buffer, self._at = self._cipher.update(_ZEROS), need
        return head + self._buffer[:need]

    def _words(self, size: int) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self.bytes(8 * size), dtype="<u8")

    def random(self, size: int) -> npt.NDArray[np.float64]:
        """``size`` uniform floats ``k / 2**53`` in [0, 1), k uniform on 53 bits."""
        return (self._words(size) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def geometric(self, p: float, size: int) -> npt.NDArray[np.int64]:
        """``size`` trial counts up to the first success at rate ``p`` (support 1, 2, ...).

        By inversion: ``ceil(ln u / ln(1 - p))`` with ``u = (k + 1/2) / 2**53`` in (0, 1),
        so P(G > k) = (1 - p)**k up to float64 rounding; the largest value is about
        ``37.4 / -ln(1 - p)``, 37 times the scale (numpy's own sampler stops near 44).

        Raises:
            ValueError: ``p`` is not in (0, 1].
        """
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1]; got {p!r}")
        if p == 1.0:
            self._words(size)  # keep the stream's position a function of the calls alone
            return np.ones(size, dtype=np.int64)
        # ln u = ln(k + 1/2) - 53 ln 2, u = (k + 1/2) / 2**53: one array op fewer.
        trials = (self._words(size) >> np.uint64(11)).astype(np.float64)
        trials += 0.5
        np.log(trials, out=trials)
        trials -= 53.0 * math.log(2.0)
        trials /= math.log1p(-p)
        np.ceil(trials, out=trials)
        # As numpy does, saturate rather than wrap where p is so small the count would not
        # fit (the samplers refuse such scales before any draw).
        top = math.nextafter(2.0**63, 0.0)  # the largest float64 an int64 holds
        # trials > 0 (ln u < 0): ceil is already >= 1.
        return np.minimum(trials, top, out=trials).astype(np.int64)
