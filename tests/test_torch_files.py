"""PyTorch state dicts without torch: files torch wrote, the restricted reader's refusals, the writer's
layout, and (when torch is importable) a cross-check against real torch.save and torch.load."""

import io
import math
import os
import pickle
import pickletools
import struct
import subprocess
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fltraining.errors import InvalidInput
from fltraining.weights import (
    UnsupportedModelFormat,
    detect_format,
    dump_tensors,
    load_tensors,
    signature_of,
    torch_files,
)
from fltraining.weights.formats import read_signature
from fltraining.weights.torch_files import BFLOAT16, DTYPES, read_state_dict, write_state_dict

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

try:
    import torch
except ImportError:
    torch = None

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
# The opcodes torch.load(weights_only=True) implements (torch/_weights_only_unpickler.py).
WEIGHTS_ONLY_OPCODES = {
    "PROTO", "STOP", "GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "BINPERSID", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "APPEND", "APPENDS",
    "SETITEM", "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1",
    "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
}
# What torch.manual_seed(0) gives Linear(3, 4) and Linear(4, 2) (reproduced with torch's seeded init).
FC_BIAS = [-0.55157071352005, -0.3823687434196472, -0.2379971146583557, 0.021387115120887756]
OUT_BIAS = [-0.08059167861938477, 0.05290704965591431]


def fixture(name: str) -> bytes:
    """A file written by real torch (see fixtures/torch/README.md)."""
    return (FIXTURES / name).read_bytes()


def refused(data: bytes, *words: str, max_tensor_bytes: int | None = None) -> UnsupportedModelFormat:
    """Assert the file is refused with a 400 whose reason holds the given words."""
    with pytest.raises(UnsupportedModelFormat) as caught:
        if max_tensor_bytes is None:
            load_tensors(data)
        else:
            load_tensors(data, max_tensor_bytes=max_tensor_bytes)
    error = caught.value
    assert isinstance(error, InvalidInput) and error.status == 400
    for word in words:
        assert word in error.reason, error.reason
    return error


def same(loaded: np.ndarray, original: np.ndarray) -> bool:
    """Same dtype, shape and bytes (bitwise, so NaNs compare equal)."""
    return (
        loaded.dtype == original.dtype and loaded.shape == original.shape
        and np.ascontiguousarray(loaded).tobytes() == np.ascontiguousarray(original).tobytes()
    )


# --- torch-like pickles, written without torch ------------------------------------------------


class Global:
    """A global pickled by name, whatever module it names (nothing is imported)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:
        """Never called: pickle only checks that a reduced function is callable."""
        raise AssertionError("not to be called")


class Call:
    """A call of a global, pickled as GLOBAL, the arguments, REDUCE (and SETITEMS for `items`)."""

    def __init__(self, function: Global, *args: object, items: Mapping[str, object] | None = None) -> None:
        self.function, self.args, self.items = function, args, items or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, self.args, None, None, iter(self.items.items()))


class Storage:
    """A storage, pickled as torch pickles one: a persistent id."""

    def __init__(
        self, key: str, storage_class: str = "FloatStorage", numel: int = 6, module: str = "torch"
    ) -> None:
        self.pid = ("storage", Global(module, storage_class), key, "cpu", numel)


class TorchLikePickler(pickle._Pickler):  # the pure-Python pickler: its `save` can be overridden
    """Python's own pickler, writing Globals by name and Storages as persistent ids."""

    def persistent_id(self, obj: Any) -> Any:
        """Storages are persistent ids."""
        return obj.pid if isinstance(obj, Storage) else None

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        """Globals by name; everything else as pickle saves it."""
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
            return
        super().save(obj, save_persistent_id)  # type: ignore[misc]


ORDERED_DICT = Global("collections", "OrderedDict")
REBUILD = Global("torch._utils", "_rebuild_tensor_v2")
FLOATS = np.arange(6, dtype="<f4")


