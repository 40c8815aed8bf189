"""Image normalisation: bytes in, an upright RGB JPEG of bounded size plus its hashes out.

`normalize_image` either returns a `NormalizedImage` or raises `ImageRejected` with a short reason
token (also the name of the reject counter). Checks that need only the header (the
decompression-bomb limit, size, aspect ratio, animation) run before any pixel is decoded. Decoding
is kept cheap: a JPEG is decoded straight at a reduced scale (draft mode), a large image is shrunk
by an integer factor with `reduce()` before the final resampling, and the perceptual hash is
computed from a further reduced gray copy. A baseline RGB JPEG that is already small enough and
carries no camera metadata is stored without a lossy re-encode: its entropy-coded data as it came,
but without comment or metadata segments or trailing bytes (`jpeg.strip_jpeg_metadata`), so
nothing a web page hid in them (HTML, scripts, author data) is ever stored.

Bytes in any state give a NormalizedImage or an ImageRejected, never another exception. Pillow's
warnings (a decompression-bomb warning, malformed metadata) go through the `warnings` module as
usual: nothing here filters them.
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from magiclens.pipeline.images.jpeg import JpegStructureError, strip_jpeg_metadata
from magiclens.pipeline.records import NormalizedImage

# Checked from the header, before decoding: 40 M pixels are 120 MB as 24-bit RGB, more than any
# photo a web page shows (a 50 MP camera frame is 8192x6144) and under half Pillow's own limit
# (89.5 M), whose images were all decoded in full, peaking at 640 MB per worker, only to be shrunk.
DEFAULT_MAX_PIXELS = 40_000_000

# Raster formats that web pages use. Pillow can open many more (EPS would start Ghostscript, and
# rarely used decoders are little tested); bytes in any other format are `not_image`. MPO
# files are opened by the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO")

# An SVG document: optional BOM, then XML declaration, comments and doctype (with an internal
# subset, as Illustrator writes them) in any number, then the <svg> root element.
_SVG_START = re.compile(
    rb"(?:\xef\xbb\xbf)?"
    rb"(?:\s*(?:<\?.*?\?>|<!--.*?-->|<!doctype[^\[>]*(?:\[.*?\])?\s*>))*"
    rb"\s*<svg[\s>/]",
    re.DOTALL,
)
_SNIFF_BYTES = 4096
_GZIP_MAGIC = b"\x1f\x8b"

REJECT_REASONS = (
    "empty",
    "svg",
    "not_image",
    "truncated",
    "decompression_bomb",
    "too_small",
    "aspect_ratio",
    "animated",
    "decode_error",
)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
# 16-bit gray decodes to these; 16-bit colour PNGs Pillow already decodes to 8-bit RGB(A).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255)

# Where Pillow puts a JPEG's EXIF, XMP and Photoshop (IPTC) blocks.
_CAMERA_METADATA = ("exif", "xmp", "photoshop")
# Re-encoded at quality 90, the shared photos take 0.05 to 0.5 bytes per pixel.
_MAX_AS_IS_BYTES_PER_PIXEL = 1.0
# The perceptual hash is computed from a copy whose shorter side is at least this long: at 64 px
# the hash moves up to 8 bits from the full image's on the shared near-duplicate sets, at 96 px
# up to 4, as hashing the 512 px image did.
_HASH_SOURCE_SIDE = 96


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored: the one place their defaults are written (mine, fetch and their flags)."""

    max_side: int = 512
    min_side: int = 150
    max_aspect: float = 3.0
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS


DEFAULT_IMAGE = ImageConfig()


