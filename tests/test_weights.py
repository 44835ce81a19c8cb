"""The storage-independent round engine: model file formats, tensor signatures, FedAvg, derangements."""

import io
import itertools
import json
import pickle
import random
import weakref
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.lib.format as npy
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.errors import InvalidInput
from fltraining.weights import (
    FedAvgAccumulator,
    MomentsAccumulator,
    TensorSpec,
    UnsupportedModelFormat,
    check_matches,
    derangement,
    detect_format,
    dump_tensors,
    fedavg,
    load_tensors,
    signature_of,
    weighted_mean_moments,
)
from fltraining.weights.aggregate import BLOCK
from fltraining.weights.formats import read_signature
from fltraining.weights.signature import from_documents, to_documents

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

# --- helpers ---------------------------------------------------------------------------------

SPRUNG: list[str] = []


def spring() -> str:
    """Called only if something unpickles a Trap."""
    SPRUNG.append("unpickled")
    return "sprung"


class Trap:
    """An object whose unpickling leaves a trace in SPRUNG."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (spring, ())


@pytest.fixture(autouse=True)
def no_unpickling() -> Iterator[None]:
    """Every test ends with no Trap unpickled."""
    SPRUNG.clear()
    yield
    assert SPRUNG == []


def model(fill: float, sample: dict[str, tuple[tuple[int, ...], str]] | None = None) -> dict[str, np.ndarray]:
    """A model whose tensors are all `fill`."""
    layout = sample or {"conv.weight": ((4, 3), "float32"), "conv.bias": ((4,), "float32")}
    return {name: np.full(shape, fill, dtype=dtype) for name, (shape, dtype) in layout.items()}


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip archive holding the given members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """One array in .npy format."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def safetensors_bytes(header: dict[str, Any], body: bytes) -> bytes:
    """A safetensors file with a hand-written header."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def refused(data: bytes, *words: str) -> UnsupportedModelFormat:
    """Assert the file is refused with a 400 that names the accepted formats and the given words."""
    with pytest.raises(UnsupportedModelFormat) as caught:
        load_tensors(data)
    error = caught.value
    assert isinstance(error, InvalidInput) and error.status == 400
    assert "Accepted formats: safetensors; NumPy .npz" in error.detail
    for word in words:
        assert word in error.detail
    return error


# --- aggregation maths -----------------------------------------------------------------------


def test_mean_of_ten_updates_valued_0_to_9_is_4_5() -> None:
    """DLR's test_aggregate: ten equal-weight updates, all-0 ... all-9 → 4.5 everywhere."""
    accumulator = FedAvgAccumulator(signature_of(model(0)))
    for value in range(10):
        accumulator.add(model(value), 1)
    result = accumulator.result()
    assert list(result) == ["conv.weight", "conv.bias"]
    for array in result.values():
        assert array.dtype == np.float32
        assert np.all(array == 4.5)


def test_sample_sizes_weight_the_mean() -> None:
    """DLR's test_aggregate_sample_sizes: values 1 and 2 with sample sizes 1 and 2 → 5/3."""
    layout = {"w": ((2, 2), "float64"), "v": ((3,), "float32")}
    result = fedavg([(model(1, layout), 1), (model(2, layout), 2)], signature_of(model(0, layout)))
    assert np.all(result["w"] == 5 / 3)
    assert np.all(result["v"] == np.float32(5 / 3))