def torch_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as torch.save writes data.pkl."""
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def tensor(
    key: str = "0", shape: tuple[int, ...] = (2, 3), stride: tuple[int, ...] | None = None, offset: int = 0,
    storage: Storage | None = None, metadata: object = None, hooks: object = None,
) -> Call:
    """A `_rebuild_tensor_v2` call as torch pickles a tensor (contiguous unless given a stride)."""
    args: tuple[object, ...] = (
        storage or Storage(key), offset, shape, stride or torch_files._contiguous_strides(shape), False,
        hooks if hooks is not None else Call(ORDERED_DICT),
    )
    return Call(REBUILD, *args, *([metadata] if metadata is not None else []))


def torch_zip(
    pickled: bytes, storages: dict[str, bytes] | None = None, *, byteorder: bytes | None = b"little",
    compression: int = zipfile.ZIP_STORED, folder: str = "archive",
) -> bytes:
    """A torch.save archive around a data.pkl and its storages (in zipfile's layout: the reader needs
    no other)."""
    prefix = f"{folder}/" if folder else ""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{prefix}data.pkl", pickled, compress_type=compression)
        if byteorder is not None:
            archive.writestr(f"{prefix}byteorder", byteorder)
        for key, content in (storages if storages is not None else {"0": FLOATS.tobytes()}).items():
            archive.writestr(f"{prefix}data/{key}", content, compress_type=compression)
        archive.writestr(f"{prefix}version", b"3\n")
    return buffer.getvalue()


# --- files written by torch ---------------------------------------------------------------------


def test_a_state_dict_saved_by_torch_is_read_with_its_names_shapes_dtypes_and_values() -> None:
    """torch.save(model.state_dict(), f) of Linear(3, 4) then Linear(4, 2), in module order."""
    data = fixture("state_dict.pt")
    assert detect_format(data) == "torch"
    tensors = load_tensors(data)
    assert {name: (array.shape, array.dtype.name) for name, array in tensors.items()} == {
        "fc.weight": ((4, 3), "float32"),
        "fc.bias": ((4,), "float32"),
        "out.weight": ((2, 4), "float32"),
        "out.bias": ((2,), "float32"),
    }
    assert list(tensors) == ["fc.weight", "fc.bias", "out.weight", "out.bias"]
    np.testing.assert_array_equal(tensors["fc.bias"], np.array(FC_BIAS, np.float32))
    np.testing.assert_array_equal(tensors["out.bias"], np.array(OUT_BIAS, np.float32))
    # Linear's init draws every value from ±1/sqrt(in_features).
    assert np.all(np.abs(tensors["fc.weight"]) <= 1 / math.sqrt(3))
    assert np.all(np.abs(tensors["out.weight"]) <= 1 / math.sqrt(4))
    whole = np.frombuffer(data, dtype=np.uint8)
    for array in tensors.values():
        assert np.shares_memory(array, whole) and not array.flags.writeable


def test_a_state_dict_with_a_counter_keeps_it_as_a_0d_int64() -> None:
    """BatchNorm's num_batches_tracked is a 0-d int64 tensor (a LongStorage)."""
    tensors = load_tensors(fixture("state_dict_mixed.pt"))
    counter = tensors["bn.num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64 and counter == 7
    np.testing.assert_array_equal(tensors["fc.bias"], np.array(FC_BIAS, np.float32))


def test_a_whole_pickled_module_is_refused_saying_what_to_send() -> None:
    """torch.save(model, f) pickles the model's class: refused before anything is built."""
    data = fixture("module.pt")
    assert detect_format(data) == "torch"
    refused(data, "__main__.M", "whole pickled model", "torch.save(model.state_dict(), f)", "safetensors")


def test_a_torchscript_archive_is_refused_saying_what_to_send() -> None:
    """torch.jit.save output holds code: refused from its member names."""
    error = refused(fixture("script.pt"), "TorchScript", "torch.save(model.state_dict(), f)", "safetensors")
    with pytest.raises(UnsupportedModelFormat) as caught:
        detect_format(fixture("script.pt"))
    assert caught.value.reason == error.reason


def test_a_file_on_disk_is_mapped_and_its_tensors_are_views_of_the_map(tmp_path: Path) -> None:
    """load_tensors and read_signature of a path: the file is mapped, never read whole."""
    path = tmp_path / "model.pt"
    path.write_bytes(fixture("state_dict_mixed.pt"))
    fmt, signature = read_signature(path)
    assert fmt == "torch" and signature == signature_of(load_tensors(fixture("state_dict_mixed.pt")))
    for array in load_tensors(path).values():
        base: Any = array
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, np.memmap)


# --- writing, and reading what is written -------------------------------------------------------


