"""Model files: detect the format from the content, read it into NumPy arrays, write one.

Nothing here is ever unpickled by Python's unrestricted pickle: safetensors and `.npz` are parsed
directly (the `.npy` headers are Python literals, read with `ast.literal_eval` by NumPy), and
PyTorch state dicts by `torch_files`, whose unpickler admits what `torch.load(weights_only=True)`
admits for tensors and plain containers, and nothing else.
"""

import io
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import numpy.lib.format as npy
import safetensors.numpy

from fltraining.errors import InvalidInput
from fltraining.weights.signature import Signature, TensorSpec, signature_of

type Format = Literal["safetensors", "npz", "torch", "onnx"]
type Buffer = bytes | bytearray | memoryview
type Source = Buffer | str | os.PathLike[str]

# Above this many bytes of tensors once unpacked, a zip is refused before anything is unpacked:
# a compressed `.npz` of zeros is tiny on the wire and huge in memory.
MAX_TENSOR_BYTES = 1 << 30
# The safetensors library's own limit on the JSON header.
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_NPY_HEADER = 10_000

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
PICKLE_PROTOCOL_MARK = 0x80

SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
ACCEPTED_DTYPES = "bool, int8-64, uint8-64, float16/32/64"
DTYPE_NAMES = frozenset(dtype.name for dtype in SAFETENSORS_DTYPES.values())
# Library messages can be long and give advice meant for the file's owner (torch suggests
# weights_only=False): a client sees their first line only.
MAX_REASON_CHARS = 200


def accepted_formats() -> list[str]:
    """The model file formats read, for error messages."""
    return [
        "safetensors",
        "NumPy .npz (without pickled objects)",
        (
            "PyTorch state dict as torch.save(model.state_dict(), f) writes it (tensors only, as"
            " torch.load(weights_only=True) reads them)"
        ),
        "ONNX graph (its initializers are the weights)",
    ]


class UnsupportedModelFormat(InvalidInput):
    """A model file that is not one of the accepted formats, or is damaged."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"Unsupported model file: {reason}. Accepted formats: {'; '.join(accepted_formats())}."
        )


def detect_format(data: Buffer) -> Format:
    """Name the format of a model file from its content (which is not validated beyond that)."""
    head = bytes(data[:8])
    if len(data) == 0:
        raise UnsupportedModelFormat("the file is empty")
    if head.startswith(ZIP_MAGIC):
        return _zip_format(data)
    if len(data) > 8 and data[8] == ord("{"):
        header_size = int.from_bytes(head, "little")
        if 2 <= header_size <= min(MAX_SAFETENSORS_HEADER, len(data) - 8):
            return "safetensors"
    if data[0] == PICKLE_PROTOCOL_MARK:
        raise UnsupportedModelFormat("the file is a Python pickle, and pickles are never loaded")
    from fltraining.weights.onnx_files import looks_like_onnx  # onnx_files builds on this module

    if looks_like_onnx(data):
        return "onnx"
    raise UnsupportedModelFormat("the content is not a recognised model format")


def load_tensors(source: Source, *, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> dict[str, np.ndarray]:
    """Read a model file's tensors by name, in file order (safetensors gives read-only views of `source`)."""
    data = file_buffer(source)
    fmt = detect_format(data)
    with refusing(f"{fmt} file"):
        tensors = _reader(fmt)(memoryview(data).cast("B"), max_tensor_bytes)
    if not tensors:
        raise UnsupportedModelFormat(f"the {fmt} file holds no tensors")
    return tensors