class ImageRejected(Exception):
    """An image that normalisation will not keep: a reason token and a detail for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize_image(
    data: bytes,
    *,
    max_side: int = DEFAULT_IMAGE.max_side,
    min_side: int = DEFAULT_IMAGE.min_side,
    max_aspect: float = DEFAULT_IMAGE.max_aspect,
    jpeg_quality: int = DEFAULT_IMAGE.jpeg_quality,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> NormalizedImage:
    """Decode `data`, orient it upright, convert it to RGB, shrink it and re-encode it as JPEG.

    The stored image's longer side is at most `max_side` (smaller images are never enlarged).
    Images whose shorter side is under `min_side`, whose longer side is more than `max_aspect`
    times the shorter one, or with more than `max_pixels` pixels are rejected from their header.
    A `max_pixels` above twice Pillow's global Image.MAX_IMAGE_PIXELS has no effect: Pillow then
    refuses the image itself (also reported as `decompression_bomb`). `original_width` and
    `original_height` are those of the upright picture.
    """
    if not data:
        raise ImageRejected("empty", "no bytes")
    if _looks_like_svg(data):
        raise ImageRejected("svg", "an SVG document; vector images are not kept")

    with _open(data) as image:
        original_format = image.format
        _check_header_size(image.size, min_side, max_aspect, max_pixels)
        _reject_animation(image)
        if _storable_as_is(image, data, max_side):
            stored = _stored_as_is(data)
            if stored is not None:
                return stored
        stored_width, stored_height = image.size
        # Only the JPEG decoder can scale while decoding (by 1/2, 1/4 or 1/8, never below the
        # requested size); for every other format draft() does nothing.
        image.draft("RGB", _fit_within(image.size, max_side))
        _decode(image)
        decoded_size = image.size
        _orient_upright(image)
        if image.size == decoded_size:
            original_width, original_height = stored_width, stored_height
        else:
            original_width, original_height = stored_height, stored_width
        target_size = _fit_within((original_width, original_height), max_side)
        small = _shrink(_flatten_to_rgb_or_gray(image), target_size)
    # Leaving the `with` block freed the decoded full-size pixels; only `small` is left.
    phash = _phash(small)
    if small.mode != "RGB":
        small = small.convert("RGB")

    encoded = io.BytesIO()
    # Pillow writes the source's comment (carried in image.info) into a JPEG unless told otherwise.
    small.save(encoded, "JPEG", quality=jpeg_quality, comment=b"")
    return NormalizedImage(
        jpeg=encoded.getvalue(),
        width=small.width,
        height=small.height,
        original_width=original_width,
        original_height=original_height,
        original_format=original_format,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=phash,
    )


def normalize_with(data: bytes, config: ImageConfig) -> NormalizedImage:
    """`normalize_image` with the settings of an ImageConfig."""
    return normalize_image(
        data,
        max_side=config.max_side,
        min_side=config.min_side,
        max_aspect=config.max_aspect,
        jpeg_quality=config.jpeg_quality,
        max_pixels=config.max_pixels,
    )


def _storable_as_is(image: Image.Image, data: bytes, max_side: int) -> bool:
    """A baseline RGB JPEG without camera metadata that needs no shrinking keeps its coded pixels.

    Re-encoding it would only cost quality and time; its comment and metadata segments are
    dropped all the same (`_stored_as_is`), an ICC profile with them, as the re-encode drops it.
    Re-encoded all the same: progressive files (two to three times slower to decode, at every
    epoch of training), files with EXIF, XMP or Photoshop metadata (camera, place and author
    data, perhaps an orientation to apply), and files heavy for their size (near-lossless, or a
    large ICC profile), whose re-encode saves bytes. Arithmetic-coded JPEGs, which browsers do not
    show, do not occur on web pages.
    """
    return (
        image.format == "JPEG"  # an MPO (several pictures) has its own format name
        and image.mode == "RGB"
        and not image.info.get("progressive")
        and max(image.size) <= max_side
        and not any(key in image.info for key in _CAMERA_METADATA)
        and len(data) <= image.width * image.height * _MAX_AS_IS_BYTES_PER_PIXEL
    )


def _stored_as_is(data: bytes) -> NormalizedImage | None:
    """The JPEG's own coded pixels without its other segments, or None when its segments are not
    well formed (the caller re-encodes it then)."""
    try:
        stripped = strip_jpeg_metadata(data)
    except JpegStructureError:
        return None
    with _open(stripped) as image:
        width, height = image.size
        # At 1/2..1/8 scale the decoder still reads every coefficient of the file, so broken data
        # is found as at full size; only the small gray copy that the hash needs is computed.
        image.draft("L", (_HASH_SOURCE_SIDE, _HASH_SOURCE_SIDE))
        _decode(image)
        phash = _phash(image)
    return NormalizedImage(
        jpeg=stripped,
        width=width,
        height=height,
        original_width=width,
        original_height=height,
        original_format="JPEG",
        sha256=hashlib.sha256(data).hexdigest(),
        phash=phash,
    )


def _phash(image: Image.Image) -> str:
    """imagehash's 64-bit pHash of a gray copy reduced by an integer factor.

    pHash looks at a 32x32 version only, so a copy of _HASH_SOURCE_SIDE px or more is enough;
    imagehash then resizes it with LANCZOS as it would the full image. Every image of the
    project is hashed this way, so near-duplicates are compared like with like.
    """
    factor = min(image.size) // _HASH_SOURCE_SIDE
    gray = image.convert("L") if image.mode != "L" else image
    if factor >= 2:
        gray = gray.reduce(factor)
    return str(imagehash.phash(gray, hash_size=8))


def _looks_like_svg(data: bytes) -> bool:
    head = data[:_SNIFF_BYTES]
    if head.startswith(_GZIP_MAGIC):  # .svgz
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, _SNIFF_BYTES)
        except zlib.error:
            return False
    return _SVG_START.match(head.lower()) is not None


def _open(data: bytes) -> Image.Image:
    """Parse the header only: Image.open reads no pixel data."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "not_image",
            f"no {'/'.join(ACCEPTED_FORMATS)} header found; first bytes {data[:16]!r}",
        ) from None
    except Exception as error:  # plugins raise many types on broken headers; none may escape
        if _says_truncated(error):
            raise ImageRejected("truncated", _describe(error)) from None
        raise ImageRejected(
            "not_image", f"unreadable header ({_describe(error)}); first bytes {data[:16]!r}"
        ) from None


