"""The npz's members: ``.npy`` arrays in a zip, written and read whole or a block of rows
at a time.

Writing: :func:`member_writer` opens a member (stored, zip64), writes the ``.npy`` header
of the whole array first and then takes its C-order bytes a block at a time; the bytes
are those ``numpy.lib.format.write_array`` writes for the whole array, so a member is the
same whether it was written whole (:func:`write_member`) or in blocks.

Reading: :func:`open_member` checks a member's header against its size before anything
is allocated from it; :func:`read_member` reads one whole (small members: scales, zero
points, norms), :class:`MemberRows` hands out its rows in order, reading the member
incrementally (stored or deflated alike: the bytes come through the zip's own reader, so
its CRC is still checked when the last block is read, and a block's bytes are all that
is held), and :func:`check_member` reads one through for validation without keeping it.
"""
from __future__ import annotations

import math
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from convcore import ConvcoreError

#: bytes :func:`check_member` reads at a time
READ_PIECE = 1 << 24


# writing ---------------------------------------------------------------------------------
def write_member(zf: zipfile.ZipFile, member: str, array: np.ndarray) -> None:
    """``member``.npy holding ``array``, written whole."""
    with zf.open(member + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


class MemberWriter:
    """An open member taking the C-order bytes of its array a block at a time."""

    def __init__(self, f: IO[bytes], dtype: np.dtype, nbytes: int, where: str):
        self.f, self.dtype, self.left, self.where = f, dtype, nbytes, where

    def write(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.nbytes > self.left:
            raise ConvcoreError(f"{self.where}: a block of {block.dtype}{list(block.shape)} does not fit "
                                f"the {self.dtype} member ({self.left} bytes left)")
        if block.nbytes:
            self.f.write(memoryview(np.ascontiguousarray(block)).cast("B"))
        self.left -= block.nbytes


@contextmanager
def member_writer(zf: zipfile.ZipFile, member: str, dtype: np.dtype | str, shape: tuple[int, ...],
                  where: str = "") -> Iterator[MemberWriter]:
    """``member``.npy open for writing, the header of a C-order ``dtype`` array of ``shape``
    written (what ``write_array`` writes: format 1.0, else 2.0 for a header that needs it);
    the blocks written must make up the array exactly."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)   # numpy integers repr as np.int64(...) in a header
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    where = where or member
    with zf.open(member + ".npy", "w", force_zip64=True) as f:
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:  # a header over 64 KiB
            np.lib.format.write_array_header_2_0(f, header)
        writer = MemberWriter(f, dtype, math.prod(shape) * dtype.itemsize, where)
        yield writer
        if writer.left:
            raise ConvcoreError(f"{where}: {writer.left} bytes of member {member!r} were never written")


# reading ---------------------------------------------------------------------------------
def member_info(zf: zipfile.ZipFile, member: str, npz: Path) -> zipfile.ZipInfo:
    where = f"{npz}: member {member!r}"
    try:
        info = zf.getinfo(member + ".npy")
    except KeyError:
        raise ConvcoreError(f"{where} is missing") from None
    # deflate packs at most ~1032:1; a member claiming more is not what it says
    if info.file_size > max(1 << 20, 1100 * info.compress_size):
        raise ConvcoreError(f"{where}: claims {info.file_size} bytes from {info.compress_size} compressed")
    return info


def _read_header(f: IO[bytes], info: zipfile.ZipInfo, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy version {version}")
        shape, fortran, dtype = read_header(f)
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        raise ConvcoreError(f"{where}: not a readable .npy header ({exc})".replace("\n", " ")) from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise ConvcoreError(f"{where}: dtype {dtype} (Python objects or empty items) is refused")
    want = math.prod(shape) * dtype.itemsize
    have = info.file_size - f.tell()
    if want != have:
        raise ConvcoreError(f"{where}: header says shape {list(shape)} of {dtype} ({want} bytes), "
                            f"the member holds {have}")
    return tuple(shape), bool(fortran), dtype, have


@contextmanager
def open_member(zf: zipfile.ZipFile, member: str, npz: Path
                ) -> Iterator[tuple[IO[bytes], tuple[int, ...], bool, np.dtype]]:
    """``member``.npy open at its data, with its header checked against the member's size
    first (numpy allocates the header's shape before reading): no object dtypes (pickle),
    no shape the bytes do not hold. Yields (file, shape, fortran_order, dtype)."""
    info = member_info(zf, member, npz)
    with zf.open(info) as f:
        shape, fortran, dtype, _ = _read_header(f, info, f"{npz}: member {member!r}")
        yield f, shape, fortran, dtype


def read_member(zf: zipfile.ZipFile, member: str, npz: Path) -> np.ndarray:
    """The array in ``member``.npy, read whole (header checked as :func:`open_member` does)."""
    with open_member(zf, member, npz) as (f, shape, fortran, dtype):
        raw = f.read(math.prod(shape) * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def check_member(zf: zipfile.ZipFile, member: str, npz: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of ``member``.npy after reading it through a piece at a time (the
    zip's CRC checked, as a whole read checks it), holding no more than a piece."""
    with open_member(zf, member, npz) as (f, shape, _, dtype):
        left = math.prod(shape) * dtype.itemsize
        while left > 0:
            piece = f.read(min(left, READ_PIECE))
            if not piece:
                raise ConvcoreError(f"{npz}: member {member!r} ends {left} bytes early")
            left -= len(piece)
    return shape, dtype


class MemberRows:
    """A member's array as rows of ``row_items`` values (its C-order values, whatever the
    header's shape), handed out in order: :meth:`rows` ``(a, b)`` reads rows ``[a, b)`` from
    the zip, the next call goes on from ``b``. A Fortran-ordered member (numpy writes none
    of those; other tools might) is read whole instead."""

    def __init__(self, zf: zipfile.ZipFile, member: str, npz: Path):
        self.member, self.npz = member, npz
        info = member_info(zf, member, npz)
        self.file: IO[bytes] | None = zf.open(info)
        try:
            self.shape, fortran, self.dtype, _ = _read_header(self.file, info, f"{npz}: member {member!r}")
            self.whole: np.ndarray | None = None
            if fortran and sum(d > 1 for d in self.shape) > 1:
                raw = self.file.read(math.prod(self.shape) * self.dtype.itemsize)
                self.whole = np.frombuffer(raw, self.dtype).reshape(self.shape, order="F").reshape(-1)
        except BaseException:
            self.close()
            raise
        self.next_row = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def rows(self, a: int, b: int, row_items: int) -> np.ndarray:
        if a != self.next_row:
            raise ConvcoreError(f"{self.npz}: member {self.member!r}: rows {a}..{b} asked for "
                                f"out of order (next is {self.next_row})")
        self.next_row = b
        count = (b - a) * row_items
        if self.whole is not None:
            return self.whole[a * row_items:a * row_items + count].reshape(b - a, row_items)
        raw = self.file.read(count * self.dtype.itemsize)
        if len(raw) != count * self.dtype.itemsize:
            raise ConvcoreError(f"{self.npz}: member {self.member!r} ends before row {b}")
        return np.frombuffer(raw, self.dtype).reshape(b - a, row_items)

    def close(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            f.close()
