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
    """A 'cipher' whose keystream is one byte repeated."""

    def __init__(self, byte: int) -> None:
        self.byte = byte

    def update_into(self, data: bytes, buf: bytearray) -> int:
        buf[: len(data)] = bytes([self.byte]) * len(data)
        return len(data)


def test_the_radius_reaches_past_eight_standard_deviations_and_never_overflows() -> None:
    # Keystreams at the extremes: all-zero bits give the largest radius, all-one bits
    # give u1 = 1 (radius 0). Both must stay finite, and the largest is
    # sqrt(-2 ln 2**-54) = 8.65, where torch's 24-bit draw stops at 5.77.
    for byte, radius in ((0x00, math.sqrt(108 * math.log(2))), (0xFF, 0.0)):
        stream = GaussianStream(KEY, pool=8)
        stream._cipher = _Fixed(byte)  # type: ignore[assignment]
        out = torch.empty(8)
        stream.fill(out)
        assert torch.isfinite(out).all()
        pairs = out.view(2, 4)  # r cos(theta) then r sin(theta), per pair
        np.testing.assert_allclose(pairs.pow(2).sum(0).sqrt().numpy(), radius, rtol=1e-6)


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
        (KEY, torch.empty(4, dtype=torch.float64), "contiguous float32"),
        (KEY, torch.empty(4, 2).t(), "contiguous float32"),
    ],
)
def test_misuse_is_refused(key: bytes, out: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianStream(key).fill(out)
