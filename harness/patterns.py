"""Data patterns, as qemu-io's -P: every byte is the pattern value."""

from __future__ import annotations


def pattern_bytes(pattern: int, length: int) -> bytes:
    return bytes([pattern & 0xFF]) * length


def offset_pattern(offset: int, length: int) -> bytes:
    """Bytes that encode their own position, so misplaced data is caught."""
    start, end = offset // 8, (offset + length + 7) // 8
    blob = b"".join(i.to_bytes(8, "little") for i in range(start, end))
    skip = offset - start * 8
    return blob[skip : skip + length]


IMAGE_FILLS = ("offsets", "zero", "sparse")


def make_image(path: str, size: int, fill: str = "offsets") -> None:
    """A raw image: bytes that encode their offsets, zeroes, or a sparse file."""
    with open(path, "wb") as f:
        if fill == "offsets":
            f.write(offset_pattern(0, size))
        elif fill == "zero":
            f.write(bytes(size))
        f.truncate(size)
