"""Undo the HTTP encodings an archived payload may still carry: chunked transfer, gzip, deflate, br, zstd.

A WARC response keeps the payload as the server sent it, so a page served with `Content-Encoding:
gzip` is stored compressed. Some archivers (pywb, browser captures) remove the chunking but keep the
`Transfer-Encoding: chunked` header, so a payload that does not start with a chunk-size line is taken
as already de-chunked. Every decoder is capped: a payload that decodes to more than the cap is
rejected (a decompression bomb never fills memory).
"""

from __future__ import annotations

import re
import zlib

import brotli
import zstandard

# Tokens some servers send for "no encoding"; "null" and "none" are not in any RFC but occur in real crawls.
IDENTITY = frozenset({"", "identity", "none", "null"})
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
_PIECE = 1 << 16


class PayloadRejected(Exception):
    """A payload that cannot be used: `reason` is the reject reason, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _tokens(header: str | None) -> list[str]:
    return [token.strip().lower() for token in (header or "").split(",") if token.strip().lower() not in IDENTITY]


def dechunk(body: bytes, max_bytes: int) -> bytes:
    """The data of a chunked body, or the body itself when it does not start with a chunk-size line."""
    match = _CHUNK_SIZE_LINE.match(body)
    if match is None:
        return body
    pieces, total, position = [], 0, 0
    while True:
        match = _CHUNK_SIZE_LINE.match(body, position)
        if match is None:
            if position >= len(body):
                raise PayloadRejected("transfer_encoding_error", "chunked body ends without its last (zero) chunk")
            raise PayloadRejected("transfer_encoding_error", f"no chunk-size line at byte {position}")
        size = int(match.group(1), 16)
        position = match.end()
        if size == 0:
            break
        if position + size > len(body):
            raise PayloadRejected("transfer_encoding_error",
                                  f"chunk of {size} bytes at byte {position} runs past the end ({len(body)} bytes)")
        total += size
        if total > max_bytes:
            raise PayloadRejected("decoded_too_large", f"de-chunked payload over {max_bytes} bytes")
        pieces.append(body[position:position + size])
        position += size
        if body.startswith(b"\r\n", position):
            position += 2
        elif body.startswith(b"\n", position):
            position += 1
    return b"".join(pieces)


def _zlib(data: bytes, wbits: int, max_bytes: int) -> bytes:
    output = bytearray()
    pending = data
    while True:
        decompressor = zlib.decompressobj(wbits)
        while pending and not decompressor.eof:
            # max_length is never 0 here (0 would mean unlimited): output stays at most max_bytes.
            output += decompressor.decompress(pending, max_bytes + 1 - len(output))
            if len(output) > max_bytes:
                raise PayloadRejected("decoded_too_large", f"decodes to over {max_bytes} bytes")
            pending = decompressor.unconsumed_tail
        if not decompressor.eof:
            raise zlib.error("compressed data ends early")
        pending = decompressor.unused_data
        # A gzip payload may be several members one after the other.
        if wbits != 31 or not pending.startswith(b"\x1f\x8b"):
            return bytes(output)


def _deflate(data: bytes, max_bytes: int) -> bytes:
    # "deflate" should be zlib-wrapped (RFC 9110) but many servers send raw deflate.
    try:
        return _zlib(data, 15, max_bytes)
    except zlib.error:
        return _zlib(data, -15, max_bytes)


def _brotli(data: bytes, max_bytes: int) -> bytes:
    decompressor = brotli.Decompressor()
    output = bytearray()
    for start in range(0, len(data), _PIECE):
        output += decompressor.process(data[start:start + _PIECE])
        if len(output) > max_bytes:
            raise PayloadRejected("decoded_too_large", f"decodes to over {max_bytes} bytes")
    if not decompressor.is_finished():
        raise brotli.error("compressed data ends early")
    return bytes(output)


def _zstd(data: bytes, max_bytes: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    output = reader.read(max_bytes + 1)
    if len(output) > max_bytes:
        raise PayloadRejected("decoded_too_large", f"decodes to over {max_bytes} bytes")
    return output


_DECODERS = {
    "gzip": lambda data, cap: _zlib(data, 31, cap),
    "x-gzip": lambda data, cap: _zlib(data, 31, cap),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decode_http_payload(body: bytes, content_encoding: str | None, transfer_encoding: str | None,
                        max_bytes: int) -> bytes:
    """The payload with its transfer and content encodings undone, at most `max_bytes` long.

    Raises PayloadRejected with reason `transfer_encoding_error`, `content_encoding_error`,
    `unsupported_content_encoding` or `decoded_too_large`.
    """
    transfer = _tokens(transfer_encoding)
    if transfer and transfer[-1] == "chunked":
        body = dechunk(body, max_bytes)
        transfer.pop()
    # Encodings are listed in the order they were applied: undo them last first.
    for encoding in reversed(transfer + _tokens(content_encoding)):
        decoder = _DECODERS.get(encoding)
        if decoder is None:
            raise PayloadRejected("unsupported_content_encoding", encoding[:50])
        try:
            body = decoder(body, max_bytes)
        except PayloadRejected:
            raise
        except (zlib.error, brotli.error, zstandard.ZstdError, EOFError) as error:
            raise PayloadRejected("content_encoding_error", f"{encoding}: {error}"[:200]) from None
    return body
