"""Server-side aggregation: the streaming sample-size weighted mean (FedAvg, FedProx, FedDC, SWAG
moments) and the daisy-chain permutation.

Updates are added one at a time and never kept, so memory holds one float64 sum per tensor plus
the update being added, however many participants there are.
"""

import random
from collections.abc import Iterable, Mapping

import numpy as np

from fltraining.weights.signature import Signature, TensorSpec, check_matches, signature_of

# Elements per step of the weighted add: the scratch product (and the slice of the sums it is added
# to) stay in the CPU cache, where a whole-tensor temporary would go through main memory.
BLOCK = 1 << 15


def _add_weighted(sums: np.ndarray, values: np.ndarray, weight: int, scratch: np.ndarray) -> None:
    """sums += weight · values, in float64, one cache-sized block at a time (flat arrays)."""
    if values.dtype == np.float32 and weight < 2**24:
        # n·w is rounded once to float32, the precision the client's values have anyway (and
        # float32 cannot overflow here); the running sum over all updates stays float64.
        factor = np.float32(weight)
        small = scratch.view(np.float32)[:BLOCK]
        for start in range(0, values.size, BLOCK):
            stop = min(start + BLOCK, values.size)
            product = np.multiply(values[start:stop], factor, out=small[: stop - start])
            np.add(sums[start:stop], product, out=sums[start:stop])
        return
    for start in range(0, values.size, BLOCK):
        stop = min(start + BLOCK, values.size)
        product = np.multiply(values[start:stop], float(weight), out=scratch[: stop - start], dtype=np.float64)
        np.add(sums[start:stop], product, out=sums[start:stop])


class FedAvgAccumulator:
    """Running Σ nᵢ·wᵢ (float64) and Σ nᵢ over updates that all have `signature`."""

    def __init__(self, signature: Mapping[str, TensorSpec], field: str = "model_file") -> None:
        self.signature: Signature = dict(signature)
        self.field = field
        self.count = 0
        self.total_samples = 0
        self._sums = {name: np.zeros(spec.shape, dtype=np.float64) for name, spec in self.signature.items()}
        self._scratch = np.empty(BLOCK, dtype=np.float64)

    @property
    def state_nbytes(self) -> int:
        """Bytes of the arrays the accumulator keeps (its float64 sums and one fixed scratch block)."""
        return sum(array.nbytes for array in self._sums.values()) + self._scratch.nbytes

    def add(self, tensors: Mapping[str, np.ndarray], sample_size: int) -> None:
        """Add one update weighted by its sample size (≥ 1); a refused update changes nothing."""
        if isinstance(sample_size, bool) or not isinstance(sample_size, int | np.integer) or sample_size < 1:
            raise ValueError(f"sample_size must be an integer ≥ 1, not {sample_size!r}")
        check_matches(self.signature, signature_of(tensors), self.field)
        for name, sums in self._sums.items():
            _add_weighted(sums.reshape(-1), np.asarray(tensors[name]).reshape(-1), int(sample_size), self._scratch)
        self.count += 1
        self.total_samples += int(sample_size)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean of every tensor, in the signature's order and each tensor's own dtype."""
        if self.count == 0:
            raise ValueError("no updates were added")
        return {
            # asarray: arithmetic on a 0-d array (such as a BatchNorm counter) yields a NumPy scalar.
            name: _to_dtype(np.asarray(self._sums[name] / self.total_samples), np.dtype(spec.dtype))
            for name, spec in self.signature.items()
        }


def _to_dtype(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return mean.astype(dtype)
    if dtype.kind == "b":
        # A weighted majority vote: bools are the integers 0 and 1, rounded like them (a tie is False).
        return np.asarray(mean > 0.5)
    info = np.iinfo(dtype)
    rounded = np.asarray(np.rint(mean))  # half to even, as NumPy rounds
    # float64 cannot hold the largest int64/uint64; clip to the largest float below it, which casts safely.
    high = float(info.max) if int(float(info.max)) == info.max else np.nextafter(float(info.max), 0.0)
    result = np.asarray(np.clip(rounded, float(info.min), high)).astype(dtype)
    result[rounded > high] = info.max
    return result


def fedavg(
    updates: Iterable[tuple[Mapping[str, np.ndarray], int]], signature: Mapping[str, TensorSpec]
) -> dict[str, np.ndarray]:
    """The sample-size weighted mean of `(tensors, sample_size)` updates, consumed one at a time."""
    accumulator = FedAvgAccumulator(signature)
    for tensors, sample_size in updates:
        accumulator.add(tensors, sample_size)
        del tensors  # released before the next update is produced, so two are never held
    return accumulator.result()


class MomentsAccumulator:
    """SWAG: the sample-size weighted means of the clients' first and second moments, streamed."""

    def __init__(self, signature: Mapping[str, TensorSpec]) -> None:
        self.first = FedAvgAccumulator(signature, "first_moment_file")
        self.second = FedAvgAccumulator(signature, "second_moment_file")

    @property
    def state_nbytes(self) -> int:
        """Bytes of the arrays the accumulator keeps (two sets of float64 sums)."""
        return self.first.state_nbytes + self.second.state_nbytes

    def add(
        self, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray], sample_size: int
    ) -> None:
        """Add one client's moments; both are checked before either is added."""
        check_matches(self.second.signature, signature_of(second), self.second.field)
        self.first.add(first, sample_size)
        self.second.add(second, sample_size)

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The aggregated (first, second) moments."""
        return self.first.result(), self.second.result()


def weighted_mean_moments(
    updates: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], int]],
    signature: Mapping[str, TensorSpec],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The weighted means of `(first, second, sample_size)` SWAG statistics, consumed one at a time."""
    accumulator = MomentsAccumulator(signature)
    for first, second, sample_size in updates:
        accumulator.add(first, second, sample_size)
        del first, second  # released before the next statistics are produced
    return accumulator.result()


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation of range(n) without fixed points (n ≥ 2): i gets the model of entry i."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, not {n}")
    # Rejection sampling: a uniform shuffle conditioned on having no fixed point is uniform over
    # derangements, and about 1/e of shuffles qualify, so ~2.7 shuffles are expected.
    permutation = list(range(n))
    while True:
        rng.shuffle(permutation)
        if all(target != index for index, target in enumerate(permutation)):
            return permutation