@pytest.mark.parametrize(
    ("dtype", "values", "sizes", "expected"),
    [
        ("float32", [0.25, 1.0], [3, 1], 0.4375),
        ("float16", [60000, 60000], [1, 1], 60000),  # Σ nᵢ·wᵢ = 120000 would be inf in float16
        ("float16", [0.5, 0.25], [1, 3], 0.3125),
        ("int64", [-3, 4], [3, 1], -1),  # -1.25 rounds to -1
        ("int64", [10, 11], [1, 2], 11),  # 10.67 rounds to 11
        ("int64", [1, 2], [1, 1], 2),  # 1.5: half to even
        ("int64", [2, 3], [1, 1], 2),  # 2.5: half to even
        ("int64", [2**63 - 1, 2**63 - 1], [1, 1], 2**63 - 1),  # float64 rounds it up to 2**63
        ("uint64", [2**64 - 1, 2**64 - 1], [5, 7], 2**64 - 1),
        ("uint8", [0, 255], [1, 2], 170),
        ("uint8", [200, 255], [1, 1], 228),  # 227.5: half to even, no uint8 overflow on the way
        ("int8", [-128, -127], [3, 1], -128),
    ],
)
def test_dtypes_are_accumulated_in_float64_and_kept(
    dtype: str, values: list[float], sizes: list[int], expected: float
) -> None:
    """The mean is taken in float64 and stored in the tensor's dtype; integers are rounded."""
    layout = {"t": ((2, 3), dtype)}
    accumulator = FedAvgAccumulator(signature_of(model(0, layout)))
    for value, size in zip(values, sizes, strict=True):
        accumulator.add({"t": np.full((2, 3), value, dtype=dtype)}, size)
    assert all(array.dtype == np.float64 for array in accumulator._sums.values())
    result = accumulator.result()["t"]
    assert result.dtype == np.dtype(dtype)
    assert result.shape == (2, 3)
    assert np.all(result == np.array(expected, dtype=dtype))


def test_integer_means_are_rounded_elementwise() -> None:
    """Each element of an integer tensor is rounded on its own."""
    first = np.array([0, 1, 2, 3], dtype=np.int32)
    second = np.array([1, 1, 4, 8], dtype=np.int32)
    result = fedavg([({"t": first}, 1), ({"t": second}, 2)], {"t": TensorSpec((4,), "int32")})
    # Means: 2/3, 1, 10/3, 19/3.
    assert result["t"].tolist() == [1, 1, 3, 6]


def test_bool_tensors_take_the_weighted_majority_and_ties_are_false() -> None:
    """Bools are the integers 0 and 1, rounded like them: a strict weighted majority is True."""
    signature = {"mask": TensorSpec((4,), "bool")}
    t, f = True, False
    updates = [
        ({"mask": np.array([t, t, f, t])}, 1),
        ({"mask": np.array([t, f, f, f])}, 2),
        ({"mask": np.array([f, t, f, t])}, 1),
    ]
    # Weighted share of True: 3/4, 2/4 (tie), 0, 2/4 (tie).
    result = fedavg(updates, signature)["mask"]
    assert result.dtype == np.bool_
    assert result.tolist() == [True, False, False, False]


def test_a_multi_tensor_model_keeps_each_tensor_its_shape_dtype_and_order() -> None:
    """A model mixing dtypes and shapes (BatchNorm buffers included) aggregates tensor by tensor."""
    layout = {
        "bn.num_batches_tracked": ((), "int64"),
        "fc.weight": ((3, 2), "float32"),
        "fc.bias": ((3,), "float16"),
        "embedding.ids": ((5,), "uint8"),
        "bn.running_mean": ((0,), "float64"),
    }
    result = fedavg([(model(2, layout), 3), (model(6, layout), 1)], signature_of(model(0, layout)))
    assert signature_of(result) == signature_of(model(0, layout))
    assert list(result) == list(layout)
    for name, array in result.items():
        assert isinstance(array, np.ndarray), name  # 0-d tensors too, not NumPy scalars
        assert np.all(array == 3), name


def test_identical_updates_give_back_the_same_weights() -> None:
    """Aggregating copies of one model reproduces it exactly (no float drift)."""
    rng = np.random.default_rng(7)
    weights = {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.integers(-9, 9, 8)}
    result = fedavg(((weights, size) for size in (1, 3, 5, 7, 11)), signature_of(weights))
    for name, array in weights.items():
        assert np.array_equal(result[name], array)


@pytest.mark.parametrize("sample_size", [0, -1, True, 1.5, "3", None])
def test_sample_sizes_below_one_or_not_integers_are_refused(sample_size: Any) -> None:
    """A sample size must be an integer ≥ 1; a refused update leaves the accumulator as it was."""
    accumulator = FedAvgAccumulator(signature_of(model(0)))
    accumulator.add(model(1), 1)
    with pytest.raises(ValueError, match="sample_size must be an integer ≥ 1"):
        accumulator.add(model(5), sample_size)
    assert (accumulator.count, accumulator.total_samples) == (1, 1)
    assert np.all(accumulator.result()["conv.weight"] == 1)


