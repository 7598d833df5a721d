"""Statistical and structural checks of DP-SGD's noise source, ``nodes.noise.GaussianStream``.

Every check uses a fixed key, so a run is deterministic; what a correct sampler would fail
with over a random key:

- Kolmogorov-Smirnov against N(0, 1), 2M values: alpha = 1e-3;
- tail counts P(|Z| > t), t = 2..5, 8M values: exact binomial test, alpha = 1e-4 each;
- mean, variance, kurtosis and correlations: |z| <= 4.5 standard errors (alpha = 6.8e-6).

A power check feeds the KS test values 1% too wide and asserts it notices.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from nodes.noise import KEY_BYTES, POOL, GaussianStream

KEY = bytes(range(16))


def _draw(count: int, *, key: bytes = KEY, scale: float = 1.0) -> npt.NDArray[np.float64]:
    out = torch.empty(count)
    GaussianStream(key).fill(out, scale)
    return out.double().numpy()


def test_values_follow_the_standard_normal() -> None:
    values = _draw(2_000_000)
    assert stats.kstest(values, "norm").pvalue > 1e-3
    n = values.size
    assert abs(values.mean()) < 4.5 / math.sqrt(n)
    assert abs(values.var() - 1.0) < 4.5 * math.sqrt(2.0 / n)
    # Excess kurtosis 0 with standard error sqrt(24 / n): a scale mixture would show here.
    assert abs(stats.kurtosis(values)) < 4.5 * math.sqrt(24.0 / n)


def test_the_checks_notice_a_one_percent_scale_error() -> None:
    assert stats.kstest(_draw(2_000_000, scale=1.01), "norm").pvalue < 1e-3


@pytest.mark.parametrize("t", [2.0, 3.0, 4.0, 4.5, 5.0])
def test_tails_have_the_gaussian_mass(t: float) -> None:
    values = _draw(8_000_000, key=bytes([7]) * 16)
    beyond = int(np.count_nonzero(np.abs(values) > t))
    p = 2.0 * stats.norm.sf(t)
    assert stats.binomtest(beyond, values.size, p).pvalue > 1e-4, (beyond, values.size * p)


class _Fixed:
    """A 'cipher' whose keystream is given: ``pattern`` repeated."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern

    def update_into(self, data: bytes, buf: bytearray) -> int:
        reps = -(-len(data) // len(self.pattern))
        buf[: len(data)] = (self.pattern * reps)[: len(data)]
        return len(data)


def _radii(words: list[int]) -> npt.NDArray[np.float64]:
    """The radius sqrt(z1**2 + z2**2) of each pair whose 64-bit radius word is given."""
    stream = GaussianStream(KEY, pool=2 * len(words))
    keystream = b"".join(w.to_bytes(8, "little") for w in words) + bytes(4 * len(words))
    stream._cipher = _Fixed(keystream)  # type: ignore[assignment]
    out = torch.empty(2 * len(words))
    stream.fill(out)
    assert torch.isfinite(out).all()
    pairs = out.double().view(2, len(words))  # r cos(theta) then r sin(theta), per pair
    return pairs.pow(2).sum(0).sqrt().numpy()


def test_the_radius_uses_53_bits_and_reaches_8_65_standard_deviations() -> None:
    # u1 = (k + 1/2) 2**-53 from the low 53 bits of each radius word: k = 0 gives the
    # largest radius, sqrt(-2 ln 2**-54) = 8.65 (torch's 24-bit draw stops at 5.77); the
    # top 11 bits are ignored; all-one bits give u1 = 1, radius 0. All stay finite.
    words = [0, 1, 2**21, 2**24 + 1, 2**52, 2**53 - 1, 0xFFE0_0000_0000_0000, 2**64 - 1]
    u1 = [((w & (2**53 - 1)) + 0.5) * 2.0**-53 for w in words]
    expected = [math.sqrt(-2.0 * math.log(min(u, 1.0))) for u in u1]
    assert expected[0] == pytest.approx(8.652, abs=1e-3)
    assert expected[1] == pytest.approx(8.524, abs=1e-3)
    np.testing.assert_allclose(_radii(words), expected, rtol=1e-6, atol=1e-3)


def _reference(key: bytes, count: int, pool: int) -> npt.NDArray[np.float64]:
    """The stream's first ``count`` values, made independently in float64."""
    pairs = pool // 2
    cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    values: list[npt.NDArray[np.float64]] = []
    while sum(v.size for v in values) < count:
        block = cipher.update(bytes(12 * pairs))
        k = np.frombuffer(block[: 8 * pairs], dtype="<u8") & np.uint64(2**53 - 1)
        a = np.frombuffer(block[8 * pairs :], dtype="<u4") & np.uint32(2**24 - 1)
        radius = np.sqrt(-2.0 * np.log((k.astype(np.float64) + 0.5) * 2.0**-53))
        angle = a.astype(np.float64) * (2.0 * math.pi * 2.0**-24)
        values += [radius * np.cos(angle), radius * np.sin(angle)]
    return np.concatenate(values)[:count]


def test_values_are_aes_128_ctr_box_muller_known_answers() -> None:
    # The cipher (AES-128, counter from zero), the key, the bit layout and the transform,
    # pinned against an independent float64 rendering, across three pool refills.
    pool, count = 512, 1300
    out = torch.empty(count)
    GaussianStream(KEY, pool=pool).fill(out)
    expected = _reference(KEY, count, pool)
    # float32 arithmetic: ~1e-6 relative, plus u1's rounding to float32 near 1, which
    # moves radii near 0 by up to ~1e-5 (9.3e-6 over 2M values).
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=2e-5)


