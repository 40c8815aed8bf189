"""Cheap pixel signals of a stored image, measured once on a ~64 px copy (pipeline/postdecode.py).

colour signature   what colours the image holds, independent of where: a chroma-weighted hue
                   histogram (HUE_BINS bins around the circle, soft binning) plus the mean chroma.
                   pHash works on gray levels, so the same product in red and in orange is a few
                   bits apart; two images are near duplicates only if their colours agree too.
                   Hue and chroma are taken in the opponent plane of HSV/HSL
                   (alpha = R - (G + B) / 2, beta = sqrt(3) / 2 * (G - B)), so a hue rotation by
                   some angle moves the histogram by about that angle.
colour distance    the earth mover's distance between two hue histograms on the circle, in
                   degrees: a rotation of every hue by 30 degrees measures about 30, while
                   blur, sharpening, contrast, saturation, resizing and JPEG keep it low.
                   When either image is (near) achromatic its hues are noise: the distance is
                   None and the pHash alone decides (a grayscale copy stays a duplicate).
photo score        photo (1) versus graphic (0): distinct colours, gray-level entropy and the
                   share of flat pixels (equal to their neighbours), each ramped to [0, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from magiclens.pipeline.records import NormalizedImage

# JPEG decodes straight to 1/2..1/8 scale (draft mode); the copy is at least this big a side.
PROBE_SIDE = 64
HUE_BINS = 16
# Mean chroma (0-255 scale) under which an image counts as achromatic: its hues say nothing. The
# shared grayscale copy measures 0.0 and real colour photos 7 (bridge) and up (docs/filters.md).
ACHROMATIC_CHROMA = 4.0
# Pixels under this chroma carry no hue; their weight ramps up to full over the next as many.
_HUE_CHROMA_FLOOR = 6.0
# Two images whose hue histograms are further apart than this (degrees) are colour variants,
# not near duplicates. Chosen on the tuning half of the measured sets (docs/filters.md).
MAX_COLOUR_DISTANCE = 12.0

# Gray levels (sum of four neighbour differences) within which a pixel counts as flat.
_FLAT_TOLERANCE = 4.0

_COLOUR_PREFIX = "h"  # the signature format: "h" + mean chroma byte + one byte per bin, hex


@dataclass(frozen=True)
class PixelSignals:
    gray_std: float  # standard deviation of the gray levels (0-255)
    photo_score: float  # 0 = graphic, 1 = photo
    colour: str  # colour signature (see colour_signature)


def probe_pixels(jpeg: bytes) -> np.ndarray:
    """The stored JPEG decoded at about PROBE_SIDE px a side, as an (h, w, 3) uint8 array."""
    with Image.open(io.BytesIO(jpeg)) as stored:
        stored.draft("RGB", (PROBE_SIDE, PROBE_SIDE))
        return np.asarray(stored.convert("RGB"))


def _gray(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, as Pillow's convert("L")
    weights = np.array([299, 587, 114], dtype=np.float32) / 1000
    return rgb.astype(np.float32) @ weights


def colour_signature(rgb: np.ndarray) -> str:
    """The colour signature of an (h, w, 3) uint8 image, as a short hex string."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    alpha = red - (green + blue) / 2
    beta = np.float32(np.sqrt(3) / 2) * (green - blue)
    chroma = np.hypot(alpha, beta)
    weight = chroma * np.clip((chroma - _HUE_CHROMA_FLOOR) / _HUE_CHROMA_FLOOR, 0, 1)
    position = (np.arctan2(beta, alpha) % (2 * np.pi)) / (2 * np.pi) * HUE_BINS
    lower = np.floor(position).astype(np.int64) % HUE_BINS
    upper_share = position - np.floor(position)
    histogram = np.bincount(lower, weight * (1 - upper_share), HUE_BINS)
    histogram += np.bincount((lower + 1) % HUE_BINS, weight * upper_share, HUE_BINS)
    total = histogram.sum()
    quantised = np.zeros(HUE_BINS, dtype=np.int64) if total <= 0 else np.rint(histogram / total * 255).astype(np.int64)
    mean_chroma = int(min(255, round(float(chroma.mean()))))
    return _COLOUR_PREFIX + f"{mean_chroma:02x}" + "".join(f"{value:02x}" for value in quantised)