def test_numpy_integer_sample_sizes_are_accepted() -> None:
    """Sample sizes read from arrays or BSON Int64 are integers too."""
    accumulator = FedAvgAccumulator(signature_of(model(0)))
    accumulator.add(model(3), np.int64(4))
    assert accumulator.total_samples == 4 and type(accumulator.total_samples) is int


def test_an_update_with_another_signature_changes_nothing() -> None:
    """A mismatching update raises InvalidInput before any sum is touched."""
    accumulator = FedAvgAccumulator(signature_of(model(0)))
    accumulator.add(model(1), 2)
    bad = model(100)
    bad["conv.bias"] = np.full((5,), 100, dtype=np.float32)
    with pytest.raises(InvalidInput, match="'conv.bias' has shape"):
        accumulator.add(bad, 1)
    assert (accumulator.count, accumulator.total_samples) == (1, 2)
    assert all(np.all(array == 1) for array in accumulator.result().values())


def test_result_needs_at_least_one_update() -> None:
    """There is no mean of nothing."""
    with pytest.raises(ValueError, match="no updates"):
        FedAvgAccumulator(signature_of(model(0))).result()


def _retained_arrays(obj: object) -> list[np.ndarray]:
    """Every array an object keeps in its attributes, one level of containers deep."""
    arrays: list[np.ndarray] = []
    for value in vars(obj).values():
        items = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, list | tuple)
            else [value]
        )
        arrays.extend(item for item in items if isinstance(item, np.ndarray))
    return arrays


def test_the_accumulator_keeps_one_set_of_float64_sums_however_many_updates() -> None:
    """Memory does not grow with the number of updates: one float64 sum per tensor and one fixed
    cache-sized scratch block, updates dropped."""
    layout = {"a": ((64, 32), "float32"), "b": ((32,), "uint8"), "c": ((), "int64")}
    one_set = sum(np.prod(shape, dtype=int) * 8 for shape, _ in layout.values()) + BLOCK * 8
    accumulator = FedAvgAccumulator(signature_of(model(0, layout)))
    sums_before = {name: id(array) for name, array in accumulator._sums.items()}
    sizes: list[int] = []
    for count in range(1, 101):
        update = model(count % 7, layout)
        watchers = [weakref.ref(array) for array in update.values()]
        accumulator.add(update, count)
        del update
        assert all(watcher() is None for watcher in watchers), "the accumulator kept an update's array"
        retained = _retained_arrays(accumulator)
        assert len(retained) == len(layout) + 1
        assert all(array.dtype == np.float64 for array in retained)
        sizes.append(sum(array.nbytes for array in retained))
    assert set(sizes) == {one_set} and accumulator.state_nbytes == one_set
    assert {name: id(array) for name, array in accumulator._sums.items()} == sums_before
    assert accumulator.count == 100


def test_fedavg_consumes_updates_one_at_a_time() -> None:
    """The helper never holds two updates: each is released before the next is produced."""
    watchers: list[weakref.ref[np.ndarray]] = []

    def updates() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for value in range(20):
            assert all(watcher() is None for watcher in watchers), "an earlier update is still held"
            update = model(value)
            watchers.extend(weakref.ref(array) for array in update.values())
            yield update, 1
            del update

    result = fedavg(updates(), signature_of(model(0)))
    assert np.all(result["conv.weight"] == 9.5)


def test_swag_moments_are_sample_size_weighted_means() -> None:
    """First and second moments are averaged like FedAvg updates, each with the client's sample size."""
    signature = {"theta": TensorSpec((3,), "float32")}
    clients = [
        ({"theta": np.full(3, 1.0, np.float32)}, {"theta": np.full(3, 2.0, np.float32)}, 1),
        ({"theta": np.full(3, 4.0, np.float32)}, {"theta": np.full(3, 20.0, np.float32)}, 2),
    ]
    first, second = weighted_mean_moments(clients, signature)
    assert np.all(first["theta"] == 3.0)  # (1 + 8) / 3
    assert np.all(second["theta"] == 14.0)  # (2 + 40) / 3
    assert first["theta"].dtype == second["theta"].dtype == np.float32


