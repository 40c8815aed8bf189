"""A JPEG segment walker that keeps what decoding needs and drops metadata and comments.

Web JPEGs carry arbitrary bytes in comment (COM) and application (APPn) segments, and after the
end-of-image marker: HTML, scripts, camera and author data. A JPEG stored as it came keeps only
the segments a decoder uses: the tables, frame and scan headers, the entropy-coded data, the
APP0 JFIF header and the APP14 Adobe segment (it says whether the three channels are YCbCr or
RGB). Every other APPn (EXIF, XMP, ICC profiles, Photoshop/IPTC, vendor blocks), every COM
segment and anything after the end-of-image marker is dropped.
"""

from __future__ import annotations

_SOI = b"\xff\xd8"
_EOI = 0xD9
_SOS = 0xDA
_COM = 0xFE
_APP0 = 0xE0
_APP14 = 0xEE
_TEM = 0x01
_RST = range(0xD0, 0xD8)
_APP = range(0xE0, 0xF0)
# The APPn segments a decoder reads, by marker and the identifier their body starts with.
_KEPT_APP = {_APP0: b"JFIF\x00", _APP14: b"Adobe"}


class JpegStructureError(ValueError):
    """The bytes are not a well-formed sequence of JPEG segments ending in an end-of-image marker."""


def strip_jpeg_metadata(data: bytes) -> bytes:
    """The JPEG without COM segments, APPn segments other than JFIF and Adobe, or trailing bytes.

    Raises JpegStructureError when a segment runs past the end, a marker is missing where one
    must be, or the image has no end-of-image marker.
    """
    if not data.startswith(_SOI):
        raise JpegStructureError("no start-of-image marker")
    kept = [_SOI]
    position = len(_SOI)
    size = len(data)
    while True:
        if position >= size or data[position] != 0xFF:
            raise JpegStructureError(f"no marker at byte {position}")
        while position < size and data[position] == 0xFF:  # fill bytes may precede a marker
            position += 1
        if position >= size:
            raise JpegStructureError("ends inside a marker")
        marker = data[position]
        position += 1
        if marker == _EOI:
            kept.append(b"\xff\xd9")
            return b"".join(kept)
        if marker == _TEM:
            kept.append(b"\xff\x01")
            continue
        if marker == 0x00 or marker == _SOI[1] or marker in _RST:
            raise JpegStructureError(f"marker 0xFF{marker:02X} out of place at byte {position - 2}")
        if position + 2 > size:
            raise JpegStructureError(f"segment 0xFF{marker:02X} has no length")
        length = int.from_bytes(data[position : position + 2], "big")
        end = position + length
        if length < 2 or end > size:
            raise JpegStructureError(f"segment 0xFF{marker:02X} of {length} bytes runs past the end")
        if _keeps_segment(marker, data[position + 2 : end]):
            kept.append(data[position - 2 : end])
        position = end
        if marker == _SOS:
            scan_end = _end_of_scan(data, position)
            kept.append(data[position:scan_end])
            position = scan_end


def _keeps_segment(marker: int, body: bytes) -> bool:
    if marker == _COM:
        return False
    if marker in _APP:
        identifier = _KEPT_APP.get(marker)
        return identifier is not None and body.startswith(identifier)
    return True


def _end_of_scan(data: bytes, start: int) -> int:
    """Where the entropy-coded data that starts at `start` ends: at the next marker that is not a
    stuffed byte (FF 00) or a restart marker (FF D0..D7)."""
    position = start
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            raise JpegStructureError("the scan data has no end-of-image marker")
        following = data[position + 1]
        if following == 0x00 or following in _RST:
            position += 2
        elif following == 0xFF:  # a fill byte before a marker
            position += 1
        else:
            return position
