"""The engine's aggregation path: model files mapped into memory, the block-major weighted mean written
straight into a mapped result file, signatures read from headers."""

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.errors import InvalidInput
from fltraining.weights import FedAvgAccumulator, dump_tensors, load_tensors, signature_of
from fltraining.weights.aggregate import MEAN_BLOCK, mean_of_files, weighted_mean_into
from fltraining.weights.formats import UnsupportedModelFormat, read_signature, write_tensors

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

DTYPES = ["float32", "float64", "float16", "int8", "int32", "int64", "uint8", "bool"]


def streamed_mean(updates: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """The one-update-at-a-time accumulator's result, the reference."""
    accumulator = FedAvgAccumulator(signature_of(updates[0]))
    for update, weight in zip(updates, weights):
        accumulator.add(update, weight)
    return accumulator.result()


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """A few updates of one random signature (some tensors spanning several blocks) and their weights."""
    layout = draw(st.dictionaries(
        st.text("abcxyz.", min_size=1, max_size=6),
        st.tuples(st.sampled_from([(), (3,), (2, 5), (MEAN_BLOCK + 17,)]), st.sampled_from(DTYPES)),
        min_size=1, max_size=4))
    count = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(count):
        update = {}
        for name, (shape, dtype) in layout.items():
            if dtype == "bool":
                update[name] = rng.random(shape) < 0.5
            elif dtype.startswith(("int", "uint")):
                info = np.iinfo(dtype)
                update[name] = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
            else:
                update[name] = (rng.standard_normal(shape) * 100).astype(dtype)
        updates.append(update)
    weights = draw(st.lists(st.integers(1, 2**30), min_size=count, max_size=count))
    return updates, weights


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_block_major_mean_equals_the_streaming_accumulator_bit_for_bit(
        case: tuple[list[dict[str, np.ndarray]], list[int]]) -> None:
    updates, weights = case
    expected = streamed_mean(updates, weights)
    out = {name: np.empty_like(array) for name, array in updates[0].items()}
    weighted_mean_into(updates, weights, signature_of(updates[0]), out)
    with tempfile.TemporaryDirectory() as folder:  # and the engine's way: files in, a file out
        paths = [Path(folder) / f"u{index}" for index in range(len(updates))]
        for path, update in zip(paths, updates):
            write_tensors(path, update)
        mean_of_files(paths, weights, signature_of(updates[0]), "safetensors", Path(folder) / "mean")
        from_file = {name: np.array(array) for name, array in load_tensors(Path(folder) / "mean").items()}
    for name, array in expected.items():
        for got in (out[name], from_file[name]):
            assert got.dtype == array.dtype and got.shape == array.shape
            assert got.tobytes() == array.tobytes(), name


def model(fill: float) -> dict[str, np.ndarray]:
    """DLR's test model: two float32 tensors, all `fill`."""
    return {"conv.weight": np.full((4, 3), fill, np.float32), "conv.bias": np.full(4, fill, np.float32)}


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_dlr_cases_from_mapped_files(tmp_path: Path, fmt: str) -> None:
    """DLR's 4.5 (ten equal weights, values 0–9) and 5/3 (values 1, 2 with sizes 1, 2), through files."""
    paths = []
    for value in range(10):
        paths.append(tmp_path / f"u{value}")
        write_tensors(paths[-1], model(value), fmt)  # type: ignore[arg-type]
    out = tmp_path / "mean"
    mean_of_files(paths, [1] * 10, signature_of(model(0)), fmt, out)  # type: ignore[arg-type]
    assert read_signature(out) == (fmt, signature_of(model(0)))
    assert all(np.all(array == 4.5) for array in load_tensors(out).values())
    out.unlink()
    mean_of_files(paths[1:3], [1, 2], signature_of(model(0)), fmt, out)  # type: ignore[arg-type]
    assert all(np.all(array == np.float32(5 / 3)) for array in load_tensors(out).values())


def test_the_mapped_result_is_a_safetensors_file_the_library_reads(tmp_path: Path) -> None:
    tensors = {"big": np.arange(10, dtype=np.float64), "small": np.arange(3, dtype=np.int8), "flag": np.array(True)}
    paths = [tmp_path / "a", tmp_path / "b"]
    for path in paths:
        write_tensors(path, tensors)
    mean_of_files(paths, [2, 5], signature_of(tensors), "safetensors", tmp_path / "out")
    read = safetensors.numpy.load_file(tmp_path / "out")
    assert {name: array.tolist() for name, array in read.items()} == {
        name: array.tolist() for name, array in tensors.items()}


def test_a_mismatching_update_file_is_named(tmp_path: Path) -> None:
    write_tensors(tmp_path / "good", model(1))
    write_tensors(tmp_path / "bad", {"conv.weight": np.ones((4, 4), np.float32), "conv.bias": np.ones(4, np.float32)})
    with pytest.raises(InvalidInput) as caught:
        mean_of_files([tmp_path / "good", tmp_path / "bad"], [1, 1], signature_of(model(0)), "safetensors",
                      tmp_path / "out")
    assert caught.value.errors is not None and caught.value.errors[0]["type"] == "tensor_shape"


def test_files_are_mapped_not_read(tmp_path: Path) -> None:
    """Safetensors tensors and uncompressed .npz members are views of the mapped file (zero copy)."""
    for fmt in ("safetensors", "npz"):
        path = tmp_path / f"m.{fmt}"
        write_tensors(path, model(3), fmt)  # type: ignore[arg-type]
        for array in load_tensors(path).values():
            base = array
            while not isinstance(base, np.memmap) and isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            assert not array.flags.owndata
            assert isinstance(base, np.memmap) or isinstance(getattr(base, "obj", None), np.memmap), fmt


def test_signature_of_a_compressed_npz_checks_its_data(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=np.ones((3, 2), np.float32))
    assert read_signature(path)[1]["w"].shape == (3, 2)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    start = info.header_offset
    begin = start + 30 + int.from_bytes(raw[start + 26 : start + 28], "little") + int.from_bytes(
        raw[start + 28 : start + 30], "little")
    raw[begin + info.compress_size // 2] ^= 0xFF  # damage the deflated data
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedModelFormat):
        read_signature(path)


def test_signature_of_a_stored_npz_checks_its_crc(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(dump_tensors({"w": np.arange(64, dtype=np.float32)}, "npz"))
    raw = bytearray(path.read_bytes())
    raw[-200] ^= 0xFF  # a byte of the tensor data, before the central directory
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedModelFormat) as caught:
        read_signature(path)
    assert "CRC" in caught.value.detail or "damaged" in caught.value.detail


def test_bfloat16_pytorch_state_dicts_are_averaged_in_their_own_format(tmp_path: Path) -> None:
    """PyTorch models may hold bfloat16 tensors (read with ml_dtypes, summed in float64, written back)."""
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    paths = []
    for index, values in enumerate(([1.0, 2.0], [4.0, 8.0])):
        paths.append(tmp_path / f"u{index}.pt")
        paths[-1].write_bytes(dump_tensors({"w": np.array(values, bfloat16)}, "torch"))
    signature = signature_of(load_tensors(paths[0]))
    assert signature["w"].dtype == "bfloat16"
    mean_of_files(paths, [1, 1], signature, "torch", tmp_path / "mean.pt")
    result = load_tensors(tmp_path / "mean.pt")["w"]
    assert result.dtype == bfloat16 and result.astype(np.float32).tolist() == [2.5, 5.0]
