"""Zip archives as model files hold them (`.npz`, PyTorch state dicts): read in place, sizes checked first."""

import io
import struct
import zipfile
from typing import Any

from fltraining.weights.codecs import Buffer, UnsupportedModelFormat

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


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


def check_unpacked_size(archive: zipfile.ZipFile, max_tensor_bytes: int) -> None:
    """Refuse an archive whose members unpack to more than `max_tensor_bytes` (before unpacking any)."""
    total = sum(info.file_size for info in archive.infolist())
    if total > max_tensor_bytes:
        raise UnsupportedModelFormat(
            f"the archive unpacks to {total} bytes, more than the {max_tensor_bytes} allowed"
        )


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