def test_pairs_and_neighbours_are_uncorrelated() -> None:
    values = _draw(4 * POOL, key=bytes([3]) * 16)
    pools = values.reshape(4, 2, POOL // 2)
    cos_part, sin_part = pools[:, 0].ravel(), pools[:, 1].ravel()
    n = cos_part.size
    bound = 4.5 / math.sqrt(n)
    # Box-Muller's two values of a pair share the radius: their squares would correlate
    # if the pair were not independent normals.
    assert abs(np.corrcoef(cos_part, sin_part)[0, 1]) < bound
    assert abs(np.corrcoef(cos_part**2, sin_part**2)[0, 1]) < bound
    assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 4.5 / math.sqrt(values.size)
    # Consecutive pools come from consecutive keystream blocks: no repetition.
    assert abs(np.corrcoef(pools[0].ravel(), pools[1].ravel())[0, 1]) < 4.5 / math.sqrt(POOL)


def test_the_stream_continues_across_fills_and_scales_each() -> None:
    whole = torch.empty(3 * POOL + 5)
    GaussianStream(KEY).fill(whole)
    stream = GaussianStream(KEY)
    parts = [torch.empty(n) for n in (7, POOL, 2 * POOL - 3, 1)]
    for part in parts:
        stream.fill(part, 2.5)
    np.testing.assert_allclose(torch.cat(parts).numpy(), 2.5 * whole.numpy(), rtol=1e-6)


def test_every_key_byte_changes_the_stream() -> None:
    # torch.Generator.manual_seed keeps 32 bits of its seed; all 128 key bits count here.
    base = _draw(64)
    for position in range(KEY_BYTES):
        key = bytearray(KEY)
        key[position] ^= 0x80
        assert not np.array_equal(_draw(64, key=bytes(key)), base), position
    np.testing.assert_array_equal(_draw(64), base)  # and the same key, the same stream


@pytest.mark.parametrize(
    ("key", "out", "message"),
    [
        (bytes(8), torch.empty(4), "16 bytes"),
        (KEY, torch.empty(4, dtype=torch.float16), "contiguous float32 or float64"),
        (KEY, torch.empty(4, 2).t(), "contiguous float32 or float64"),
    ],
)
def test_misuse_is_refused(key: bytes, out: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianStream(key).fill(out)