def test_swag_statistics_with_a_bad_second_moment_change_nothing() -> None:
    """Both moment files are checked before either is added, and the error names the bad file."""
    signature = {"theta": TensorSpec((3,), "float32")}
    accumulator = MomentsAccumulator(signature)
    good = {"theta": np.ones(3, np.float32)}
    with pytest.raises(InvalidInput) as caught:
        accumulator.add(good, {"theta": np.ones(4, np.float32)}, 1)
    assert caught.value.errors == [
        {
            "loc": ["second_moment_file", "theta"],
            "msg": "tensor 'theta' has shape [4], expected [3]",
            "type": "tensor_shape",
        }
    ]
    assert accumulator.first.count == accumulator.second.count == 0
    assert accumulator.state_nbytes == 2 * (3 * 8 + BLOCK * 8)


# --- signatures ------------------------------------------------------------------------------

EXPECTED = {
    "fc1.weight": TensorSpec((8, 4), "float32"),
    "fc1.bias": TensorSpec((8,), "float32"),
    "bn.num_batches_tracked": TensorSpec((), "int64"),
}


def _mismatch(actual: dict[str, TensorSpec]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        check_matches(EXPECTED, actual)
    assert caught.value.status == 400
    return caught.value


def test_a_matching_signature_passes_whatever_the_order() -> None:
    """safetensors lists tensors sorted, PyTorch in module order: order is not compared."""
    check_matches(EXPECTED, dict(reversed(list(EXPECTED.items()))))


def test_a_missing_tensor_is_named_with_what_was_expected() -> None:
    """The first expected tensor the update lacks is named, with its shape and dtype."""
    error = _mismatch({name: spec for name, spec in EXPECTED.items() if name != "fc1.bias"})
    assert error.detail == (
        "The model file does not match the global model: tensor 'fc1.bias' is missing"
        " (expected shape [8], dtype float32)."
    )
    assert error.errors == [
        {
            "loc": ["model_file", "fc1.bias"],
            "msg": "tensor 'fc1.bias' is missing (expected shape [8], dtype float32)",
            "type": "tensor_missing",
        }
    ]


def test_an_extra_tensor_is_named() -> None:
    """A tensor the global model does not have is refused."""
    error = _mismatch({**EXPECTED, "fc2.weight": TensorSpec((2, 8), "float32")})
    assert "tensor 'fc2.weight' is not in the global model" in error.detail
    assert error.errors is not None and error.errors[0]["type"] == "tensor_unexpected"


def test_a_shape_mismatch_is_named_with_both_shapes() -> None:
    """Same name, other shape (a transposed weight)."""
    error = _mismatch({**EXPECTED, "fc1.weight": TensorSpec((4, 8), "float32")})
    assert "tensor 'fc1.weight' has shape [4, 8], expected [8, 4]" in error.detail
    assert error.errors is not None and error.errors[0]["type"] == "tensor_shape"


def test_a_dtype_mismatch_is_named_with_both_dtypes() -> None:
    """Same name and shape, other dtype (a float64 export of a float32 model)."""
    error = _mismatch({**EXPECTED, "fc1.bias": TensorSpec((8,), "float64")})
    assert "tensor 'fc1.bias' has dtype float64, expected float32" in error.detail
    assert error.errors is not None and error.errors[0]["type"] == "tensor_dtype"


def test_only_the_first_mismatch_is_reported() -> None:
    """Mismatches are reported in the global model's order, missing before extra."""
    error = _mismatch(
        {
            "fc1.weight": TensorSpec((1,), "float32"),
            "extra": TensorSpec((1,), "float32"),
            "bn.num_batches_tracked": TensorSpec((), "float32"),
        }
    )
    assert error.errors is not None and len(error.errors) == 1
    assert error.errors[0]["loc"] == ["model_file", "fc1.weight"]
    assert _mismatch({"extra": TensorSpec((1,), "float32")}).errors[0]["type"] == "tensor_missing"  # type: ignore[index]


def test_the_field_named_in_errors_is_the_callers() -> None:
    """SWAG uploads name their own multipart field."""
    with pytest.raises(InvalidInput) as caught:
        check_matches(EXPECTED, {}, field="first_moment_file")
    assert caught.value.errors is not None and caught.value.errors[0]["loc"] == [
        "first_moment_file",
        "fc1.weight",
    ]


def test_signature_of_reads_names_shapes_and_dtype_names() -> None:
    """Big-endian arrays have the same dtype name as native ones."""
    tensors = {
        "a.b": np.zeros((2, 0, 3), dtype=">f4"),
        "c": np.array(True),
        "d": np.arange(3, dtype=np.uint16),
    }
    assert signature_of(tensors) == {
        "a.b": TensorSpec((2, 0, 3), "float32"),
        "c": TensorSpec((), "bool"),
        "d": TensorSpec((3,), "uint16"),
    }


def test_signatures_are_stored_as_documents_because_names_hold_dots() -> None:
    """The document form keeps order, shapes and dtypes, with no tensor name as a key."""
    documents = to_documents(EXPECTED)
    assert documents[0] == {"name": "fc1.weight", "shape": [8, 4], "dtype": "float32"}
    assert json.loads(json.dumps(documents)) == documents
    restored = from_documents(documents)
    assert restored == EXPECTED and list(restored) == list(EXPECTED)


# --- model file formats ----------------------------------------------------------------------

ALL_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"]
ALL_DTYPES += ["float16", "float32", "float64"]


def varied_tensors() -> dict[str, np.ndarray]:
    """One tensor of every accepted dtype, plus a scalar, an empty tensor and awkward names."""
    rng = np.random.default_rng(3)
    tensors = {f"layer.{dtype}": (rng.standard_normal((3, 5)) * 50).astype(dtype) for dtype in ALL_DTYPES}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    tensors["file"] = np.arange(4, dtype=np.int64)  # np.savez's parameter names must work as tensor names
    tensors["allow_pickle"] = np.arange(2, dtype=np.int8)
    return tensors


def assert_same_tensors(loaded: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> None:
    """Same names, dtypes, shapes and values (order aside)."""
    assert sorted(loaded) == sorted(original)
    for name, array in original.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_round_trip_keeps_every_dtype_and_shape(fmt: Any) -> None:
    """dump_tensors then load_tensors gives back the same tensors, and the format is detected."""
    tensors = varied_tensors()
    data = dump_tensors(tensors, fmt)
    assert detect_format(data) == fmt
    assert_same_tensors(load_tensors(data), tensors)


def test_the_format_comes_from_the_content_not_the_file_name(tmp_path: Path) -> None:
    """A safetensors file named .pt and an .npz named .safetensors are read as what they are."""
    tensors = model(1.5)
    misnamed = {
        "model.pt": dump_tensors(tensors, "safetensors"),
        "model.safetensors": dump_tensors(tensors, "npz"),
    }
    for name, data in misnamed.items():
        (tmp_path / name).write_bytes(data)
        assert_same_tensors(load_tensors(tmp_path / name), tensors)
        assert_same_tensors(load_tensors(str(tmp_path / name)), tensors)
    assert detect_format(misnamed["model.pt"]) == "safetensors"


def test_safetensors_arrays_are_read_only_views_of_the_file() -> None:
    """The file is held in memory once: tensors are not copied out of it."""
    data = dump_tensors(model(1), "safetensors")
    whole = np.frombuffer(data, dtype=np.uint8)
    for array in load_tensors(data).values():
        assert np.shares_memory(array, whole)
        assert not array.flags.writeable


def test_files_written_by_the_safetensors_library_are_read_and_ours_are_its() -> None:
    """Our reader and the library agree: metadata is ignored, our writer's output loads in the library."""
    tensors = varied_tensors()
    written_by_library = safetensors.numpy.save(tensors, metadata={"format": "np", "epoch": "3"})
    assert_same_tensors(load_tensors(written_by_library), tensors)
    assert_same_tensors(safetensors.numpy.load(dump_tensors(tensors)), tensors)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_files_written_by_numpy_are_read(save: Any) -> None:
    """np.savez and np.savez_compressed output, Fortran order and big-endian arrays included."""
    tensors = {
        "w": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "flags": np.array([True, False, True]),
    }
    buffer = io.BytesIO()
    save(buffer, **tensors)
    loaded = load_tensors(buffer.getvalue())
    assert_same_tensors(loaded, {**tensors, "big_endian": tensors["big_endian"].astype("<i4")})
    assert loaded["big_endian"].dtype.isnative


def test_a_pickled_object_array_inside_an_npz_is_refused_unread() -> None:
    """An object array (saved with allow_pickle=True) is refused from its header; nothing is unpickled."""
    data = zip_bytes({"weights.npy": npy_bytes(np.array([Trap(), 1], dtype=object), allow_pickle=True)})
    refused(data, "'weights' holds pickled Python objects")


def test_an_npz_from_savez_with_an_object_array_is_refused() -> None:
    """np.savez pickles object arrays by default; such a file is refused, its good arrays too."""
    buffer = io.BytesIO()
    np.savez(buffer, good=np.ones(3), bad=np.array([Trap()], dtype=object))
    refused(buffer.getvalue(), "'bad' holds pickled Python objects")


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Trap()),
        pickle.dumps({"fc.weight": Trap()}, protocol=2),
        pickle.dumps([1, 2, 3], protocol=5),
    ],
)
def test_pickles_are_refused(payload: bytes) -> None:
    """A pickle (a whole module saved the legacy way, a pickled dict) is never loaded."""
    refused(payload, "a Python pickle, and pickles are never loaded")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\x00" * 64,
        bytes(range(256)) * 4,
        b'{"fc.weight": [1, 2, 3]}',
        npy_bytes(np.ones(3)),  # a lone .npy is not an .npz
        b"\x10\x00\x00\x00\x00\x00\x00\x00{",  # header longer than the file
        (10**12).to_bytes(8, "little") + b'{"a": 1}',
    ],
)
def test_garbage_is_refused(payload: bytes) -> None:
    """Anything that is not an accepted format is refused with the named error."""
    refused(payload)


