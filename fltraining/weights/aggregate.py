"""Server-side aggregation: the sample-size weighted mean (FedAvg, FedProx, FedDC, SWAG moments)
and the daisy-chain permutation.

Two ways to the same numbers: `weighted_mean_into` works block-major over updates that are all
at hand (memory-mapped files: their pages are the page cache's, not the heap's), the way the
engine aggregates; `FedAvgAccumulator` takes updates one at a time, for sources that arrive as
a stream. Both add nᵢ·wᵢ into float64 sums in the same order, so their results are identical.
"""

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from fltraining.weights.formats import Format, load_tensors, write_tensors
from fltraining.weights.safetensors_files import create_safetensors, write_at
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
    if dtype.kind == "f" or dtype.name == "bfloat16":  # ml_dtypes' bfloat16 has kind "V"
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


# Elements per block of the block-major mean: its float64 sums (512 KiB) and the scratch beside
# them stay in the CPU's L2 cache while every update's slice is added.
MEAN_BLOCK = 1 << 16


@cache
def _pool() -> ThreadPoolExecutor:
    # NumPy releases the GIL inside its loops, so the blocks run on every core.
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="aggregate")


def on_cores[P](work: Callable[[P], None], parts: Sequence[P]) -> None:
    """`work(part)` for every part, the parts side by side on the machine's cores; waits for all of them and
    raises the first error."""
    if len(parts) <= 1:
        for part in parts:
            work(part)
        return
    futures = [_pool().submit(work, part) for part in parts]
    for future in futures:
        future.result()


def _check_weights(weights: Sequence[int]) -> int:
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 1:
            raise ValueError(f"sample_size must be an integer ≥ 1, not {weight!r}")
    if not weights:
        raise ValueError("no updates were added")
    return sum(int(weight) for weight in weights)


type Span = tuple[str, int, int]


def _spans(signature: Mapping[str, TensorSpec], parts: int) -> list[list[Span]]:
    """Cut every tensor into blocks and deal contiguous runs of blocks to `parts` workers."""
    blocks = [
        (name, start, min(start + MEAN_BLOCK, size))
        for name, spec in signature.items()
        for size in [int(np.prod(spec.shape, dtype=np.int64))]
        for start in range(0, size, MEAN_BLOCK)
    ]
    share = -(-len(blocks) // parts) if blocks else 1
    return [blocks[index : index + share] for index in range(0, len(blocks), share)]


@dataclass(frozen=True)
class FileTarget:
    """Where each tensor of a result file starts (bytes, little-endian data), written with pwrite."""

    fd: int
    offsets: Mapping[str, int]
    signature: Mapping[str, TensorSpec]


type Target = Mapping[str, np.ndarray] | FileTarget


def emit_block(out: Target, name: str, start: int, mean: np.ndarray, narrow: np.ndarray) -> None:
    """Store one block of a tensor's mean in its dtype (floats rounded as astype would)."""
    if isinstance(out, Mapping):
        target = out[name].reshape(-1)
        target[start : start + mean.size] = mean if target.dtype.kind == "f" else _to_dtype(mean, target.dtype)
        return
    dtype = np.dtype(out.signature[name].dtype).newbyteorder("<")
    if dtype == np.float32:
        converted = narrow[: mean.size]
        np.copyto(converted, mean)  # the same rounding as astype, into a reused buffer
    elif dtype.kind == "f":
        converted = mean.astype(dtype)
    else:
        converted = _to_dtype(mean, dtype)
    # pwrite, not a writable map: writing through page faults cost twice as much here.
    write_at(out.fd, converted.reshape(-1).view(np.uint8), out.offsets[name] + start * dtype.itemsize)


def _mean_spans(
    spans: list[Span], updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[int], total: int,
    out: Target, progress: Callable[[], None],
) -> None:
    sums = np.empty(MEAN_BLOCK, dtype=np.float64)
    wide = np.empty(MEAN_BLOCK, dtype=np.float64)
    narrow = np.empty(MEAN_BLOCK, dtype=np.float32)
    flat: dict[str, list[np.ndarray]] = {}
    for name, start, stop in spans:
        if name not in flat:
            flat[name] = [np.asarray(update[name]).reshape(-1) for update in updates]
        count = stop - start
        block = sums[:count]
        block.fill(0.0)
        for values, weight in zip(flat[name], weights):
            part = values[start:stop]
            if part.dtype == np.float32 and weight < 2**24:
                # n·w rounded once to float32, as FedAvgAccumulator does (see _add_weighted).
                product = np.multiply(part, np.float32(weight), out=narrow[:count])
                np.copyto(wide[:count], product)
                np.add(block, wide[:count], out=block)
            else:
                np.add(block, np.multiply(part, float(weight), out=wide[:count], dtype=np.float64), out=block)
        np.divide(block, total, out=block)
        emit_block(out, name, start, block, narrow)
        progress()


def weighted_mean_into(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[int], signature: Mapping[str, TensorSpec],
    out: Target, progress: Callable[[], None] = lambda: None, field: str = "model_file",
) -> None:
    """Write the sample-size weighted mean of `updates` into `out` (arrays of the signature's shapes
    and dtypes, or a result file's layout), block-major: each cache-sized block takes every update's
    slice before the next block starts, with the blocks spread over the machine's cores. Results
    equal FedAvgAccumulator's."""
    if len(updates) != len(weights):
        raise ValueError("one sample size per update")
    total = _check_weights(weights)
    for update in updates:
        check_matches(signature, signature_of(update), field)
    if isinstance(out, Mapping):
        check_matches(signature, signature_of(out), "result")
    on_cores(lambda spans: _mean_spans(spans, updates, weights, total, out, progress),
             _spans(signature, os.cpu_count() or 1))


def into_file[T](
    paths: Sequence[Path], signature: Mapping[str, TensorSpec], fmt: Format, out: Path,
    fill: Callable[[list[dict[str, np.ndarray]], Target], T], template: Path | None = None,
) -> T:
    """Write what `fill` computes from model files as a model file: inputs mapped into memory (zero copy);
    a safetensors result is written block by block into its preallocated file, never held whole."""
    updates = [load_tensors(path) for path in paths]
    if fmt == "safetensors":
        offsets = create_safetensors(out, signature)
        fd = os.open(out, os.O_WRONLY)
        try:
            # The blob store's commit fsyncs the file.
            return fill(updates, FileTarget(fd, offsets, signature))
        finally:
            os.close(fd)
    result = {name: np.empty(spec.shape, spec.dtype) for name, spec in signature.items()}
    answer = fill(updates, result)
    write_tensors(out, result, fmt, template)  # ONNX: the global model's graph with the new weights
    return answer


def mean_of_files(
    paths: Sequence[Path], weights: Sequence[int], signature: Mapping[str, TensorSpec], fmt: Format, out: Path,
    progress: Callable[[], None] = lambda: None, field: str = "model_file", template: Path | None = None,
) -> None:
    """Write the weighted mean of model files as a model file (see `into_file`)."""
    into_file(paths, signature, fmt, out,
              lambda updates, target: weighted_mean_into(updates, weights, signature, target, progress, field),
              template)


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
