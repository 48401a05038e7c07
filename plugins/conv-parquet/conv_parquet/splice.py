"""One Parquet file from row groups compressed on several threads.

pyarrow's ``ParquetWriter`` encodes and compresses a column chunk on the thread that
calls ``write_table``, one row group after the other, and has no way to take a row
group written elsewhere. Here each row group is written by pyarrow on a worker thread as
a complete one-row-group file in memory (a *fragment*); the fragments' bytes are then
appended to the output in row order, and the output's footer is the first fragment's,
with every fragment's row group in it, their byte offsets moved by where their bytes
landed. Pages, statistics and schema are pyarrow's own; only the footer is re-encoded,
with Apache Thrift's compact protocol (``thrift``), the encoding Parquet footers use.
A file spliced this way is byte for byte the file one ``ParquetWriter`` writes with the
same settings (tested).

Parquet's footer structures, by field id (parquet-format's ``parquet.thrift``):
FileMetaData {3 num_rows, 4 row_groups, 5 key_value_metadata},
RowGroup {1 columns, 5 file_offset, 7 ordinal}, ColumnChunk {2 file_offset,
3 meta_data, 4 offset_index_offset, 6 column_index_offset}, ColumnMetaData {9
data_page_offset, 10 index_page_offset, 11 dictionary_page_offset, 14
bloom_filter_offset}, KeyValue {1 key, 2 value}.
"""
from __future__ import annotations

import struct
from typing import Any, BinaryIO

from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer

MAGIC = b"PAR1"
# (field id, thrift type, value); a struct is a list of fields in file order
Field = tuple[int, int, Any]

_FILE_ROWS, _FILE_GROUPS, _FILE_KV = 3, 4, 5
_GROUP_COLUMNS, _GROUP_OFFSET, _GROUP_ORDINAL = 1, 5, 7
_CHUNK_OFFSETS, _CHUNK_META = (2, 4, 6), 3
_META_OFFSETS = (9, 10, 11, 14)


def _read(p: TCompactProtocol, kind: int) -> Any:
    if kind == TType.STRUCT:
        fields: list[Field] = []
        p.readStructBegin()
        while True:
            _, ftype, fid = p.readFieldBegin()
            if ftype == TType.STOP:
                break
            fields.append((fid, ftype, _read(p, ftype)))
            p.readFieldEnd()
        p.readStructEnd()
        return fields
    if kind in (TType.LIST, TType.SET):
        etype, size = p.readListBegin() if kind == TType.LIST else p.readSetBegin()
        items = [_read(p, etype) for _ in range(size)]
        p.readListEnd() if kind == TType.LIST else p.readSetEnd()
        return etype, items
    if kind == TType.MAP:
        ktype, vtype, size = p.readMapBegin()
        pairs = [(_read(p, ktype), _read(p, vtype)) for _ in range(size)]
        p.readMapEnd()
        return ktype, vtype, pairs
    return {TType.BOOL: p.readBool, TType.BYTE: p.readByte, TType.I16: p.readI16, TType.I32: p.readI32,
            TType.I64: p.readI64, TType.DOUBLE: p.readDouble, TType.STRING: p.readBinary}[kind]()


def _write(p: TCompactProtocol, kind: int, value: Any) -> None:
    if kind == TType.STRUCT:
        p.writeStructBegin("")
        for fid, ftype, v in value:
            p.writeFieldBegin("", ftype, fid)
            _write(p, ftype, v)
            p.writeFieldEnd()
        p.writeFieldStop()
        p.writeStructEnd()
    elif kind in (TType.LIST, TType.SET):
        etype, items = value
        (p.writeListBegin if kind == TType.LIST else p.writeSetBegin)(etype, len(items))
        for item in items:
            _write(p, etype, item)
        p.writeListEnd() if kind == TType.LIST else p.writeSetEnd()
    elif kind == TType.MAP:
        ktype, vtype, items = value
        p.writeMapBegin(ktype, vtype, len(items))
        for k, v in items:
            _write(p, ktype, k)
            _write(p, vtype, v)
        p.writeMapEnd()
    else:
        {TType.BOOL: p.writeBool, TType.BYTE: p.writeByte, TType.I16: p.writeI16, TType.I32: p.writeI32,
         TType.I64: p.writeI64, TType.DOUBLE: p.writeDouble, TType.STRING: p.writeBinary}[kind](value)