def _parse(signature: str) -> tuple[float, np.ndarray]:
    if not (signature.startswith(_COLOUR_PREFIX) and len(signature) == 1 + 2 * (HUE_BINS + 1)):
        raise ValueError(f"not a colour signature of this version: {signature!r}; measure the image again")
    values = bytes.fromhex(signature[1:])
    return float(values[0]), np.frombuffer(values[1:], dtype=np.uint8).astype(np.float64)


def mean_chroma(signature: str) -> float:
    return _parse(signature)[0]


def colour_distance(a: str, b: str) -> float | None:
    """Degrees of hue the colours of two signatures are apart; None if either is achromatic."""
    chroma_a, hues_a = _parse(a)
    chroma_b, hues_b = _parse(b)
    if min(chroma_a, chroma_b) < ACHROMATIC_CHROMA or not hues_a.any() or not hues_b.any():
        return None
    # Earth mover's distance on a circle: the cumulative difference, less its median, summed.
    cumulative = np.cumsum(hues_a / hues_a.sum() - hues_b / hues_b.sum())
    return float(np.abs(cumulative - np.median(cumulative)).sum() * 360 / HUE_BINS)


def colours_agree(a: str | None, b: str | None, max_distance: float = MAX_COLOUR_DISTANCE) -> bool:
    """True unless both colours are known, chromatic, and more than `max_distance` degrees apart."""
    if a is None or b is None:
        return True
    distance = colour_distance(a, b)
    return distance is None or distance <= max_distance


def _ramp(value: float, low: float, high: float) -> float:
    return float(np.clip((value - low) / (high - low), 0.0, 1.0))


def photo_score(rgb: np.ndarray) -> float:
    """0 (graphic) to 1 (photo): the product of three signals, each ramped to [0, 1].

    entropy   of the gray levels: a graphic uses few levels (logos, line art, one colour)
    colours   distinct colours at 5 bits a channel, per pixel: text scans and gray images have few
    flat      share of pixels equal to the mean of their four neighbours (within JPEG noise): flat
              fills and smooth synthetic gradients; camera noise and texture make photos rough
    A graphic on any one signal scores low. Gray photos score low too (few colours), which is why
    the threshold is off by default; the measured scores are in docs/filters.md.
    """
    gray = _gray(rgb)
    levels = np.rint(gray).astype(np.int64)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    share = counts[counts > 0] / levels.size
    entropy = float(-(share * np.log2(share)).sum())
    quantised = (rgb.reshape(-1, 3) >> 3).astype(np.int64)
    colours = len(np.unique(quantised[:, 0] << 10 | quantised[:, 1] << 5 | quantised[:, 2])) / levels.size
    if min(gray.shape) < 3:
        return 0.0
    laplacian = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    flat = float((np.abs(laplacian) <= _FLAT_TOLERANCE).mean())
    return round(_ramp(entropy, 4.5, 6.5) * _ramp(colours, 0.005, 0.05) * (1.0 - _ramp(flat, 0.5, 0.95)), 4)


def pixel_signals(jpeg: bytes) -> PixelSignals:
    rgb = probe_pixels(jpeg)
    return PixelSignals(float(_gray(rgb).std()), photo_score(rgb), colour_signature(rgb))


def measured(image: NormalizedImage, signals: PixelSignals | None = None) -> NormalizedImage:
    """`image` carrying its photo score and colour signature (measured now unless given or carried)."""
    if signals is None:
        if image.colour is not None and image.photo_score is not None:
            return image
        signals = pixel_signals(image.jpeg)
    return replace(image, photo_score=signals.photo_score, colour=signals.colour)
