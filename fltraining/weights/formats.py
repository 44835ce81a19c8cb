"""Model files: detect the format from the content, read it into NumPy arrays, write one.

Every caller goes through here; the formats themselves are the codecs their reader modules register
(`safetensors_files`, `npz_files`, `torch_files`, `onnx_files`). Nothing is ever unpickled by
Python's unrestricted pickle: safetensors and `.npz` are parsed directly (the `.npy` headers are
Python literals, read with `ast.literal_eval` by NumPy), and PyTorch state dicts by `torch_files`,
whose unpickler admits what `torch.load(weights_only=True)` admits for tensors and plain containers,
and nothing else.
"""

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fltraining.weights.codecs import (
    MAX_TENSOR_BYTES,
    Buffer,
    Format,
    Source,
    UnsupportedModelFormat,
    codec_for,
    refusing,
    registered,
)
from fltraining.weights.signature import Signature, signature_of
from fltraining.weights.zips import ZIP_MAGIC, ViewFile

# The safetensors library's own limit on the JSON header.
MAX_SAFETENSORS_HEADER = 100_000_000
PICKLE_PROTOCOL_MARK = 0x80


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
    for codec in registered():
        if codec.sniff is not None and codec.sniff(data):
            return codec.name
    raise UnsupportedModelFormat("the content is not a recognised model format")


def load_tensors(source: Source, *, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> dict[str, np.ndarray]:
    """Read a model file's tensors by name, in file order (safetensors gives read-only views of `source`)."""
    data = file_buffer(source)
    fmt = detect_format(data)
    read = codec_for(fmt).read
    with refusing(f"{fmt} file"):
        tensors = read(memoryview(data).cast("B"), max_tensor_bytes)
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
    codec = codec_for(fmt)
    with refusing(f"{fmt} file"):
        view = memoryview(data).cast("B")
        if codec.signature is not None:
            signature = codec.signature(view, max_tensor_bytes)
        else:
            signature = signature_of(codec.read(view, max_tensor_bytes))
    if not signature:
        raise UnsupportedModelFormat(f"the {fmt} file holds no tensors")
    return fmt, signature


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
    dump = codec_for(fmt).dump
    arrays = {
        name: np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        for name, array in tensors.items()
    }
    return dump(arrays, template)


def write_tensors(
    path: Path, tensors: Mapping[str, np.ndarray], fmt: Format = "safetensors", template: Source | None = None
) -> None:
    """Write tensors as a model file at `path` (safetensors straight from the arrays, no copy in memory;
    ONNX into a copy of the `template` graph)."""
    write_file = codec_for(fmt).write_file
    if write_file is None:
        path.write_bytes(dump_tensors(tensors, fmt, None if template is None else file_buffer(template)))
    else:
        write_file(path, tensors)


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
