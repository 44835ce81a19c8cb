"""NumPy `.npz` files: each `.npy` member read by hand (header checked first, object arrays refused)."""

import io
import math
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
import numpy.lib.format as npy

from fltraining.weights.codecs import Buffer, Codec, UnsupportedModelFormat, native_order, register
from fltraining.weights.safetensors_files import ACCEPTED_DTYPES, DTYPE_NAMES
from fltraining.weights.signature import Signature, TensorSpec
from fltraining.weights.zips import ViewFile, check_unpacked_size, stored_member

MAX_NPY_HEADER = 10_000


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
    # Headers only: the members need not be unpacked (compressed ones are checked a block at a time).
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


def _check_dtype(name: str, dtype: np.dtype[Any]) -> None:
    if dtype.hasobject:
        raise UnsupportedModelFormat(
            f"tensor {name!r} holds pickled Python objects; they are never unpickled"
        )
    if dtype.name not in DTYPE_NAMES:
        raise UnsupportedModelFormat(f"tensor {name!r} has dtype {dtype}; accepted dtypes: {ACCEPTED_DTYPES}")


def _check_size(name: str, size: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if size != math.prod(shape) * dtype.itemsize:
        raise UnsupportedModelFormat(f"damaged npz file (the size of {name!r} does not match its shape)")


def _write_npz(arrays: Mapping[str, np.ndarray], template: Buffer | None) -> bytes:
    # Written member by member: np.savez takes names as keyword arguments, so a tensor named
    # "file" or "allow_pickle" would collide with its parameters.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                npy.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


register(Codec(
    name="npz",
    description="NumPy .npz (without pickled objects)",
    read=_read_npz,
    dump=_write_npz,
    signature=_npz_signature,
))
