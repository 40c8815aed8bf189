"""Image normalisation images/s against plain Pillow doing the same job on the same images.

The baseline is the straightforward way to do what `normalize_image` does: Image.open, EXIF
transpose, convert to RGB, resize to at most the same 512 px a side with the same filter
(bicubic), JPEG encode at quality 90, imagehash's 64-bit pHash of the result, sha256 of the input
bytes. Ours may decode a JPEG at a reduced scale (draft mode), reduce() before resampling, hash a
small gray copy, and keep a small baseline JPEG as it came: those are the savings measured.

The images are the real photos and near-duplicate sets in ../shared/data/images. Every image goes
the whole way (size and aspect limits are lifted). Each image is timed for both sides in turn,
several rounds, and its median time is used, which keeps other processes on the machine from
favouring one side. Both sides must give images of the same size (checked).
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from pathlib import Path

import imagehash
from PIL import Image, ImageOps

from magiclens.pipeline.images import normalize_image

IMAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "images"
ROUNDS = 5
LARGE_SIDE = 1000  # JPEGs at least this long are where draft mode (decoding at 1/2..1/8) pays
MAX_SIDE = 512  # normalize_image's default, as `mine` uses it
JPEG_QUALITY = 90


def run() -> list[dict]:
    images = _decodable_images()
    for data in images:  # warm up (imports, first-call setup), and check that both sides give the same sizes
        ours = _normalize(data)
        plain = _plain_pillow(data)
        if plain.size != (ours.width, ours.height):
            raise RuntimeError(f"the baseline gives {plain.size}, ours {ours.width}x{ours.height}: not the same job")
    plain_seconds, normalize_seconds = _median_seconds_per_image(images)
    large = [i for i, data in enumerate(images) if _is_large_jpeg(data)]
    return [
        _row(
            "image_normalize_images_per_s",
            len(images),
            sum(normalize_seconds),
            sum(plain_seconds),
        ),
        _row(
            f"image_normalize_jpeg_{LARGE_SIDE}px_plus_images_per_s",
            len(large),
            sum(normalize_seconds[i] for i in large),
            sum(plain_seconds[i] for i in large),
        ),
    ]


def _decodable_images() -> list[bytes]:
    paths = sorted(p for folder in ("photos", "neardup") for p in (IMAGES / folder).rglob("*"))
    images = []
    for path in paths:
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            _decode(data)
        except Exception:  # the corrupt JPEG and the pickle in the near-duplicate sets
            continue
        images.append(data)
    if not images:
        raise SystemExit(f"no images found under {IMAGES}: clone the project beside ../shared")
    return images


def _decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def _normalize(data: bytes):
    return normalize_image(data, max_side=MAX_SIDE, min_side=1, max_aspect=100.0, jpeg_quality=JPEG_QUALITY)


def _fit_within(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if max(width, height) <= MAX_SIDE:
        return width, height
    scale = MAX_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _plain_pillow(data: bytes) -> Image.Image:
    """The same job, the plain way; returns the stored image."""
    with Image.open(io.BytesIO(data)) as opened:
        rgb = ImageOps.exif_transpose(opened).convert("RGB")
    size = _fit_within(rgb.size)
    small = rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC)
    small.save(io.BytesIO(), "JPEG", quality=JPEG_QUALITY)
    str(imagehash.phash(small, hash_size=8))
    hashlib.sha256(data).hexdigest()
    return small


def _median_seconds_per_image(images: list[bytes]) -> tuple[list[float], list[float]]:
    plain_times: list[list[float]] = [[] for _ in images]
    normalize_times: list[list[float]] = [[] for _ in images]
    for _ in range(ROUNDS):
        for index, data in enumerate(images):
            started = time.perf_counter()
            _plain_pillow(data)
            plain = time.perf_counter()
            _normalize(data)
            normalized = time.perf_counter()
            plain_times[index].append(plain - started)
            normalize_times[index].append(normalized - plain)
    return (
        [statistics.median(times) for times in plain_times],
        [statistics.median(times) for times in normalize_times],
    )


def _is_large_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "JPEG" and max(image.size) >= LARGE_SIDE


def _row(name: str, count: int, normalize_seconds: float, plain_seconds: float) -> dict:
    value = count / normalize_seconds
    baseline = count / plain_seconds
    return {
        "name": name,
        "value": value,
        "unit": "images/s",
        "baseline": baseline,
        "ratio": value / baseline,
        "goal": ">= 1 (plain Pillow, same job)",
        "images": count,
    }
