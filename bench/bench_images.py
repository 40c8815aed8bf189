"""Image normalisation images/s against decoding alone (Image.open + load) of the same images.

The images are the real photos and near-duplicate sets in ../shared/data/images. Every image goes
the whole way (size and aspect limits are lifted), so both sides see the same work. Each image is
timed for both sides in turn, several rounds, and its median time is used, which keeps other
processes on the machine from favouring one side.
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

from PIL import Image

from magiclens.pipeline.images import normalize_image

IMAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "images"
ROUNDS = 5
LARGE_SIDE = 1000  # JPEGs at least this long are where draft mode (decoding at 1/2..1/8) pays


def run() -> list[dict]:
    images = _decodable_images()
    for data in images:  # warm up: imports, first-call setup
        _normalize(data)
    decode_seconds, normalize_seconds = _median_seconds_per_image(images)
    large = [i for i, data in enumerate(images) if _is_large_jpeg(data)]
    return [
        _row(
            "image_normalize_images_per_s",
            len(images),
            sum(normalize_seconds),
            sum(decode_seconds),
        ),
        _row(
            f"image_normalize_jpeg_{LARGE_SIDE}px_plus_images_per_s",
            len(large),
            sum(normalize_seconds[i] for i in large),
            sum(decode_seconds[i] for i in large),
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


def _normalize(data: bytes) -> None:
    normalize_image(data, min_side=1, max_aspect=100.0)


def _median_seconds_per_image(images: list[bytes]) -> tuple[list[float], list[float]]:
    decode_times: list[list[float]] = [[] for _ in images]
    normalize_times: list[list[float]] = [[] for _ in images]
    for _ in range(ROUNDS):
        for index, data in enumerate(images):
            started = time.perf_counter()
            _decode(data)
            decoded = time.perf_counter()
            _normalize(data)
            normalized = time.perf_counter()
            decode_times[index].append(decoded - started)
            normalize_times[index].append(normalized - decoded)
    return (
        [statistics.median(times) for times in decode_times],
        [statistics.median(times) for times in normalize_times],
    )


def _is_large_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "JPEG" and max(image.size) >= LARGE_SIDE


def _row(name: str, count: int, normalize_seconds: float, decode_seconds: float) -> dict:
    value = count / normalize_seconds
    baseline = count / decode_seconds
    return {
        "name": name,
        "value": value,
        "unit": "images/s",
        "baseline": baseline,
        "ratio": value / baseline,
        "goal": ">= 0.7",
        "images": count,
    }
