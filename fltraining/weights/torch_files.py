"""PyTorch state dicts (`torch.save(model.state_dict(), f)`), read and written without torch.

torch.save writes a zip archive (torch/serialization.py, caffe2/serialize/inline_container.cc):
`<archive>/data.pkl`, a protocol-2 pickle of the state dict whose tensors are
`torch._utils._rebuild_tensor_v2` calls over persistent ids naming storages; `<archive>/data/<key>`,
each storage's raw bytes, stored uncompressed at 64-byte aligned offsets of the file; and the records
`byteorder`, `version`, `.format_version` and `.storage_alignment`.

data.pkl is read by an unpickler that admits only what `torch.load(weights_only=True)` admits for a
flat state dict (the rebuild functions, storage classes, dtypes, `OrderedDict` and plain values): every
global resolves to a stand-in defined here, so nothing is imported and no other code runs. Tensors are
views of the file's bytes. CRCs are not checked, as torch.load does not check them either.
"""

import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple, TypeIs

import ml_dtypes
import numpy as np

from fltraining.weights.codecs import (
    MAX_TENSOR_BYTES,
    Buffer,
    Codec,
    UnsupportedModelFormat,
    native_order,
    register,
)
from fltraining.weights.zips import ViewFile, check_unpacked_size, stored_member

# NumPy has no bfloat16: ml_dtypes' keeps the bytes as they are (no copy, no widening) and is named
# "bfloat16" in signatures; its values convert to float64 for aggregation and back.
BFLOAT16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
# torch's storage classes and the element type each stands for (torch/storage.py).
STORAGE_CLASSES: dict[str, np.dtype[Any]] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# dtypes without a storage class (torch.storage._new_dtypes): torch saves them as an UntypedStorage
# of bytes and names the dtype in `_rebuild_tensor_v3`.
UNTYPED_DTYPES: list[np.dtype[Any]] = [np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64)]
DTYPES: dict[str, np.dtype[Any]] = {
    dtype.name: dtype for dtype in [*STORAGE_CLASSES.values(), *UNTYPED_DTYPES]
}
ACCEPTED_DTYPES = "float16/32/64, bfloat16, int8-64, uint8-64, bool"
ADVICE = "send torch.save(model.state_dict(), f) or a safetensors file instead"

type ByteOrder = Literal["<", ">"]

ALIGNMENT = 64
FILE_FORMAT_VERSION = b"3\n"  # caffe2/serialize/versions.h, kProducedFileFormatVersion
# The opcodes torch's weights_only unpickler implements (torch/_weights_only_unpickler.py), less
# NEWOBJ: a state dict instantiates no class.
OPCODES = frozenset({
    "PROTO", "STOP", "GLOBAL", "REDUCE", "BUILD", "BINPERSID", "MARK", "TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "APPEND", "APPENDS", "SETITEM",
    "SETITEMS", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "BINUNICODE", "SHORT_BINSTRING", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})


# --- reading -----------------------------------------------------------------------------------
# The unpickler only ever meets these stand-ins. They are tuples (no attributes a BUILD could set)
# or, for the state dict, a dict whose __setstate__ ignores torch's `_metadata` (module versions).


class _Function(NamedTuple):
    """A global data.pkl may call: the stand-in for torch's function of the same name."""

    function: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        """Call the stand-in."""
        return self.function(*args)


class _StorageClass(NamedTuple):
    """A storage class named in a persistent id, by its element type."""

    dtype: np.dtype[Any]


class _DType(NamedTuple):
    """A torch dtype object."""

    dtype: np.dtype[Any]


class _Storage(NamedTuple):
    """A storage: its bytes (a view of the file where stored), element type and the file's byte order."""

    data: np.ndarray
    dtype: np.dtype[Any]
    order: ByteOrder


class _Tensor(NamedTuple):
    """A rebuilt tensor."""

    array: np.ndarray


class _StateDict(dict[Any, Any]):
    """collections.OrderedDict (dicts keep their order)."""

    def __setstate__(self, state: object) -> None:
        """Accept torch's `_metadata` attribute and drop it."""
        if type(state) is not dict:
            raise UnsupportedModelFormat("damaged PyTorch file (an OrderedDict with an unknown state)")


def _damaged(what: str) -> UnsupportedModelFormat:
    return UnsupportedModelFormat(f"damaged PyTorch file ({what})")


def _is_count(value: object) -> TypeIs[int]:
    return type(value) is int and value >= 0


