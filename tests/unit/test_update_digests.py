"""The digest a training receipt commits to for each update tensor (federation.training)."""

from __future__ import annotations

import numpy as np

from federation.training import TRAIN_PAYLOAD_VERSION, tensor_digests, tensor_hasher

# BLAKE3's published test vector for the empty input (BLAKE3-team/BLAKE3, test_vectors.json):
# pins the algorithm, so a verifier in another language knows what to recompute.
_BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_an_empty_tensor_digests_to_blake3_of_no_bytes() -> None:
    assert tensor_digests({"w": np.zeros((0, 3), np.float32)}) == {"w": _BLAKE3_EMPTY}
    assert TRAIN_PAYLOAD_VERSION == 2  # the version whose update entries say "blake3"


def test_a_tensor_digests_its_little_endian_c_order_bytes_however_it_is_laid_out() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    expected = tensor_hasher()
    expected.update(values.astype("<f4").tobytes(order="C"))
    strided = np.asfortranarray(values)  # same values, another memory order
    big_endian = values.astype(">f4")
    digests = tensor_digests({"c": values, "f": strided, "be": big_endian})
    assert set(digests.values()) == {expected.hexdigest()}


def test_hashing_in_chunks_as_the_coordinator_does_equals_hashing_the_whole_tensor() -> None:
    values = np.random.default_rng(1).standard_normal(300_001).astype(np.float32)
    raw = memoryview(values.view(np.uint8))
    streamed = tensor_hasher()
    for start in range(0, len(raw), 65_536):  # the coordinator's sink sees chunk by chunk
        streamed.update(raw[start : start + 65_536])
    assert tensor_digests({"w": values})["w"] == streamed.hexdigest()
    changed = values.copy()
    changed[-1] = np.nextafter(changed[-1], np.float32(np.inf))  # one ulp, last element
    assert tensor_digests({"w": changed})["w"] != streamed.hexdigest()