def random_array(dtype: np.dtype[Any], shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """An array of `dtype` filled from random bytes (bools from random 0s and 1s)."""
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    raw = rng.integers(0, 256, math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3, 4)])
def test_every_dtype_and_shape_round_trips(dtype: str, shape: tuple[int, ...]) -> None:
    """write_state_dict then read_state_dict gives back the same dtype, shape and bytes."""
    array = random_array(DTYPES[dtype], shape)
    loaded = read_state_dict(write_state_dict({"t": array}))
    assert list(loaded) == ["t"] and same(loaded["t"], array)


def test_bfloat16_is_kept_as_bfloat16_and_named_so_in_signatures() -> None:
    """No widening: the bytes stay bfloat16 and the signature says so; values convert exactly."""
    array = np.array([1.5, -2.0, 3.25, 1e-3], dtype=BFLOAT16)
    loaded = load_tensors(dump_tensors({"w": array}, "torch"))
    assert loaded["w"].dtype == BFLOAT16 and signature_of(loaded)["w"].dtype == "bfloat16"
    np.testing.assert_array_equal(loaded["w"].astype(np.float64), array.astype(np.float64))


def test_non_contiguous_and_big_endian_arrays_are_written_contiguous_little_endian() -> None:
    """Transposed, strided, Fortran-ordered and big-endian inputs: stored in C order, little-endian."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "fortran": np.asfortranarray(base),
        "big_endian": np.arange(5, dtype=">i4"),
    }
    data = write_state_dict(tensors)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for key, array in enumerate(tensors.values()):
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            assert archive.read(f"archive/data/{key}") == little.tobytes()
    loaded = read_state_dict(data)
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype.isnative and loaded[name].flags.c_contiguous


def test_names_with_dots_slashes_and_unicode_round_trip_in_order() -> None:
    """Names are text: any Unicode, in the order given."""
    names = ["layer.0.weight", "ünïcode.名前", "with/slash", "with space", "", "z" * 300]
    tensors = {name: np.full(2, index, np.int64) for index, name in enumerate(names)}
    loaded = read_state_dict(write_state_dict(tensors))
    assert list(loaded) == names
    for name in names:
        np.testing.assert_array_equal(loaded[name], tensors[name])


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Small state dicts of every accepted dtype, with random bytes (bools 0 or 1) and any text names."""
    names = draw(st.lists(st.text(max_size=12), min_size=1, max_size=4, unique=True))
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        count = math.prod(shape)
        if dtype == np.bool_:
            raw = bytes(draw(st.lists(st.integers(0, 1), min_size=count, max_size=count)))
        else:
            raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return tensors


@settings(max_examples=150, deadline=None)
@given(tensors=state_dicts())
def test_any_state_dict_round_trips(tensors: dict[str, np.ndarray]) -> None:
    """What the writer writes, the reader reads back identically, in order."""
    loaded = read_state_dict(write_state_dict(tensors))
    assert list(loaded) == list(tensors)
    assert all(same(loaded[name], array) for name, array in tensors.items())


def data_offsets(data: bytes) -> dict[str, int]:
    """Where each member's bytes start in the file, from its local header."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offsets = {}
        for info in archive.infolist():
            start = info.header_offset
            name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])
            offsets[info.filename] = start + 30 + name_length + extra_length
        return offsets


def test_the_writer_lays_the_archive_out_as_torch_save_does() -> None:
    """The records torch.save writes, in its order, stored, CRCs right, each aligned to 64 bytes."""
    tensors = {
        "fc.weight": np.ones((4, 3), np.float32),
        "steps": np.array(7),
        "counts": np.arange(3, dtype=np.uint32),
    }
    data = write_state_dict(tensors)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == [
            "archive/data.pkl", "archive/.format_version", "archive/.storage_alignment", "archive/byteorder",
            "archive/data/0", "archive/data/1", "archive/data/2", "archive/version",
        ]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        assert archive.testzip() is None
        assert archive.read("archive/byteorder") == b"little"
        assert archive.read("archive/version") == b"3\n"
        assert archive.read("archive/.format_version") == b"1"
        assert archive.read("archive/.storage_alignment") == b"64"
        pickled = archive.read("archive/data.pkl")
    assert all(offset % 64 == 0 for offset in data_offsets(data).values())
    opcodes = list(pickletools.genops(pickled))
    assert opcodes[0][0].name == "PROTO" and opcodes[0][1] == 2
    assert {opcode.name for opcode, _, _ in opcodes} <= WEIGHTS_ONLY_OPCODES
    assert {argument for opcode, argument, _ in opcodes if opcode.name == "GLOBAL"} == {
        "collections OrderedDict", "torch FloatStorage", "torch LongStorage", "torch uint32",
        "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3", "torch.storage UntypedStorage",
    }


def offsets_as_torch_computes_them(data: bytes, count: int) -> Iterator[tuple[str, int]]:
    """Where torch.load(mmap=True) puts each storage's bytes when `.format_version` is 1 (serialization.py's
    `_get_offset`): from data/0's header only, then one record after the other, each followed by a
    16-byte data descriptor and padded by `getPadding` (inline_container.cc)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        folder = archive.namelist()[0].partition("/")[0]
        sizes = [archive.getinfo(f"{folder}/data/{key}").file_size for key in range(count)]
    cursor = None
    for key, size in enumerate(sizes):
        name = f"{folder}/data/{key}"
        if cursor is None:
            start = data_offsets(data)[name]
        else:
            unpadded = cursor + 30 + len(name) + 4
            start = unpadded + -unpadded % 64
        yield name, start
        cursor = start + size + (16 if size else 0)