def read_signature(source: Source, *, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> tuple[Format, Signature]:
    """A model file's format and tensor signature, without holding its tensors in memory.

    A file on disk is mapped, not read: safetensors and uncompressed `.npz` members are looked at
    through their headers; compressed `.npz` members are decompressed a block at a time to check them.
    """
    data = file_buffer(source)
    fmt = detect_format(data)
    with refusing(f"{fmt} file"):
        view = memoryview(data).cast("B")
        if fmt == "npz":  # headers only: the members need not be unpacked
            signature = _npz_signature(view, max_tensor_bytes)
        else:
            signature = signature_of(_reader(fmt)(view, max_tensor_bytes))
    if not signature:
        raise UnsupportedModelFormat(f"the {fmt} file holds no tensors")
    return fmt, signature


def _reader(fmt: Format) -> Callable[[memoryview, int], dict[str, np.ndarray]]:
    """The function that reads a file of this format into tensors."""
    readers: dict[Format, Callable[[memoryview, int], dict[str, np.ndarray]]] = {
        "safetensors": _read_safetensors, "npz": _read_npz, "torch": _read_torch, "onnx": _read_onnx,
    }
    return readers[fmt]


def file_buffer(source: Source) -> Buffer:
    """The bytes of a model file; a path is mapped into memory (its pages stay the page cache's)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return source
    path = Path(source)
    if path.stat().st_size == 0:
        return b""
    return memoryview(np.memmap(path, dtype=np.uint8, mode="r"))


def dump_tensors(tensors: Mapping[str, np.ndarray], fmt: Format = "safetensors", template: Buffer | None = None) -> bytes:
    """Write tensors as a model file in the given format (ONNX: into a copy of the `template` graph)."""
    arrays = {
        name: np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        for name, array in tensors.items()
    }
    if fmt == "safetensors":
        return safetensors.numpy.save(arrays)
    if fmt == "npz":
        return _write_npz(arrays)
    if fmt == "torch":
        return _write_torch(arrays)
    if fmt == "onnx":
        if template is None:
            raise ValueError("ONNX weights are written into a graph: pass the template")
        from fltraining.weights.onnx_files import write_onnx

        return write_onnx(template, arrays)
    raise ValueError(f"unknown model format {fmt!r}")


def write_tensors(
    path: Path, tensors: Mapping[str, np.ndarray], fmt: Format = "safetensors", template: Source | None = None
) -> None:
    """Write tensors as a model file at `path` (safetensors straight from the arrays, no copy in memory;
    ONNX into a copy of the `template` graph)."""
    if fmt != "safetensors":
        path.write_bytes(dump_tensors(tensors, fmt, None if template is None else file_buffer(template)))
        return
    offsets = create_safetensors(path, signature_of(tensors))
    fd = os.open(path, os.O_WRONLY)
    try:
        for name, array in tensors.items():
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            write_at(fd, little.reshape(-1).view(np.uint8), offsets[name])
    finally:
        os.close(fd)


def write_at(fd: int, data: np.ndarray, offset: int) -> None:
    """pwrite all of `data` (bytes) at `offset`, however many calls it takes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


SAFETENSORS_CODES = {dtype.name: code for code, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_ALIGNMENT = 8


def create_safetensors(path: Path, signature: Mapping[str, TensorSpec]) -> dict[str, int]:
    """Create a safetensors file for `signature`, its header written and its data blocks reserved,
    and return where each tensor's bytes start in it, to be filled in place."""
    header: dict[str, Any] = {}
    offset = 0
    # Widest dtypes first, as the library lays files out: every tensor then starts aligned.
    for name, spec in sorted(signature.items(), key=lambda item: -np.dtype(item[1].dtype).itemsize):
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % SAFETENSORS_ALIGNMENT)  # padded as the library pads it
    start = 8 + len(text)
    with path.open("wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        if offset:
            # Blocks reserved now: a full disk is an error here, not half-way through the data.
            os.posix_fallocate(out.fileno(), start, offset)
    return {name: start + header[name]["data_offsets"][0] for name in signature}


@contextmanager
def refusing(what: str) -> Iterator[None]:
    """Turn whatever a reader of untrusted bytes raises into UnsupportedModelFormat naming `what`."""
    try:
        yield
    except (UnsupportedModelFormat, MemoryError):
        raise
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelFormat(f"damaged {what} ({first_line[:MAX_REASON_CHARS]})") from error


class ViewFile(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (zipfile needs a file)."""

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Copy the next bytes into `buffer`."""
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), len(self._view) - self._position))
        target[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        """The read position."""
        return self._position


def _zip_format(data: Buffer) -> Format:
    with refusing("zip archive"), zipfile.ZipFile(ViewFile(data)) as archive:
        names = archive.namelist()
    if all(name.endswith(".npy") for name in names):
        return "npz"
    if any(_is_torchscript_member(name) for name in names):
        raise UnsupportedModelFormat(
            "the file is a TorchScript archive, which holds code; send torch.save(model.state_dict(), f)"
            " or a safetensors file instead"
        )
    if any(name.rpartition("/")[2] == "data.pkl" for name in names):
        return "torch"
    raise UnsupportedModelFormat(
        "the file is a zip archive that is neither a NumPy .npz nor a PyTorch state dict"
    )


def _is_torchscript_member(name: str) -> bool:
    *folders, base = name.split("/")
    return base == "constants.pkl" or "code" in folders


def _check_dtype(name: str, dtype: np.dtype[Any]) -> None:
    if dtype.hasobject:
        raise UnsupportedModelFormat(
            f"tensor {name!r} holds pickled Python objects; they are never unpickled"
        )
    if dtype.name not in DTYPE_NAMES:
        raise UnsupportedModelFormat(f"tensor {name!r} has dtype {dtype}; accepted dtypes: {ACCEPTED_DTYPES}")


def native_order(array: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order (a copy only when it is not)."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _read_safetensors(data: memoryview, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    # Parsed here rather than by the library, whose reader copies every tensor: arrays stay views
    # of the file's bytes, so the file is held in memory once. The rules are the library's.
    view = memoryview(data).cast("B")
    header_size = int.from_bytes(view[:8], "little")
    # Decoded explicitly: json.loads would also take UTF-16/32, which the format does not allow.
    header = json.loads(bytes(view[8 : 8 + header_size]).decode("utf-8"), object_pairs_hook=_unique_keys)
    body = view[8 + header_size :]
    if not isinstance(header, dict):
        raise UnsupportedModelFormat("damaged safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise UnsupportedModelFormat("damaged safetensors file (__metadata__ is not a map of text)")
    entries = [_safetensors_entry(name, info) for name, info in header.items()]
    offset = 0
    for _, _, _, begin, end in sorted(entries, key=lambda entry: (entry[3], entry[4])):
        if begin != offset:
            raise UnsupportedModelFormat("damaged safetensors file (tensor data overlap or leave gaps)")
        offset = end
    if offset != len(body):
        raise UnsupportedModelFormat("damaged safetensors file (the tensor data do not fill the file)")
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, begin, end in entries:
        tensors[name] = native_order(np.frombuffer(body[begin:end], dtype=dtype).reshape(shape))
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise UnsupportedModelFormat("damaged safetensors file (a name appears twice in the header)")
    for key in keys:
        key.encode("utf-8")  # JSON escapes can carry lone surrogates, which are not text
    return dict(pairs)


def _is_size(value: Any) -> bool:
    return type(value) is int and value >= 0


def _safetensors_entry(name: str, info: Any) -> tuple[str, np.dtype[Any], tuple[int, ...], int, int]:
    if not (
        isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        and isinstance(info["dtype"], str) and isinstance(info["shape"], list) and all(map(_is_size, info["shape"]))
        and isinstance(info["data_offsets"], list) and len(info["data_offsets"]) == 2
        and all(map(_is_size, info["data_offsets"]))
    ):
        raise UnsupportedModelFormat(f"damaged safetensors file (bad header entry for {name!r})")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    begin, end = offsets
    if code not in SAFETENSORS_DTYPES:
        raise UnsupportedModelFormat(f"tensor {name!r} has dtype {code}; accepted dtypes: {ACCEPTED_DTYPES}")
    dtype = SAFETENSORS_DTYPES[code]
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise UnsupportedModelFormat(
            f"damaged safetensors file (the size of {name!r} does not match its shape)"
        )
    return name, dtype, tuple(shape), begin, end


def check_unpacked_size(archive: zipfile.ZipFile, max_tensor_bytes: int) -> None:
    """Refuse an archive whose members unpack to more than `max_tensor_bytes` (before unpacking any)."""
    total = sum(info.file_size for info in archive.infolist())
    if total > max_tensor_bytes:
        raise UnsupportedModelFormat(
            f"the archive unpacks to {total} bytes, more than the {max_tensor_bytes} allowed"
        )


def _npz_members(
    data: memoryview, max_tensor_bytes: int
) -> Iterator[tuple[str, zipfile.ZipInfo, memoryview | None, zipfile.ZipFile]]:
    """Each member's tensor name, zip entry, bytes (a view, when stored uncompressed) and archive."""
    seen: set[str] = set()
    with zipfile.ZipFile(ViewFile(data)) as archive:
        check_unpacked_size(archive, max_tensor_bytes)
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name in seen:
                raise UnsupportedModelFormat(f"damaged npz file ({name!r} appears twice)")
            seen.add(name)
            yield name, info, stored_member(data, info), archive


def _read_npz(data: memoryview, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    # Each `.npy` member is read by hand (header, then raw bytes) rather than with np.load: the
    # header is checked before anything is allocated, and object arrays are refused outright.
    # Uncompressed members (what np.savez and fltraining write) stay views of `data`.
    tensors: dict[str, np.ndarray] = {}
    for name, info, stored, archive in _npz_members(data, max_tensor_bytes):
        if stored is not None:
            shape, fortran_order, dtype, header_bytes = _npy_header(name, ViewFile(stored))
            raw: Buffer = stored[header_bytes:]
        else:
            with archive.open(info) as member:
                shape, fortran_order, dtype, _ = _npy_header(name, member)
                raw = member.read()
        _check_size(name, len(raw), shape, dtype)
        array = np.frombuffer(raw, dtype=dtype)
        array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
        tensors[name] = native_order(array)
    return tensors


def _npz_signature(data: memoryview, max_tensor_bytes: int) -> Signature:
    signature: Signature = {}
    for name, info, stored, archive in _npz_members(data, max_tensor_bytes):
        if stored is not None:
            if zlib.crc32(stored) != info.CRC:
                raise UnsupportedModelFormat(f"damaged npz file (bad CRC-32 for {name!r})")
            shape, _, dtype, header_bytes = _npy_header(name, ViewFile(stored))
            _check_size(name, len(stored) - header_bytes, shape, dtype)
        else:
            with archive.open(info) as member:
                shape, _, dtype, _ = _npy_header(name, member)
                size = 0
                while block := member.read(1 << 20):  # read to the end: zipfile checks the CRC
                    size += len(block)
                _check_size(name, size, shape, dtype)
        signature[name] = TensorSpec(tuple(shape), dtype.name)
    return signature


ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


def stored_member(data: memoryview, info: zipfile.ZipInfo) -> memoryview | None:
    """An uncompressed, unencrypted member's bytes as a view of the archive (None for others)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    start = info.header_offset
    if start + ZIP_LOCAL_HEADER.size > len(data):
        raise UnsupportedModelFormat("damaged zip archive (a member lies outside the archive)")
    magic, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(data[start : start + ZIP_LOCAL_HEADER.size])
    if magic != b"PK\x03\x04":
        raise UnsupportedModelFormat("damaged zip archive (bad local header)")
    begin = start + ZIP_LOCAL_HEADER.size + name_length + extra_length
    if begin + info.file_size > len(data):
        raise UnsupportedModelFormat("damaged zip archive (a member lies outside the archive)")
    return data[begin : begin + info.file_size]


def _npy_header(name: str, member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    version = npy.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = npy.read_array_header_1_0(member, max_header_size=MAX_NPY_HEADER)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy.read_array_header_2_0(member, max_header_size=MAX_NPY_HEADER)
    else:
        raise UnsupportedModelFormat(f"damaged npz file (member {name!r} has .npy version {version})")
    _check_dtype(name, dtype)
    if any(size < 0 for size in shape):
        raise UnsupportedModelFormat(f"damaged npz file ({name!r} has a negative dimension)")
    return shape, fortran_order, dtype, member.tell()


def _check_size(name: str, size: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if size != math.prod(shape) * dtype.itemsize:
        raise UnsupportedModelFormat(f"damaged npz file (the size of {name!r} does not match its shape)")


def _read_onnx(data: memoryview, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    from fltraining.weights.onnx_files import read_onnx

    return read_onnx(data, max_tensor_bytes)


def _read_torch(data: memoryview, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    # Imported here: torch_files builds on this module's zip helpers and errors.
    from fltraining.weights.torch_files import read_state_dict

    return read_state_dict(data, max_tensor_bytes)


def _write_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    # Written member by member: np.savez takes names as keyword arguments, so a tensor named
    # "file" or "allow_pickle" would collide with its parameters.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                npy.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def _write_torch(arrays: Mapping[str, np.ndarray]) -> bytes:
    from fltraining.weights.torch_files import write_state_dict  # see _read_torch

    return write_state_dict(arrays)