def test_an_empty_file_is_refused_as_empty() -> None:
    """The reason says what is wrong."""
    refused(b"", "the file is empty")


def test_a_model_without_tensors_is_refused() -> None:
    """An empty safetensors file or an empty .npz is not a model."""
    refused(safetensors.numpy.save({}), "holds no tensors")
    refused(zip_bytes({}), "holds no tensors")


def test_a_zip_that_is_neither_npz_nor_torch_is_refused() -> None:
    """Other zip archives are refused without being unpacked."""
    refused(zip_bytes({"readme.txt": b"hello", "w.npy": npy_bytes(np.ones(2))}), "neither a NumPy .npz")


def test_a_damaged_zip_is_refused() -> None:
    """A zip whose central directory is cut off."""
    data = dump_tensors(model(1), "npz")
    refused(data[: len(data) // 2], "damaged")


@pytest.mark.parametrize(
    "members",
    [
        ["archive/data.pkl", "archive/constants.pkl", "archive/code/__torch__/net.py"],
        ["data.pkl", "code/__torch__/net.py"],
        ["net/data.pkl", "net/constants.pkl"],
    ],
)
def test_a_torchscript_archive_is_refused_from_its_member_names(members: list[str]) -> None:
    """TorchScript holds code; it is refused from its member names, nothing unpickled."""
    error = refused(zip_bytes({name: pickle.dumps(Trap()) for name in members}), "TorchScript archive")
    assert "torch.save(model.state_dict(), f)" in error.reason


def test_a_pytorch_zip_pickling_another_object_is_refused_without_unpickling_it() -> None:
    """data.pkl naming any global but tensors' is refused by name; PyTorch state dicts are always accepted."""
    data = zip_bytes({"archive/data.pkl": pickle.dumps(Trap(), protocol=2), "archive/version": b"3\n"})
    error = refused(data)
    assert "tests.test_weights.spring" in error.reason and "torch.save(model.state_dict(), f)" in error.reason
    assert "PyTorch state dict" in error.detail.split("Accepted formats:")[1]


@pytest.mark.parametrize(
    "array", [np.ones(2, np.complex64), np.array(["a"]), np.zeros(2, "f4,i4"), np.ones(2, np.longdouble)]
)
def test_npz_dtypes_outside_the_accepted_ones_are_refused(array: np.ndarray) -> None:
    """Complex, text, structured and extended-precision arrays are not model weights."""
    refused(zip_bytes({"t.npy": npy_bytes(array)}), "'t' has dtype", "accepted dtypes: bool, int8-64")


def test_safetensors_dtypes_outside_the_accepted_ones_are_refused() -> None:
    """bfloat16 and float8 have no NumPy dtype."""
    for code in ("BF16", "F8_E4M3"):
        header = {"t": {"dtype": code, "shape": [2], "data_offsets": [0, 4 if code == "BF16" else 2]}}
        body = b"\x00" * (4 if code == "BF16" else 2)
        assert safetensors.deserialize(safetensors_bytes(header, body))  # the library reads it
        refused(safetensors_bytes(header, body), f"'t' has dtype {code}")


def test_an_npz_that_unpacks_too_large_is_refused_before_unpacking() -> None:
    """A compressed .npz of zeros is small on the wire; its unpacked size is checked first."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, zeros=np.zeros(2**20, dtype=np.float64))
    data = buffer.getvalue()
    assert len(data) < 2**14
    with pytest.raises(UnsupportedModelFormat, match="unpacks to 8388"):
        load_tensors(data, max_tensor_bytes=2**20)
    assert load_tensors(data)["zeros"].shape == (2**20,)


def test_an_npy_header_promising_more_data_than_it_has_is_refused_without_allocating() -> None:
    """A header claiming a terabyte array is checked against the member's size first."""
    liar = io.BytesIO()
    npy.write_array_header_1_0(liar, {"descr": "<f8", "fortran_order": False, "shape": (2**37,)})
    liar.write(b"\x00" * 32)
    refused(zip_bytes({"t.npy": liar.getvalue()}), "the size of 't' does not match its shape")


@pytest.mark.parametrize(
    ("header", "body", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4, "do not fill"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 12, "do not fill"),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\x00" * 8,
            "does not match its shape",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\x00" * 12,
            "overlap or leave gaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8, "overlap or leave gaps"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4, "bad header entry"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\x00" * 4, "bad header entry"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\x00" * 4, "bad header entry"),
        ({"a": [1, 2]}, b"", "bad header entry"),
        ({"__metadata__": {"epoch": 3}}, b"", "__metadata__"),
    ],
)
def test_damaged_safetensors_files_are_refused(header: dict[str, Any], body: bytes, why: str) -> None:
    """The layout rules of the safetensors library: contiguous data filling the file, sizes matching."""
    data = safetensors_bytes(header, body)
    with pytest.raises(safetensors.SafetensorError):  # the library refuses it too
        safetensors.deserialize(data)
    refused(data, why)


def test_safetensors_header_oddities_are_refused() -> None:
    """Duplicate names, a non-object header and a UTF-16 header."""
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    duplicate = f'{{"a": {entry}, "a": {entry}}}'.encode()
    refused(len(duplicate).to_bytes(8, "little") + duplicate + b"\x00", "appears twice")
    utf16 = f'{{"a": {entry}}}'.encode("utf-16-le")
    refused(len(utf16).to_bytes(8, "little") + utf16 + b"\x00")
    listing = b'{"a": 1}'
    refused(len(listing).to_bytes(8, "little") + listing, "bad header entry")


VALID = safetensors.numpy.save(
    {
        "layer.w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2], np.int64),
        "m": np.ones(2, bool),
    },
    metadata={"k": "v"},
)
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, HEADER_END - 1), st.sampled_from(list(b'{}[]",:0123456789 -.eFIUBOL_\\\x00\xff'))
        ),
        min_size=1,
        max_size=3,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
)
def test_safetensors_reader_agrees_with_the_library_on_damaged_files(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    """Differential check: a mutated file is read by us exactly when the library reads it, to the same tensors."""
    data = bytearray(VALID)
    for position, byte in edits:
        data[position] = byte
    damaged = bytes(data[:cut] if cut is not None else data)
    try:
        expected = {name: bytes(info["data"]) for name, info in safetensors.deserialize(damaged)}
    except safetensors.SafetensorError:
        expected = None
    try:
        actual = {name: array.tobytes() for name, array in load_tensors(damaged).items()}
    except UnsupportedModelFormat:
        actual = None
    if expected == {}:
        assert actual is None  # we refuse models without tensors
    else:
        assert actual == expected


# --- PyTorch state dicts, read and written without torch (more in test_torch_files.py) -----------

TORCH_FIXTURES = Path(__file__).parent / "fixtures" / "torch"


def test_a_pytorch_state_dict_round_trips() -> None:
    """A state dict written by torch.save is read in module order; dump_tensors writes one."""
    data = (TORCH_FIXTURES / "state_dict_mixed.pt").read_bytes()
    assert detect_format(data) == "torch"
    loaded = load_tensors(data)
    assert list(loaded) == ["fc.weight", "fc.bias", "out.weight", "out.bias", "bn.num_batches_tracked"]
    assert loaded["bn.num_batches_tracked"].dtype == np.int64 and loaded["bn.num_batches_tracked"] == 7
    assert read_signature(data) == ("torch", signature_of(loaded))
    tensors = varied_tensors()
    written = dump_tensors(tensors, "torch")
    assert detect_format(written) == "torch"
    assert_same_tensors(load_tensors(written), tensors)


def test_a_whole_pytorch_module_is_refused() -> None:
    """torch.save(module) pickles the class; it is refused by name, nothing built."""
    error = refused((TORCH_FIXTURES / "module.pt").read_bytes(), "whole pickled model")
    assert "torch.save(model.state_dict(), f)" in error.reason


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ({"model": {"w": 1.0}, "epoch": 3}, "'model' holds a mapping, not a tensor"),
        ([1.0], "holds a list, not a flat state dict"),
        ({"epoch": 3}, "'epoch' holds a value of type int, not a tensor"),
    ],
)
def test_pytorch_files_that_are_not_flat_state_dicts_are_refused(content: Any, why: str) -> None:
    """A checkpoint nesting the state dict, a list, a number: not a mapping of name to tensor."""
    data = zip_bytes({"archive/data.pkl": pickle.dumps(content, protocol=2), "archive/version": b"3\n"})
    error = refused(data, why)
    assert "torch.save(model.state_dict(), f)" in error.reason