@pytest.mark.parametrize("source", ["writer", "state_dict.pt", "state_dict_mixed.pt"])
def test_storage_offsets_follow_from_the_layout_as_torch_mmap_expects(source: str) -> None:
    """torch may compute storage offsets without reading headers; our layout gives the same offsets
    (checked on torch's own files too, to show the computation is torch's)."""
    if source == "writer":
        tensors = {f"t{index}": np.ones(index * 7, np.float32) for index in range(6)}
        data = write_state_dict(tensors)
    else:
        data = fixture(source)
        tensors = load_tensors(data)
    actual = data_offsets(data)
    for name, start in offsets_as_torch_computes_them(data, len(tensors)):
        assert actual[name] == start, name


def test_zip64_records_are_written_as_miniz_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 4 GiB sizes and offsets move to zip64 fields; with the limit lowered the same code runs on
    a small file, which zipfile and the reader still read, its data still aligned."""
    monkeypatch.setattr(torch_files, "ZIP64_LIMIT", 300)
    tensors: dict[str, np.ndarray] = {
        "small": np.arange(3, dtype=np.int16), "large": np.arange(100, dtype=np.float64), "after": np.ones(2),
    }
    data = write_state_dict(tensors)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        large = archive.getinfo("archive/data/1")
        assert large.file_size == 800 and large.extra[:2] == b"\x01\x00"
        assert archive.getinfo("archive/data/2").header_offset > 300
    assert all(offset % 64 == 0 for offset in data_offsets(data).values())
    loaded = read_state_dict(data)
    assert all(same(loaded[name], array) for name, array in tensors.items())


def test_a_compressed_archive_is_still_read_and_copied() -> None:
    """torch never compresses, but a re-zipped file with deflated records is read (those are copies)."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = torch_zip(torch_pickle({"w": tensor()}), {"0": array.tobytes()}, compression=zipfile.ZIP_DEFLATED)
    loaded = load_tensors(data)
    np.testing.assert_array_equal(loaded["w"], array)
    assert not np.shares_memory(loaded["w"], np.frombuffer(data, np.uint8))


def test_a_big_endian_file_is_read_into_native_arrays() -> None:
    """torch.save on a big-endian machine records byteorder `big`; values come out right."""
    values = np.array([1.5, -2.0, 3.25], dtype=BFLOAT16)
    state = {"f": tensor(), "b": tensor("1", (3,), storage=Storage("1", "BFloat16Storage", 3))}
    storages = {"0": FLOATS.astype(">f4").tobytes(), "1": values.byteswap().tobytes()}
    loaded = load_tensors(torch_zip(torch_pickle(state), storages, byteorder=b"big"))
    np.testing.assert_array_equal(loaded["f"], FLOATS.reshape(2, 3))
    assert loaded["b"].dtype == BFLOAT16 and loaded["b"].dtype.isnative
    np.testing.assert_array_equal(loaded["b"].astype(np.float64), values.astype(np.float64))
    little = load_tensors(torch_zip(torch_pickle({"f": tensor()}), byteorder=None))  # no record: little
    np.testing.assert_array_equal(little["f"], FLOATS.reshape(2, 3))
    refused(torch_zip(torch_pickle({"f": tensor()}), byteorder=b"middle"), "byteorder")