def decode(footer: bytes) -> list[Field]:
    """A thrift compact struct (a FileMetaData) as fields."""
    return _read(TCompactProtocol(TMemoryBuffer(footer)), TType.STRUCT)


def encode(fields: list[Field]) -> bytes:
    buf = TMemoryBuffer()
    _write(TCompactProtocol(buf), TType.STRUCT, fields)
    return buf.getvalue()


def _get(fields: list[Field], fid: int) -> Any:
    return next((v for f, _, v in fields if f == fid), None)


def _set(fields: list[Field], fid: int, kind: int, value: Any) -> list[Field]:
    """``fields`` with field ``fid`` set (added in id order when absent)."""
    out = [f for f in fields if f[0] != fid] + [(fid, kind, value)]
    return sorted(out, key=lambda f: f[0])


def _moved(fields: list[Field], fids: tuple[int, ...], by: int) -> list[Field]:
    """Offsets ``fids`` moved ``by`` bytes; 0 is no offset (pyarrow writes the deprecated
    ColumnChunk.file_offset as 0), as nothing can start on the magic."""
    return [(f, t, v + by if f in fids and t == TType.I64 and v > 0 else v) for f, t, v in fields]


class Fragment:
    """A one-row-group Parquet file in memory: its row group's bytes and footer entry."""

    def __init__(self, data: Any):
        view = memoryview(data)
        if len(view) < 12 or bytes(view[:4]) != MAGIC or bytes(view[-4:]) != MAGIC:
            raise ValueError("not a Parquet file")
        size = struct.unpack("<I", view[-8:-4])[0]
        self.meta = decode(bytes(view[-8 - size:-8]))
        groups = _get(self.meta, _FILE_GROUPS)
        if groups is None or len(groups[1]) != 1:
            raise ValueError("a fragment holds one row group")
        self.group: list[Field] = groups[1][0]
        self.rows = int(_get(self.group, 3) or 0)
        self.body = view[4:len(view) - 8 - size]  # the row group's pages, after the magic


def _placed(group: list[Field], by: int, ordinal: int) -> list[Field]:
    """Row group ``group`` of a fragment, its offsets moved ``by`` bytes, as row group
    ``ordinal`` of the spliced file."""
    columns = []
    for chunk in _get(group, _GROUP_COLUMNS)[1]:
        chunk = _moved(chunk, _CHUNK_OFFSETS, by)
        meta = _get(chunk, _CHUNK_META)
        if meta is not None:
            chunk = _set(chunk, _CHUNK_META, TType.STRUCT, _moved(meta, _META_OFFSETS, by))
        columns.append(chunk)
    group = _moved(_set(group, _GROUP_COLUMNS, TType.LIST, (TType.STRUCT, columns)), (_GROUP_OFFSET,), by)
    if _get(group, _GROUP_ORDINAL) is not None:
        group = _set(group, _GROUP_ORDINAL, TType.I16, ordinal)
    return group


class SplicedFile:
    """Appends fragments to ``sink`` in order; :meth:`close` writes the footer."""

    def __init__(self, sink: BinaryIO):
        self.sink = sink
        self.pos = len(MAGIC)
        self.first: list[Field] | None = None
        self.groups: list[list[Field]] = []
        self.rows = 0
        sink.write(MAGIC)

    def append(self, fragment: Fragment) -> None:
        if self.first is None:
            self.first = fragment.meta
        self.groups.append(_placed(fragment.group, self.pos - len(MAGIC), len(self.groups)))
        self.rows += fragment.rows
        self.sink.write(fragment.body)
        self.pos += len(fragment.body)

    def close(self, kv: dict[str, str]) -> None:
        """The footer: the first fragment's, with every row group and ``kv``."""
        if self.first is None:
            raise ValueError("no row groups")
        meta = _set(self.first, _FILE_GROUPS, TType.LIST, (TType.STRUCT, self.groups))
        meta = _set(meta, _FILE_ROWS, TType.I64, self.rows)
        if kv:
            pairs = [[(1, TType.STRING, k.encode()), (2, TType.STRING, v.encode())] for k, v in kv.items()]
            meta = _set(meta, _FILE_KV, TType.LIST, (TType.STRUCT, pairs))
        footer = encode(meta)
        self.sink.write(footer + struct.pack("<I", len(footer)) + MAGIC)