def test_bfloat16_pytorch_tensors_are_accepted_and_kept() -> None:
    """bfloat16, which NumPy lacks, is read without widening and named so in the signature."""
    tensors = {"w": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)}
    loaded = load_tensors(dump_tensors(tensors, "torch"))
    assert signature_of(loaded) == {"w": TensorSpec((2,), "bfloat16")}
    assert loaded["w"].tobytes() == tensors["w"].tobytes()


def test_a_real_torchscript_archive_is_refused() -> None:
    """torch.jit.save output is refused from its member names."""
    refused((TORCH_FIXTURES / "script.pt").read_bytes(), "TorchScript archive")


# --- derangements ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 101])
def test_derangements_are_permutations_without_fixed_points(n: int) -> None:
    """Over many seeds, every result is a permutation of range(n) and no one gets their own model."""
    for seed in range(300):
        permutation = derangement(n, random.Random(seed))
        assert sorted(permutation) == list(range(n))
        assert all(target != index for index, target in enumerate(permutation))


def test_derangements_are_uniform() -> None:
    """All 9 derangements of 4 elements come up equally often (seeded, so deterministic)."""
    rng = random.Random(2024)
    counts = Counter(tuple(derangement(4, rng)) for _ in range(18_000))
    all_derangements = {p for p in itertools.permutations(range(4)) if all(t != i for i, t in enumerate(p))}
    assert set(counts) == all_derangements and len(all_derangements) == 9
    assert all(1_750 <= count <= 2_250 for count in counts.values()), counts


def test_two_participants_swap() -> None:
    """The only derangement of two."""
    assert derangement(2, random.SystemRandom()) == [1, 0]


@pytest.mark.parametrize("n", [1, 0, -3])
def test_fewer_than_two_participants_have_no_derangement(n: int) -> None:
    """One participant cannot be given another's model."""
    with pytest.raises(ValueError, match="at least 2"):
        derangement(n, random.Random(0))
