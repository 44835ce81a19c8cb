"""The model file formats as a registry: each reader module registers the codec of its format here.

The bottom of the package's formats: the readers and the `formats` facade build on it, and it imports
none of them (only `signature`).
"""

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from fltraining.errors import InvalidInput
from fltraining.weights.signature import Signature

type Format = Literal["safetensors", "npz", "torch", "onnx"]
type Buffer = bytes | bytearray | memoryview
type Source = Buffer | str | os.PathLike[str]

# Above this many bytes of tensors once unpacked, a zip is refused before anything is unpacked:
# a compressed `.npz` of zeros is tiny on the wire and huge in memory.
MAX_TENSOR_BYTES = 1 << 30
# Library messages can be long and give advice meant for the file's owner (torch suggests
# weights_only=False): a client sees their first line only.
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Codec:
    """How one model file format is read and written."""

    name: Format
    description: str  # as error messages list the accepted formats
    read: Callable[[memoryview, int], dict[str, np.ndarray]]  # (file bytes, max tensor bytes)
    dump: Callable[[Mapping[str, np.ndarray], Buffer | None], bytes]  # (little-endian arrays, template)
    # A content test, for a format recognised by trying to parse it rather than by a fixed mark.
    sniff: Callable[[Buffer], bool] | None = None
    # The signature without unpacking the tensors, where the format allows it.
    signature: Callable[[memoryview, int], Signature] | None = None
    # Writes the tensors straight to a path, without the whole file in memory.
    write_file: Callable[[Path, Mapping[str, np.ndarray]], None] | None = None


_CODECS: dict[Format, Codec] = {}


def register(codec: Codec) -> None:
    """Make a format readable and writable (its reader module calls this when imported)."""
    _CODECS[codec.name] = codec


def codec_for(fmt: Format) -> Codec:
    """The registered codec of a format."""
    if fmt not in _CODECS:
        raise ValueError(f"unknown model format {fmt!r} (registered: {', '.join(_CODECS) or 'none'})")
    return _CODECS[fmt]


def registered() -> list[Codec]:
    """The registered codecs, in the order of the `Format` literal."""
    return [_CODECS[name] for name in get_args(Format.__value__) if name in _CODECS]


def accepted_formats() -> list[str]:
    """The model file formats read, for error messages."""
    return [codec.description for codec in registered()]


class UnsupportedModelFormat(InvalidInput):
    """A model file that is not one of the accepted formats, or is damaged."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"Unsupported model file: {reason}. Accepted formats: {'; '.join(accepted_formats())}."
        )


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


def native_order(array: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order (a copy only when it is not)."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))
