"""Checks of ``nodes.noise.CryptoRandom``, the AES-128-CTR generator behind every node draw.

The integer samplers' laws are checked with it in ``test_noise.py``; here its own draws.
Fixed keys make each run deterministic; false-alarm rates over a random key:
Kolmogorov-Smirnov and chi-square alpha = 1e-3, binomial |z| <= 4.5 (alpha = 6.8e-6).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from nodes.noise import CryptoRandom
from nodes.service import system_rng
from nodes.training import poisson_sample

KEY = bytes(range(100, 116))


def _keystream(key: bytes, length: int) -> bytes:
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(length))


def test_draws_are_the_aes_128_ctr_keystream_in_order() -> None:
    stream = _keystream(KEY, 16 + 8 * 5 + 8 * 4)
    rng = CryptoRandom(KEY)
    assert rng.bytes(16) == stream[:16]
    words = np.frombuffer(stream[16:56], dtype="<u8")
    np.testing.assert_array_equal(rng.random(5), (words >> np.uint64(11)) * 2.0**-53)
    words = np.frombuffer(stream[56:88], dtype="<u8")
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    expected = np.maximum(np.ceil(np.log(u) / math.log1p(-0.2)), 1).astype(np.int64)
    np.testing.assert_array_equal(rng.geometric(0.2, 4), expected)


def test_every_key_byte_changes_the_stream() -> None:
    base = CryptoRandom(KEY).bytes(32)
    for position in range(16):
        key = bytearray(KEY)
        key[position] ^= 1
        assert CryptoRandom(bytes(key)).bytes(32) != base, position


def test_uniforms_are_uniform() -> None:
    values = CryptoRandom(KEY).random(1_000_000)
    assert values.min() >= 0.0
    assert values.max() < 1.0
    assert stats.kstest(values, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("p", [0.999, 0.3, 0.01, 1e-6])
def test_geometric_follows_its_law(p: float) -> None:
    draws = CryptoRandom(KEY).geometric(p, 400_000)
    assert draws.dtype == np.int64
    assert draws.min() >= 1
    # Equal-probability bins of the exact law P(G > k) = (1 - p)**k, chi-square.
    # Bin j holds the integers in (k_j, k_j+1]: G <= k_1, k_1 < G <= k_2, ..., G > k_last.
    ks = np.unique(stats.geom.ppf(np.linspace(0, 1, 41)[1:-1], p))
    observed = np.bincount(np.searchsorted(ks, draws, side="left"), minlength=ks.size + 1)
    cdf = stats.geom.cdf(ks, p)
    expected = np.diff(np.concatenate(([0.0], cdf, [1.0]))) * draws.size
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_geometric_edges() -> None:
    rng = CryptoRandom(KEY)
    np.testing.assert_array_equal(rng.geometric(1.0, 5), np.ones(5, dtype=np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflowing cast: saturates like numpy
        huge = rng.geometric(1e-300, 3)
    assert (huge > 2**62).all()
    for p in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="p must be in"):
            rng.geometric(p, 1)
    with pytest.raises(ValueError, match="16 bytes"):
        CryptoRandom(bytes(15))


def test_a_node_draws_from_it_and_poisson_sampling_keeps_its_rate() -> None:
    rng = system_rng()
    assert isinstance(rng, CryptoRandom)
    n, q = 200_000, 0.01
    chosen = poisson_sample(n, q, CryptoRandom(KEY))
    assert np.all(np.diff(chosen) > 0)
    assert abs(chosen.size - n * q) <= 4.5 * math.sqrt(n * q * (1 - q))