def test_views_strides_parameters_and_shared_storages_are_rebuilt() -> None:
    """Slices, transposes and parameters over one shared storage, as torch saves views and parameters."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {
        "whole": tensor(shape=(4, 6), storage=Storage("0", numel=24)),
        "slice": tensor(shape=(2, 3), stride=(6, 2), offset=7, storage=Storage("0", numel=24)),
        "transposed": tensor(shape=(6, 4), stride=(1, 6), storage=Storage("0", numel=24)),
        "row_of_expanded": tensor(shape=(1, 6), stride=(0, 1), offset=6, storage=Storage("0", numel=24)),
        "parameter": Call(
            Global("torch._utils", "_rebuild_parameter"), tensor(shape=(6,), storage=Storage("0", numel=24)),
            True, Call(ORDERED_DICT),
        ),
    }
    loaded = load_tensors(torch_zip(torch_pickle(Call(ORDERED_DICT, items=state)), {"0": base.tobytes()}))
    np.testing.assert_array_equal(loaded["whole"], base)
    np.testing.assert_array_equal(loaded["slice"], base[1:3, 1::2])
    np.testing.assert_array_equal(loaded["transposed"], base.T)
    np.testing.assert_array_equal(loaded["row_of_expanded"], base[1:2])
    np.testing.assert_array_equal(loaded["parameter"], base[0])


# --- refusals -----------------------------------------------------------------------------------


class Evil:
    """Unpickling it would call `function(*args)`."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, self.args)


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (lambda marker: Evil(os.system, f"touch {marker}"), "posix.system"),
        # Protocol 2 writes Python 2's module names for builtins and subprocess.
        (lambda marker: Evil(eval, f"open({str(marker)!r}, 'w')"), "__builtin__.eval"),
        (lambda marker: Evil(subprocess.Popen, ["touch", str(marker)]), "commands.Popen"),
        (lambda marker: {"fc.weight": Evil(os.system, f"touch {marker}")}, "posix.system"),
        (lambda marker: Evil(getattr, "text", "upper"), "__builtin__.getattr"),
    ],
)
def test_a_pickle_calling_anything_else_is_refused_and_nothing_runs(
    tmp_path: Path, payload: Any, named: str
) -> None:
    """GLOBALs of os.system, eval, subprocess.Popen, getattr: refused by name, never imported nor called."""
    marker = tmp_path / "sprung"
    refused(torch_zip(pickle.dumps(payload(marker), protocol=2)), named, "torch.save(model.state_dict(), f)")
    assert not marker.exists()


def test_a_bare_global_of_eval_is_refused() -> None:
    """Even unused, a global outside the admitted ones is refused."""
    refused(torch_zip(torch_pickle({"f": Global("builtins", "eval")})), "builtins.eval")


def test_the_unpickler_itself_admits_no_other_global_whatever_opcode_names_it(tmp_path: Path) -> None:
    """Behind the opcode check, find_class refuses too: STACK_GLOBAL (protocol 4) and GLOBAL alike."""
    marker = tmp_path / "sprung"
    for protocol in (2, 4, 5):
        pickled = pickle.dumps(Evil(os.system, f"touch {marker}"), protocol=protocol)
        with pytest.raises(UnsupportedModelFormat, match="system"):
            torch_files._Unpickler(pickled, None, "<").load()  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"model": {"w": tensor()}, "epoch": 3}, "'model' holds a mapping, not a tensor"),
        ({"w": tensor(), "epoch": 3}, "'epoch' holds a value of type int, not a tensor"),
        ({"w": tensor(), "names": ["a"]}, "'names' holds a list, not a tensor"),
        ({1: tensor()}, "a key is a value of type int, not text"),
        ([tensor()], "holds a list, not a flat state dict"),
        (tensor(), "holds a tensor, not a flat state dict"),
        (None, "holds a value of type NoneType, not a flat state dict"),
    ],
)
def test_anything_but_a_flat_mapping_of_name_to_tensor_is_refused(state: object, why: str) -> None:
    """Checkpoints nesting the state dict, extra values, lists and bare tensors: not state dicts."""
    refused(torch_zip(torch_pickle(state)), why, "torch.save(model.state_dict(), f)")


