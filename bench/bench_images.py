"""Image normalisation images/s and quality against img2dataset's Resizer on the same images.

Ours (`normalize_image`): decode, EXIF orientation, RGB, longer side at most 512 px, JPEG at
quality 90, the 64-bit pHash and the sha256 of the input bytes. The baseline is img2dataset's
`Resizer` doing less: decode (OpenCV), resize so that the longer side is at most 512 px
(`keep_ratio_largest`, only if bigger, its default INTER_AREA downscale), JPEG at quality 90; no
orientation, no hashes. Both run on one core (the Resizer sets OpenCV to one thread).

The images are every file under ../shared/data/images that Pillow decodes and both sides accept
(size and aspect limits are lifted; what either side refuses is listed in the row), and separately
the JPEGs whose longer side is 1000 px or more. Each image is timed for both sides in turn, several
rounds, and its median time is used, which keeps other processes on the machine from favouring one
side.

Quality: the mean SSIM (grey, 7x7 uniform window) of each side's stored JPEG against a Lanczos
resize of the fully decoded source to that output's size (upright for ours, as stored for the
Resizer, which does not apply EXIF orientation). A JPEG that ours keeps as it came is compared with
the source itself.

img2dataset is installed by `make bench` without its dependencies (they would downgrade pandas and
webdataset), so its package __init__ (the downloader, wandb, ...) cannot run; the resizer module,
which needs only OpenCV and albumentations, is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import io
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from magiclens.pipeline.images import ImageRejected, normalize_image

IMAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "images"
ROUNDS = 5
LARGE_SIDE = 1000  # JPEGs at least this long are where draft mode (decoding at 1/2..1/8) pays
MAX_SIDE = 512  # normalize_image's default, as `mine` uses it
JPEG_QUALITY = 90
SSIM_WINDOW = 7
GOAL_ALL = 1.1
GOAL_LARGE = 1.5


def run() -> list[dict]:
    names = ("image_normalize_images_per_s", f"image_normalize_jpeg_{LARGE_SIDE}px_plus_images_per_s")
    try:
        resizer = _img2dataset_resizer()
    except Exception as error:  # not installed, or its OpenCV / albumentations missing
        return [
            {"name": name, "unit": "images/s", "goal": f">= {goal} (img2dataset Resizer, same images)",
             "error": f"img2dataset's Resizer is not importable ({type(error).__name__}: {error}); "
                      "run `make bench`, which installs it"}
            for name, goal in zip(names, (GOAL_ALL, GOAL_LARGE))
        ]
    images, refused = _comparable_images(resizer)
    ours_seconds, theirs_seconds = _median_seconds_per_image(images, resizer)
    ours_ssim = [_ssim_against_reference(data, _normalize(data).jpeg, upright=True) for data in images.values()]
    theirs_ssim = [_ssim_against_reference(data, resizer(io.BytesIO(data))[0], upright=False)
                   for data in images.values()]
    all_images = list(range(len(images)))
    large = [i for i, data in enumerate(images.values()) if _is_large_jpeg(data)]
    return [
        _row(names[0], all_images, ours_seconds, theirs_seconds, ours_ssim, theirs_ssim, GOAL_ALL)
        | {"refused": refused},
        _row(names[1], large, ours_seconds, theirs_seconds, ours_ssim, theirs_ssim, GOAL_LARGE),
    ]


def _img2dataset_resizer() -> Callable:
    package = importlib.util.find_spec("img2dataset")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("no module named img2dataset")
    path = Path(package.submodule_search_locations[0]) / "resizer.py"
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else its import asks PyPI for a newer version
    spec = importlib.util.spec_from_file_location("img2dataset_resizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Resizer(
        image_size=MAX_SIDE,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        encode_quality=JPEG_QUALITY,
        encode_format="jpg",
    )


def _comparable_images(resizer: Callable) -> tuple[dict[str, bytes], dict[str, str]]:
    """The decodable images both sides accept, by path; and why the others were left out."""
    images: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    for path in sorted(p for p in IMAGES.rglob("*") if p.is_file()):
        name = str(path.relative_to(IMAGES))
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except Exception:  # the corrupt and truncated JPEGs, the pickle, IMAGES.tsv
            continue
        try:
            _normalize(data)
        except ImageRejected as rejected:
            refused[name] = f"ours: {rejected.reason}"
            continue
        error = resizer(io.BytesIO(data))[-1]
        if error is not None:
            refused[name] = f"img2dataset: {error}"
            continue
        images[name] = data
    if not images:
        raise SystemExit(f"no images found under {IMAGES}: clone the project beside ../shared")
    return images, refused


def _normalize(data: bytes):
    return normalize_image(data, max_side=MAX_SIDE, min_side=1, max_aspect=100.0, jpeg_quality=JPEG_QUALITY)


def _median_seconds_per_image(images: dict[str, bytes], resizer: Callable) -> tuple[list[float], list[float]]:
    ours_times: list[list[float]] = [[] for _ in images]
    theirs_times: list[list[float]] = [[] for _ in images]
    for _ in range(ROUNDS):
        for index, data in enumerate(images.values()):
            started = time.perf_counter()
            resizer(io.BytesIO(data))
            theirs = time.perf_counter()
            _normalize(data)
            ours = time.perf_counter()
            theirs_times[index].append(theirs - started)
            ours_times[index].append(ours - theirs)
    return (
        [statistics.median(times) for times in ours_times],
        [statistics.median(times) for times in theirs_times],
    )


def _ssim_against_reference(source: bytes, stored: bytes, *, upright: bool) -> float:
    with Image.open(io.BytesIO(stored)) as output:
        output_gray = np.asarray(output.convert("L"), dtype=np.float64)
    with Image.open(io.BytesIO(source)) as image:
        image.load()
        full = _rgb_on_white(ImageOps.exif_transpose(image) if upright else image)
    size = (output_gray.shape[1], output_gray.shape[0])
    reference = full if full.size == size else full.resize(size, Image.Resampling.LANCZOS)
    return ssim(np.asarray(reference.convert("L"), dtype=np.float64), output_gray)


def _rgb_on_white(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean structural similarity of two grey images (0..255) over every full 7x7 window."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean_x, mean_y = _window_means(reference), _window_means(test)
    var_x = _window_means(reference * reference) - mean_x**2
    var_y = _window_means(test * test) - mean_y**2
    covariance = _window_means(reference * test) - mean_x * mean_y
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def _window_means(values: np.ndarray) -> np.ndarray:
    """The mean of every SSIM_WINDOW x SSIM_WINDOW window, from a summed-area table."""
    table = np.pad(values, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    w = SSIM_WINDOW
    sums = table[w:, w:] - table[:-w, w:] - table[w:, :-w] + table[:-w, :-w]
    return sums / (w * w)


def _is_large_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "JPEG" and max(image.size) >= LARGE_SIDE


def _row(
    name: str,
    indexes: list[int],
    ours_seconds: list[float],
    theirs_seconds: list[float],
    ours_ssim: list[float],
    theirs_ssim: list[float],
    goal: float,
) -> dict:
    value = len(indexes) / sum(ours_seconds[i] for i in indexes)
    baseline = len(indexes) / sum(theirs_seconds[i] for i in indexes)
    return {
        "name": name,
        "value": value,
        "unit": "images/s",
        "baseline": baseline,
        "ratio": value / baseline,
        "goal": f">= {goal} (img2dataset Resizer, same images)",
        "images": len(indexes),
        "ssim": statistics.fmean(ours_ssim[i] for i in indexes),
        "baseline_ssim": statistics.fmean(theirs_ssim[i] for i in indexes),
    }
