"""Poisson sampling of server-held records, the only batch formation that earns
amplification by subsampling in the accountant.

Each step includes every record independently with probability ``q`` (Abadi et al.
2016, arXiv:1607.00133, §3.1; the ``PoissonSampledDpEvent`` of dp-accounting assumes
exactly this). The batch size is therefore Binomial(N, q): it varies, it may be 0, and
the update divides the noised gradient sum by the *expected* batch size ``q · N`` (see
:mod:`tensafe.trainer.engine.training`).

Randomness: a numpy ``PCG64`` generator seeded with 128 bits from the operating system's
CSPRNG (:mod:`secrets`) per run attempt. The seed is never stored or returned, so nobody
can replay which records were drawn; PCG64 itself is a statistical, not a cryptographic,
generator.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import numpy.typing as npt

from tensafe.common.errors import InvalidArgument


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
        seed: Seed of the generator; None draws 128 bits from the OS CSPRNG (production
            always passes None; tests pass a seed to be reproducible).
    """

    def __init__(self, *, records: int, sample_rate: float, seed: int | None = None) -> None:
        if records < 1:
            raise InvalidArgument("records", "must be >= 1")
        if not 0.0 < sample_rate <= 1.0:
            raise InvalidArgument("sample_rate", f"must be in (0, 1], got {sample_rate!r}")
        self._records = records
        self._rate = sample_rate
        self._generator = np.random.Generator(
            np.random.PCG64(secrets.randbits(128) if seed is None else seed)
        )

    @property
    def expected_batch_size(self) -> float:
        """Q · N, the divisor of every step's noised gradient sum."""
        return self._rate * self._records

    def draw(self) -> npt.NDArray[np.int64]:
        """One batch: the indices of the records included, in increasing order."""
        included = self._generator.random(self._records) < self._rate
        return np.flatnonzero(included).astype(np.int64)
