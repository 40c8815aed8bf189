"""Checks on an image after it was decoded and normalised (pipeline/images.py), before dedupe.

Size floor, aspect ratio, animation and format are checked by `normalize_image` itself; this adds
what needs pixels:

  near_uniform   the gray levels barely vary (blank, single-colour or fully transparent images:
                 their pHashes are all alike, so left in they would chain unrelated clusters)

Transparency is already handled before hashing: `normalize_image` composites transparent pixels on
white, so a transparent icon hashes by its visible shape, and one with nothing visible becomes a
white image that `near_uniform` rejects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from PIL import Image

from magiclens.pipeline.accounting import StageCounters
from magiclens.pipeline.records import NormalizedImage

# The variance is measured on a small copy: JPEG decodes straight to 1/8 scale (draft mode).
_PROBE_SIZE = (64, 64)


@dataclass(frozen=True)
class DecodedImageConfig:
    # Gray-level standard deviation (0-255) under which an image is near-uniform. The shared real
    # photos measure 9.9 (microaneurysms) to 72; a blank or one-colour image measures under 2.
    min_pixel_std: float = 6.0


def pixel_std(image: NormalizedImage) -> float:
    """Standard deviation of the gray levels of the stored JPEG, measured at about 64 px."""
    with Image.open(io.BytesIO(image.jpeg)) as stored:
        stored.draft("L", _PROBE_SIZE)
        gray = np.asarray(stored.convert("L"), dtype=np.float32)
    return float(gray.std())


def decoded_image_problem(image: NormalizedImage, config: DecodedImageConfig) -> tuple[str, str] | None:
    """(reason, detail) when the decoded image is not worth keeping, else None."""
    spread = pixel_std(image)
    if spread < config.min_pixel_std:
        return "near_uniform", f"gray-level std {spread:.1f} under {config.min_pixel_std:g}"
    return None


class CheckDecodedImages(beam.DoFn):
    """(page URL, PageImage) -> the same, or a reject with the reason (stage `decoded`)."""

    def __init__(self, config: DecodedImageConfig):
        self.config = config

    def setup(self):
        self.decoded = StageCounters("decoded")

    def process(self, element):
        page_url, item = element
        self.decoded.received()
        problem = decoded_image_problem(item.image, self.config)
        if problem:
            yield self.decoded.reject(f"{page_url} {item.ref.url}", *problem)
            return
        self.decoded.kept()
        yield element