def _check_flags(requires_grad: object, backward_hooks: object, metadata: object) -> None:
    if type(requires_grad) is not bool or not isinstance(backward_hooks, dict) or backward_hooks:
        raise _damaged("a tensor with malformed flags or backward hooks")
    if metadata is not None and (not isinstance(metadata, dict) or metadata):
        raise UnsupportedModelFormat(
            "a tensor carries metadata (such as a conjugate or negative bit), which is not supported"
        )


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for length in reversed(size):
        strides.append(step)
        step *= max(length, 1)  # as torch computes them: an empty dimension does not zero the others
    return tuple(reversed(strides))


def _strided(
    storage: _Storage, dtype: np.dtype[Any], offset: object, size: object, stride: object
) -> np.ndarray:
    """The tensor `torch.Tensor.set_(storage, offset, size, stride)` makes, as a read-only view."""
    if not (
        _is_count(offset) and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
        and all(map(_is_count, size)) and all(type(step) is int for step in stride)
    ):
        raise _damaged("a tensor with a malformed storage, offset, size or stride")
    usable = storage.data.size - storage.data.size % dtype.itemsize
    elements = storage.data[:usable].view(dtype)
    if 0 in size:
        return elements[:0].reshape(size)
    if any(step < 0 for step in stride):
        raise _damaged("a tensor with a negative stride")
    dimensions = list(zip(size, stride, strict=True))
    last = offset + sum(step * (length - 1) for length, step in dimensions)
    if last >= elements.size:
        raise _damaged(f"a tensor reaches element {last} of a storage of {elements.size}")
    contiguous = _contiguous_strides(size)
    if all(step == want for (length, step), want in zip(dimensions, contiguous, strict=True) if length > 1):
        return elements[offset : offset + math.prod(size)].reshape(size)
    # Sorted by stride, each dimension must step past all the elements the smaller ones reach:
    # then no two indices share an element (the layouts of slices and permutations all pass).
    reach = 0
    for step, length in sorted((step, length) for length, step in dimensions if length > 1):
        if step <= reach:
            raise UnsupportedModelFormat(
                "a tensor's strides make its elements overlap (such as an expanded view); save a"
                " .contiguous() copy"
            )
        reach += step * (length - 1)
    return np.lib.stride_tricks.as_strided(
        elements[offset:], shape=size, strides=[step * dtype.itemsize for step in stride], writeable=False
    )


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _Tensor:
    if type(storage) is not _Storage:
        raise _damaged("a tensor without a storage")
    return _Tensor(_strided(storage, storage.dtype, offset, size, stride))


def _rebuild_tensor_v2(
    storage: object, offset: object, size: object, stride: object, requires_grad: object,
    backward_hooks: object, metadata: object = None,
) -> _Tensor:
    _check_flags(requires_grad, backward_hooks, metadata)
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: object, offset: object, size: object, stride: object, requires_grad: object,
    backward_hooks: object, dtype: object, metadata: object = None,
) -> _Tensor:
    _check_flags(requires_grad, backward_hooks, metadata)
    if type(storage) is not _Storage or type(dtype) is not _DType:
        raise _damaged("a tensor without a storage or dtype")
    return _Tensor(_strided(storage, dtype.dtype.newbyteorder(storage.order), offset, size, stride))


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> _Tensor:
    _check_flags(requires_grad, backward_hooks, None)
    if type(data) is not _Tensor:
        raise _damaged("a parameter without a tensor")
    return data


GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _Function(_StateDict),
    ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Function(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageClass(np.dtype(np.uint8)),
    **{("torch", name): _StorageClass(dtype) for name, dtype in STORAGE_CLASSES.items()},
    **{("torch", name): _DType(dtype) for name, dtype in DTYPES.items()},
}


def _admitted(module: str, name: str) -> object:
    """The stand-in for a global, or the refusal naming it."""
    if (module, name) in GLOBALS:
        return GLOBALS[module, name]
    named = f"{module}.{name}"[:100]
    if module.split(".")[0] == "torch":
        raise UnsupportedModelFormat(
            f"the PyTorch file holds {named}, which is neither a dense tensor of an accepted dtype"
            f" ({ACCEPTED_DTYPES}) nor a plain container; {ADVICE}"
        )
    raise UnsupportedModelFormat(
        f"the PyTorch file holds Python objects other than tensors (it names {named}), such as a whole"
        f" pickled model; {ADVICE}"
    )