def _check_header_size(
    size: tuple[int, int], min_side: int, max_aspect: float, max_pixels: int
) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{width}x{height} is over the limit of {max_pixels} pixels"
        )
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height}: a side is under {min_side} px")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageRejected(
            "aspect_ratio", f"{width}x{height}: aspect ratio over {max_aspect:g}"
        )


def _reject_animation(image: Image.Image) -> None:
    """Animations are not photos; MPO (a camera's JPEG with extra pictures) keeps its first one."""
    if image.format == "MPO":
        return
    try:
        animated = getattr(image, "is_animated", False)
    except Exception as error:  # is_animated parses the next frame's header
        raise _decode_failure(error) from None
    if animated:
        # No frame count in the detail: counting parses every frame of a possibly broken file.
        raise ImageRejected("animated", f"{image.format} with more than one frame")


def _fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the same aspect ratio whose longer side is at most max_side (never larger)."""
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(image: Image.Image) -> None:
    try:
        image.load()
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise _decode_failure(error) from None


def _orient_upright(image: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:  # a malformed EXIF block
        detail = f"EXIF orientation unreadable: {_describe(error)}"
        raise ImageRejected("decode_error", detail) from None


def _flatten_to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """8-bit RGB or L pixels; gray stays one channel until after the resize (a third of the work).

    Transparent pixels are composited on white, so that transparent icons and logos neither
    turn black nor all hash alike.
    """
    mode = image.mode
    try:
        if mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image if mode == "RGBA" else image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _WHITE)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        if mode in ("RGB", "L"):
            return image
        if mode == "1":
            return image.convert("L")
        if mode in _SIXTEEN_BIT_MODES:
            return _scale_to_gray8(np.asarray(image), 65535.0)
        if mode in ("I", "F"):
            return _integer_or_float_to_gray8(np.asarray(image))
        return image.convert("RGB")  # P, CMYK (Adobe's inverted CMYK is undone by the decoder), ...
    except ValueError as error:  # a mode Pillow cannot convert
        raise ImageRejected("decode_error", f"cannot convert mode {mode} to RGB: {error}") from None


def _integer_or_float_to_gray8(pixels: np.ndarray) -> Image.Image:
    """32-bit gray: 16-bit samples as most files that decode to it hold, else stretched to fit."""
    low, high = float(pixels.min()), float(pixels.max())
    if pixels.dtype.kind in "iu" and low >= 0 and high <= 65535:
        return _scale_to_gray8(pixels, 255.0 if high <= 255 else 65535.0)
    return _scale_to_gray8(pixels - low, max(high - low, 1e-12))


def _scale_to_gray8(pixels: np.ndarray, full_scale: float) -> Image.Image:
    scaled = np.clip(pixels.astype(np.float32) * (255.0 / full_scale) + 0.5, 0, 255)
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def _shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A new image of `size`: a cheap integer-factor reduce() first, then bicubic resampling.

    The reduce leaves at least twice `size` for the bicubic step, so that the result is
    indistinguishable from a bicubic resize of the whole image at a fraction of the cost.
    """
    if image.size == size:
        return image.copy()  # the caller closes the decoded image
    factor = min(image.width // size[0], image.height // size[1]) // 2
    if factor >= 2:
        image = image.reduce(factor)
    return image.resize(size, Image.Resampling.BICUBIC)


def _decode_failure(error: Exception) -> ImageRejected:
    if isinstance(error, Image.DecompressionBombError):
        return ImageRejected("decompression_bomb", str(error))
    if _says_truncated(error):
        return ImageRejected("truncated", _describe(error))
    return ImageRejected("decode_error", _describe(error))


def _says_truncated(error: Exception) -> bool:
    return "truncated" in str(error).lower()


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"