def test_a_state_dict_without_tensors_is_refused() -> None:
    """An empty OrderedDict is a readable file but no model."""
    refused(write_state_dict({}), "holds no tensors")


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"w": tensor(offset=1)}, "reaches element 6 of a storage of 6"),
        ({"w": tensor(shape=(3, 3))}, "reaches element 8 of a storage of 6"),
        ({"w": tensor(shape=(2, 3), stride=(3, 2))}, "reaches element 7"),
        ({"w": tensor(offset=2**62)}, "reaches element"),
        ({"w": tensor(shape=(2, 3), stride=(-3, 1), offset=3)}, "negative stride"),
        ({"w": tensor(shape=(3, 2), stride=(1, 1))}, "overlap"),
        ({"w": tensor(shape=(4, 6), stride=(0, 1))}, "overlap"),
        ({"w": tensor(shape=(2, -3))}, "malformed"),
        ({"w": tensor(shape=(2, 3), stride=(3,))}, "malformed"),
        ({"w": tensor(shape=[2, 3])}, "malformed"),  # type: ignore[arg-type]
        ({"w": tensor(offset=True)}, "malformed"),
        ({"w": tensor(storage=Storage("0", numel=5))}, "holds 24 bytes, data.pkl says 20"),
        ({"w": tensor(storage=Storage("9"))}, "no record 'data/9'"),
        ({"w": tensor(), "v": tensor(storage=Storage("0", "IntStorage"))}, "named with two types"),
        ({"w": tensor(storage=Storage("0", "ComplexFloatStorage"))}, "torch.ComplexFloatStorage"),
        ({"w": tensor(storage=Storage("0", "Evil", module="os"))}, "os.Evil"),
        ({"w": tensor(metadata={"conj": True})}, "metadata"),
        ({"w": tensor(hooks={"1": 2})}, "backward hooks"),
        ({"w": Call(REBUILD, [1.0], 0, (1,), (1,), False, Call(ORDERED_DICT))}, "without a storage"),
    ],
)
def test_tensors_outside_their_storage_or_malformed_are_refused(state: object, why: str) -> None:
    """Offsets, sizes and strides are checked against the storage before any view is made."""
    refused(torch_zip(torch_pickle(state)), why)


def test_a_persistent_id_that_is_not_a_storage_is_refused() -> None:
    """Only ('storage', class, key, location, numel) ids exist."""

    class Other(Storage):
        def __init__(self) -> None:
            self.pid = ("module", Global("torch", "FloatStorage"), "0", "cpu", 6)

    refused(torch_zip(torch_pickle({"w": tensor(storage=Other())})), "not a storage")


def test_stand_ins_cannot_be_changed_by_build() -> None:
    """BUILD on an admitted global (setting its attributes or slots) fails, and later files still load."""
    tail = b"N}X\x08\x00\x00\x00functionK\x01s\x86b."  # (None, {'function': 1}) BUILD
    for module, name in [
        ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch", "FloatStorage")
    ]:
        pickled = b"\x80\x02c" + f"{module}\n{name}\n".encode() + tail
        refused(torch_zip(pickled), "damaged")
    not_a_dict_state = b"\x80\x02ccollections\nOrderedDict\n)R]b."  # OrderedDict() with a list as state
    refused(torch_zip(not_a_dict_state), "unknown state")
    assert list(load_tensors(fixture("state_dict.pt"))) == ["fc.weight", "fc.bias", "out.weight", "out.bias"]


def test_opcodes_a_state_dict_never_needs_and_memo_bombs_are_refused_before_unpickling() -> None:
    """Protocol 4 framing, NEWOBJ, and a LONG_BINPUT to index 2**31 (which sizes the memo) are refused."""
    refused(torch_zip(pickle.dumps({"w": 1}, protocol=4)), "opcode FRAME")
    refused(torch_zip(b"\x80\x02ccollections\nOrderedDict\n)\x81."), "opcode NEWOBJ")
    bomb = b"\x80\x02}r" + struct.pack("<I", 2**31) + b"."
    refused(torch_zip(bomb), "memo index 2147483648")


def test_sizes_are_bounded_before_anything_is_read() -> None:
    """The archive's unpacked size, then the tensors' total (tensors may alias one storage)."""
    refused(write_state_dict({"w": np.zeros(1000, np.float64)}), "unpacks to", max_tensor_bytes=4000)
    storage = np.zeros(1000, np.float32).tobytes()
    aliases = {f"alias{index}": tensor(shape=(1000,), storage=Storage("0", numel=1000)) for index in range(3)}
    data = torch_zip(torch_pickle(aliases), {"0": storage})
    refused(data, "the tensors hold 12000 bytes, more than the 6000 allowed", max_tensor_bytes=6000)
    assert len(load_tensors(data, max_tensor_bytes=12000)) == 3


