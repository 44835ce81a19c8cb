"""safetensors files: parsed here into views of the file's bytes, and written by the library or in place."""

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from fltraining.weights.codecs import Buffer, Codec, UnsupportedModelFormat, native_order, register
from fltraining.weights.signature import TensorSpec, signature_of

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
SAFETENSORS_CODES = {dtype.name: code for code, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_ALIGNMENT = 8


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


def _dump_safetensors(arrays: Mapping[str, np.ndarray], template: Buffer | None) -> bytes:
    return safetensors.numpy.save(dict(arrays))


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write tensors as a safetensors file at `path` straight from the arrays, without a copy in memory."""
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


register(Codec(
    name="safetensors",
    description="safetensors",
    read=_read_safetensors,
    dump=_dump_safetensors,
    write_file=write_safetensors,
))