def _check_opcodes(pickled: bytes) -> None:
    """Refuse, before unpickling, opcodes a state dict never needs, unknown globals and memo indices
    no pickler would write (the C unpickler sizes its memo by the largest index it is given)."""
    puts = 0
    highest = -1
    for opcode, argument, _ in pickletools.genops(pickled):
        if opcode.name not in OPCODES:
            raise UnsupportedModelFormat(
                f"the PyTorch file's data.pkl uses the pickle opcode {opcode.name}, which a state dict"
                f" never needs; {ADVICE}"
            )
        if opcode.name == "GLOBAL":
            _admitted(*str(argument).split(" ", 1))
        elif opcode.name in ("BINPUT", "LONG_BINPUT"):
            puts += 1
            highest = max(highest, int(argument))  # type: ignore[arg-type]
    if highest >= puts:
        raise _damaged(f"data.pkl stores to memo index {highest} with {puts} stores")


class _Archive:
    """A torch.save zip's records by name within its folder (torch takes the first member's folder);
    stored records are views of the file's bytes, compressed ones are inflated."""

    def __init__(self, view: memoryview, archive: zipfile.ZipFile) -> None:
        names = archive.namelist()
        folder, slash, _ = names[0].partition("/") if names else ("", "", "")
        if not slash:
            raise _damaged("its first member is not in a folder")
        self._view = view
        self._archive = archive
        self._records: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            top, _, name = info.filename.partition("/")
            if top != folder:
                raise _damaged(f"member {info.filename[:100]!r} is outside the folder {folder[:100]!r}")
            self._records[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def size(self, name: str) -> int:
        """The record's size once read."""
        return self._info(name).file_size

    def read(self, name: str) -> Buffer:
        """The record's bytes."""
        info = self._info(name)
        stored = stored_member(self._view, info)
        return stored if stored is not None else self._archive.read(info)

    def _info(self, name: str) -> zipfile.ZipInfo:
        if name not in self._records:
            raise _damaged(f"it has no record {name[:100]!r}")
        return self._records[name]


class _Unpickler(pickle.Unpickler):
    """data.pkl's unpickler: globals are the stand-ins above, persistent ids are the archive's storages."""

    def __init__(self, pickled: bytes, archive: _Archive, order: ByteOrder) -> None:
        super().__init__(io.BytesIO(pickled))
        self._archive = archive
        self._order = order
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str, /) -> object:
        """The stand-in for an admitted global; any other is refused (nothing is imported)."""
        return _admitted(module, name)

    def persistent_load(self, pid: object, /) -> _Storage:
        """The storage a `('storage', storage class, key, location, numel)` id names."""
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise _damaged("a persistent id that is not a storage")
        _, kind, key, location, numel = pid
        if not (
            type(kind) is _StorageClass and type(key) is str and type(location) is str and _is_count(numel)
        ):
            raise _damaged("a malformed storage id")
        dtype = kind.dtype.newbyteorder(self._order)
        if key in self._storages:
            if self._storages[key].dtype != dtype:
                raise _damaged(f"storage {key[:100]!r} is named with two types")
            return self._storages[key]
        record = f"data/{key}"
        # Checked before the record is read: a compressed record is inflated only if it fits.
        if self._archive.size(record) != numel * dtype.itemsize:
            raise _damaged(
                f"record {record[:100]!r} holds {self._archive.size(record)} bytes, data.pkl says"
                f" {numel * dtype.itemsize}"
            )
        data = np.frombuffer(self._archive.read(record), dtype=np.uint8)
        self._storages[key] = _Storage(data, dtype, self._order)
        return self._storages[key]


def _byte_order(archive: _Archive) -> ByteOrder:
    if "byteorder" not in archive:
        return "<"  # what torch.load assumes for a file without the record
    orders: dict[bytes, ByteOrder] = {b"little": "<", b"big": ">"}
    marker = bytes(archive.read("byteorder"))
    if marker not in orders:
        raise _damaged("the byteorder record is neither little nor big")
    return orders[marker]


