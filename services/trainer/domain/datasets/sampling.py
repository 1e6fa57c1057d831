"""Poisson sampling of server-held records, the only batch formation that earns
amplification by subsampling in the accountant.

Each step includes every record independently with probability ``q`` (Abadi et al.
2016, arXiv:1607.00133, §3.1; the ``PoissonSampledDpEvent`` of dp-accounting assumes
exactly this). The batch size is therefore Binomial(N, q): it varies, it may be 0, and
the update divides the noised gradient sum by the *expected* batch size ``q · N`` (see
:mod:`tensafe.trainer.domain.engine.training`).

Randomness: the AES-256-CTR keystream of :mod:`tensafe.trainer.domain.engine.noise` (the DP
noise's CSPRNG construction) under a key of 32 bytes from the operating system's CSPRNG
per run attempt, never stored or returned, so nobody can predict or replay which records
were drawn. Record i of a draw is included when the top 53 bits of its 64-bit keystream
word, read as ``u = k · 2^-53``, satisfy ``u < q``: an inclusion probability within
``2^-53`` of q (``ceil(q · 2^53) / 2^53``), independently across records and steps.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import numpy.typing as npt

from tensafe.common.errors import InvalidArgument
from tensafe.trainer.domain.engine.noise import AesCtrStream, fresh_key


def resolve_sample_rate(
    *, sample_rate: float | None, expected_batch_size: float | None, records: int
) -> float:
    """The Poisson rate q of a TrainOnDataset request.

    Args:
        sample_rate: q, if given.
        expected_batch_size: E, if given instead (q = E / records).
        records: Records in the dataset, >= 1.

    Returns:
        q in (0, 1].

    Raises:
        InvalidArgument: Neither or both given, or a value out of range; the field is
            ``sample_rate`` or ``expected_batch_size``.
    """
    if (sample_rate is None) == (expected_batch_size is None):
        raise InvalidArgument("rate", "give exactly one of sample_rate, expected_batch_size")
    if sample_rate is not None:
        if not math.isfinite(sample_rate) or not 0.0 < sample_rate <= 1.0:
            raise InvalidArgument("sample_rate", f"must be in (0, 1], got {sample_rate!r}")
        return float(sample_rate)
    assert expected_batch_size is not None
    if not math.isfinite(expected_batch_size) or not 0.0 < expected_batch_size <= records:
        raise InvalidArgument(
            "expected_batch_size",
            f"must be in (0, {records}] (the dataset's records), got {expected_batch_size!r}",
        )
    return float(expected_batch_size) / records


class PoissonSampler:
    """Draws Poisson batches of record indices.

    Args:
        records: N, the number of records.
        sample_rate: q in (0, 1].
        seed: Derive the key from this seed (tests, to be reproducible); None draws a
            fresh key from the OS CSPRNG (production always passes None).
    """

    def __init__(self, *, records: int, sample_rate: float, seed: int | None = None) -> None:
        if records < 1:
            raise InvalidArgument("records", "must be >= 1")
        if not 0.0 < sample_rate <= 1.0:
            raise InvalidArgument("sample_rate", f"must be in (0, 1], got {sample_rate!r}")
        self._records = records
        self._rate = sample_rate
        key = fresh_key() if seed is None else hashlib.sha256(str(seed).encode()).digest()
        self._stream = AesCtrStream(key)
        self._zeros = memoryview(bytes(8 * records))
        self._buffer = bytearray(8 * records + 16)

    @property
    def expected_batch_size(self) -> float:
        """Q · N, the divisor of every step's noised gradient sum."""
        return self._rate * self._records

    def draw(self) -> npt.NDArray[np.int64]:
        """One batch: the indices of the records included, in increasing order."""
        self._stream.keystream_into(self._zeros, self._buffer)
        words = np.frombuffer(self._buffer, dtype=np.uint64, count=self._records)
        uniforms = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.flatnonzero(uniforms < self._rate).astype(np.int64)
