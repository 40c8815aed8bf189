"""Find where the next readable WARC record starts after a broken one.

A record whose declared Content-Length is wrong (too long: it swallows the records after it; too
short: the next record header is garbage) or a corrupt gzip member must not end the file. In a
gzip WARC each record is its own member (the WARC standard's recommendation, and what Common Crawl
writes), so reading resumes at the next member; in an uncompressed WARC it resumes at the next line
that starts a WARC header. All scans read in bounded pieces, so a hostile file cannot fill memory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

_PIECE = 1 << 20
_HEAD = 65536  # a WARC record header longer than this is not read as one
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_LINE = b"\nWARC/1."


@dataclass(frozen=True)
class GzipMember:
    """What decompressing the gzip member at `start` found."""

    start: int
    end: int | None  # offset just past the member; None when it breaks off or is corrupt
    cut: bool  # the file ends inside the member
    more_follows: bool  # bytes follow the member
    size: int = 0  # decompressed bytes
    head: bytes = b""  # the first decompressed bytes (enough for a record header)

    def holds_one_whole_record(self) -> bool:
        """Whether the member is exactly one record whose Content-Length is right (block + CRLFCRLF)."""
        ends = declared_record_end(self.head)
        return self.end is not None and ends is not None and ends[1] <= self.size <= ends[1] + 4


def gzip_member(stream: BinaryIO, start: int) -> GzipMember:
    """Decompress (and discard) the gzip member at `start`; say where it ends and whether more follows."""
    stream.seek(start)
    decompressor = zlib.decompressobj(31)
    head, size = b"", 0
    while not decompressor.eof:
        data = stream.read(_PIECE)
        if not data:
            return GzipMember(start, None, cut=True, more_follows=False, size=size, head=head)
        try:
            while data and not decompressor.eof:
                output = decompressor.decompress(data, 1 << 22)
                if len(head) < _HEAD:
                    head += output[:_HEAD - len(head)]
                size += len(output)
                data = decompressor.unconsumed_tail
        except zlib.error:
            return GzipMember(start, None, cut=False, more_follows=True, size=size, head=head)
    # unused_data is what the last piece held past the member's end.
    unused = len(decompressor.unused_data)
    end = stream.tell() - unused
    more = unused > 0 or bool(stream.read(1))
    return GzipMember(start, end, cut=False, more_follows=more, size=size, head=head)


def first_broken_gzip_member(stream: BinaryIO, start: int) -> GzipMember | None:
    """The first gzip member from `start` to the end that is cut or corrupt; None when all are whole."""
    while True:
        member = gzip_member(stream, start)
        if member.end is None:
            return member
        if not member.more_follows:
            return None
        start = member.end


def starts_with_gzip(stream: BinaryIO, offset: int) -> bool:
    stream.seek(offset)
    return stream.read(2) == _GZIP_MAGIC[:2]


def _find(stream: BinaryIO, needle: bytes, start: int) -> int | None:
    """Offset of the first `needle` at or after `start`."""
    position = start
    stream.seek(start)
    tail = b""
    while True:
        data = stream.read(_PIECE)
        if not data:
            return None
        window = tail + data
        found = window.find(needle)
        if found >= 0:
            return position - len(tail) + found
        tail = window[-(len(needle) - 1):]
        position += len(data)


def next_gzip_member(stream: BinaryIO, after: int) -> int | None:
    """Offset of the first gzip member after `after` whose data decompresses into a WARC header."""
    position = after + 1
    while True:
        found = _find(stream, _GZIP_MAGIC, position)
        if found is None:
            return None
        stream.seek(found)
        try:
            head = zlib.decompressobj(31).decompress(stream.read(4096), 16)
        except zlib.error:
            head = b""
        if head.startswith(b"WARC/"):
            return found
        position = found + 1


def next_warc_header(stream: BinaryIO, after: int) -> int | None:
    """Offset of the first line after `after` that starts a WARC header (`WARC/1.0`, `WARC/1.1`)."""
    found = _find(stream, _WARC_LINE, after)
    return None if found is None else found + 1


def declared_record_end(head: bytes) -> tuple[int, int] | None:
    """(end of the header, end of the block) of the record that `head` starts with, from its Content-Length."""
    header_end = head.find(b"\r\n\r\n")
    if header_end < 0:
        return None
    for line in head[:header_end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return header_end + 4, header_end + 4 + int(value.strip())
            except ValueError:
                return None
    return None


def plain_record_end(stream: BinaryIO, start: int) -> tuple[int, int] | None:
    """(end of the header, end of the block) of the uncompressed record at `start`, as offsets in the file."""
    stream.seek(start)
    ends = declared_record_end(stream.read(_HEAD))
    return None if ends is None else (start + ends[0], start + ends[1])


def plain_record_ends_cleanly(stream: BinaryIO, start: int) -> bool:
    """Whether the uncompressed record at `start` ends, as its Content-Length says, with CRLFCRLF."""
    ends = plain_record_end(stream, start)
    if ends is None:
        return False
    stream.seek(ends[1])
    return stream.read(4) == b"\r\n\r\n"