def _flat(state: object, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise UnsupportedModelFormat(
            f"the PyTorch file holds {_kind(state)}, not a flat state dict (a mapping of name to tensor);"
            f" {ADVICE}"
        )
    total = 0
    for name, value in state.items():
        if type(name) is not str:
            raise UnsupportedModelFormat(
                f"the PyTorch file is not a flat state dict (a mapping of name to tensor): a key is"
                f" {_kind(name)}, not text; {ADVICE}"
            )
        if type(value) is not _Tensor:
            raise UnsupportedModelFormat(
                f"the PyTorch file is not a flat state dict (a mapping of name to tensor): {name[:100]!r}"
                f" holds {_kind(value)}, not a tensor; {ADVICE}"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsupportedModelFormat("a tensor's name is not valid UTF-8 text") from None
        total += value.array.nbytes
    # Tensors may share a storage, so their sizes can add up to more than the file holds.
    if total > max_tensor_bytes:
        raise UnsupportedModelFormat(
            f"the tensors hold {total} bytes, more than the {max_tensor_bytes} allowed"
        )
    return {name: native_order(value.array) for name, value in state.items()}


def _kind(value: object) -> str:
    kinds = {
        _Tensor: "a tensor", dict: "a mapping", _StateDict: "a mapping", list: "a list", tuple: "a tuple",
        _Storage: "a storage",
    }
    return kinds.get(type(value), f"a value of type {type(value).__name__}")


def read_state_dict(data: Buffer, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save(state_dict, f)` file by name, in file order (views of `data`
    where stored uncompressed, as torch stores them); anything else is refused."""
    view = memoryview(data).cast("B")
    with zipfile.ZipFile(ViewFile(view)) as zipped:
        check_unpacked_size(zipped, max_tensor_bytes)
        archive = _Archive(view, zipped)
        order = _byte_order(archive)
        pickled = bytes(archive.read("data.pkl"))
        _check_opcodes(pickled)
        state = _Unpickler(pickled, archive, order).load()
    return _flat(state, max_tensor_bytes)


# --- writing -----------------------------------------------------------------------------------


class _Global(NamedTuple):
    """A global written into the pickle by name."""

    module: str
    name: str


class _Reduce(NamedTuple):
    """A call of a global, as pickle's REDUCE."""

    function: _Global
    args: tuple[Any, ...]


class _PersistentId(NamedTuple):
    """A persistent id, as pickle's BINPERSID."""

    id: tuple[Any, ...]


ORDERED_DICT = _Global("collections", "OrderedDict")
REBUILD_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_V3 = _Global("torch._utils", "_rebuild_tensor_v3")
UNTYPED_STORAGE = _Global("torch.storage", "UntypedStorage")
STORAGE_CLASS_NAMES = {dtype.name: name for name, dtype in STORAGE_CLASSES.items()}
SETITEMS_BATCH = 1000  # pickle's own batch size


class _PickleWriter:
    """Protocol-2 pickle opcodes for the values of a state dict; each global is written once, then
    fetched from the memo. Only opcodes torch's weights_only unpickler implements are used."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")
        self._memo: dict[_Global, int] = {}

    def dump(self, value: object) -> None:
        """Append the opcodes that rebuild `value`."""
        match value:
            case _Global() if value in self._memo:
                self.out += pickle.BINGET + bytes([self._memo[value]])
            case _Global(module, name):
                self._memo[value] = len(self._memo)
                self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()
                self.out += pickle.BINPUT + bytes([self._memo[value]])
            case _Reduce(function, args):
                self.dump(function)
                self.dump(args)
                self.out += pickle.REDUCE
            case _PersistentId(pid):
                self.dump(pid)
                self.out += pickle.BINPERSID
            case bool():
                self.out += pickle.NEWTRUE if value else pickle.NEWFALSE
            case int():
                self._int(value)
            case str():
                encoded = value.encode("utf-8")
                self.out += pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
            case tuple() if len(value) <= 3:
                for item in value:
                    self.dump(item)
                self.out += [pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3][len(value)]
            case tuple():
                self.out += pickle.MARK
                for item in value:
                    self.dump(item)
                self.out += pickle.TUPLE
            case _:
                raise TypeError(f"no pickle form for {type(value).__name__}")

    def _int(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += pickle.BININT1 + struct.pack("<B", value)
        elif 0 <= value < 1 << 16:
            self.out += pickle.BININT2 + struct.pack("<H", value)
        elif -(1 << 31) <= value < 1 << 31:
            self.out += pickle.BININT + struct.pack("<i", value)
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += pickle.LONG1 + struct.pack("<B", len(encoded)) + encoded


def _tensor(key: str, name: str, array: np.ndarray) -> _Reduce:
    """The reduction torch.save writes for a contiguous CPU tensor with its own storage."""
    shape = tuple(array.shape)
    layout = (0, shape, _contiguous_strides(shape), False, _Reduce(ORDERED_DICT, ()))
    if array.dtype.name in STORAGE_CLASS_NAMES:
        kind = _Global("torch", STORAGE_CLASS_NAMES[array.dtype.name])
        return _Reduce(REBUILD_V2, (_PersistentId(("storage", kind, key, "cpu", array.size)), *layout))
    if array.dtype.name in DTYPES:
        storage = _PersistentId(("storage", UNTYPED_STORAGE, key, "cpu", array.nbytes))
        return _Reduce(REBUILD_V3, (storage, *layout, _Global("torch", array.dtype.name)))
    raise ValueError(f"tensor {name!r} has dtype {array.dtype}; PyTorch files hold {ACCEPTED_DTYPES}")


def _state_dict_pickle(arrays: list[tuple[str, np.ndarray]]) -> bytes:
    writer = _PickleWriter()
    writer.dump(_Reduce(ORDERED_DICT, ()))
    for start in range(0, len(arrays), SETITEMS_BATCH):
        writer.out += pickle.MARK
        for key, (name, array) in enumerate(arrays[start : start + SETITEMS_BATCH], start):
            writer.dump(name)
            writer.dump(_tensor(str(key), name, array))
        writer.out += pickle.SETITEMS
    writer.out += pickle.STOP
    return bytes(writer.out)


LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")
DESCRIPTOR = struct.Struct("<4sIII")
DESCRIPTOR_64 = struct.Struct("<4sIQQ")
ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
END = struct.Struct("<4sHHHHIIH")
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on are zip64 fields, as miniz decides
UTF8_NAME = 0x800
HAS_DESCRIPTOR = 0x8
ZIP64_VERSION = 45


def _field(value: int) -> int:
    """A 32-bit size or offset field: the value, or 0xFFFFFFFF when a zip64 field holds it."""
    return 0xFFFFFFFF if value >= ZIP64_LIMIT else value


def _zip(records: list[tuple[str, Buffer]]) -> Iterator[Buffer]:
    """The archive, in pieces, laid out as torch's writer (miniz) lays it out: each record stored,
    its data aligned by padding in an `FB` extra field and followed by a data descriptor; the zip64
    end records always. torch.load(mmap=True) may compute data offsets from this layout alone."""
    position = 0
    central: list[bytes] = []
    for name, content in records:
        encoded = f"archive/{name}".encode()
        size = len(content)
        # The zip64 fields precede the padding, as in miniz (torch's getPadding counts them).
        zip64 = struct.pack("<QQ", size, size) * (size >= ZIP64_LIMIT)
        zip64 += struct.pack("<Q", position) * (position >= ZIP64_LIMIT)
        zip64_extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
        start = position + LOCAL_HEADER.size + len(encoded) + len(zip64_extra) + 4
        padding = -start % ALIGNMENT
        extra = zip64_extra + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = UTF8_NAME | (HAS_DESCRIPTOR if size else 0)
        crc = zlib.crc32(content)
        header = LOCAL_HEADER.pack(b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(encoded), len(extra))
        header += encoded + extra
        descriptor = b""
        if size:
            form = DESCRIPTOR_64 if zip64 else DESCRIPTOR
            descriptor = form.pack(b"PK\x07\x08", crc, size, size)
        central.append(
            CENTRAL_HEADER.pack(
                b"PK\x01\x02", 0, ZIP64_VERSION if zip64 else 0, flags, 0, 0, 0, crc, _field(size),
                _field(size), len(encoded), len(zip64_extra), 0, 0, 0, 0, _field(position),
            ) + encoded + zip64_extra
        )
        yield header
        yield content
        yield descriptor
        position += len(header) + size + len(descriptor)
    directory = b"".join(central)
    yield directory
    count = len(central)
    yield ZIP64_END.pack(
        b"PK\x06\x06", ZIP64_END.size - 12, 0x031E, ZIP64_VERSION, 0, 0, count, count, len(directory),
        position,
    )
    yield ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, position + len(directory), 1)
    yield END.pack(
        b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), _field(len(directory)),
        _field(position), 0,
    )


def write_state_dict(tensors: Mapping[str, np.ndarray]) -> bytes:
    """`tensors` as torch.save writes a state dict (its records, pickle and zip layout): torch.load(f,
    weights_only=True) reads back an OrderedDict of the same names, dtypes, shapes and values."""
    arrays = [
        (name, np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C"))
        for name, array in tensors.items()
    ]
    records: list[tuple[str, Buffer]] = [
        ("data.pkl", _state_dict_pickle(arrays)),
        (".format_version", b"1"),
        (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", b"little"),
        *(
            (f"data/{key}", memoryview(array.reshape(-1).view(np.uint8)))
            for key, (_, array) in enumerate(arrays)
        ),
        ("version", FILE_FORMAT_VERSION),
    ]
    return b"".join(_zip(records))


def _dump_state_dict(arrays: Mapping[str, np.ndarray], template: Buffer | None) -> bytes:
    return write_state_dict(arrays)


register(Codec(
    name="torch",
    description=(
        "PyTorch state dict as torch.save(model.state_dict(), f) writes it (tensors only, as"
        " torch.load(weights_only=True) reads them)"
    ),
    read=read_state_dict,
    dump=_dump_state_dict,
))