def test_archives_torch_would_not_read_are_refused() -> None:
    """Members outside the archive's folder, a first member outside any folder, no data.pkl."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", torch_pickle({"w": tensor()}))
        archive.writestr("archive/data/0", FLOATS.tobytes())
        archive.writestr("other/data.pkl", b"")
    refused(buffer.getvalue(), "outside the folder 'archive'")
    refused(torch_zip(torch_pickle({"w": tensor()}), folder=""), "not in a folder")
    with pytest.raises(UnsupportedModelFormat, match="no record 'data.pkl'"):
        read_state_dict(write_state_dict({"w": FLOATS}).replace(b"data.pkl", b"data.pkk"))


def test_a_truncated_file_is_refused_wherever_it_is_cut() -> None:
    """Every cut of a valid file is refused with the named error, never another exception."""
    data = write_state_dict({"fc.weight": np.ones((4, 3), np.float32), "fc.bias": np.zeros(4, np.float32)})
    for cut in range(0, len(data), 7):
        with pytest.raises(UnsupportedModelFormat):
            load_tensors(data[:cut])


VALID = write_state_dict(
    {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3), "b": np.ones(2, bool)}
)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_files_are_read_or_refused_never_anything_else(edits: list[tuple[int, int]]) -> None:
    """Random byte edits anywhere: the file is read or refused with the named error."""
    data = bytearray(VALID)
    for position, byte in edits:
        data[position] = byte
    try:
        tensors = load_tensors(bytes(data))
    except UnsupportedModelFormat:
        return
    assert all(isinstance(array, np.ndarray) for array in tensors.values())


# --- cross-check against real torch (only where torch is importable) ----------------------------

needs_torch = pytest.mark.skipif(
    torch is None, reason="torch is not installed: the cross-check against real torch is skipped"
)


# Dtypes torch.from_numpy and .numpy() may not take: passed through a signed integer of the same width.
SIGNED_TWINS = {"bfloat16": "int16", "uint16": "int16", "uint32": "int32", "uint64": "int64"}


def to_torch(array: np.ndarray) -> Any:
    """The torch tensor of an array, bit for bit."""
    twin = SIGNED_TWINS.get(array.dtype.name)
    if twin is None:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.view(twin).copy()).view(getattr(torch, array.dtype.name))


def from_torch(tensor: Any) -> np.ndarray:
    """The array of a torch tensor, bit for bit."""
    name = str(tensor.dtype).removeprefix("torch.")
    twin = SIGNED_TWINS.get(name)
    if twin is None:
        return tensor.contiguous().numpy()
    return tensor.view(getattr(torch, twin)).contiguous().numpy().view(DTYPES[name])


@needs_torch
@settings(max_examples=100, deadline=None)
@given(tensors=state_dicts(), transpose=st.booleans())
def test_state_dicts_saved_by_torch_are_read_identically(
    tensors: dict[str, np.ndarray], transpose: bool
) -> None:
    """torch.save output (views included) reads back as the tensors torch holds."""
    state = {name: to_torch(array) for name, array in tensors.items()}
    if transpose:
        state = {name: value.t() if value.dim() == 2 else value for name, value in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    loaded = read_state_dict(buffer.getvalue())
    assert list(loaded) == list(state)
    assert all(same(loaded[name], from_torch(value)) for name, value in state.items())


@needs_torch
@settings(max_examples=100, deadline=None)
@given(tensors=state_dicts())
def test_files_we_write_are_loaded_by_torch_identically(tensors: dict[str, np.ndarray]) -> None:
    """torch.load(weights_only=True) of our output gives the same names, dtypes, shapes and values."""
    loaded = torch.load(io.BytesIO(write_state_dict(tensors)), weights_only=True)
    assert list(loaded) == list(tensors)
    assert all(same(from_torch(loaded[name]), array) for name, array in tensors.items())


@needs_torch
def test_torch_maps_files_we_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load(mmap=True), computing storage offsets from the layout where torch can."""
    tensors = {
        f"t{index}": random_array(DTYPES[dtype], (index, 3), index)
        for index, dtype in enumerate(sorted(DTYPES))
    }
    path = tmp_path / "model.pt"
    path.write_bytes(write_state_dict(tensors))
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch before 2.6 reads every record's header
        config = None
    if config is not None:
        monkeypatch.setattr(config.load, "calculate_storage_offsets", True, raising=False)
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert all(same(from_torch(loaded[name]), array) for name, array in tensors.items())
