"""Checks on an image after it was decoded and normalised (pipeline/images/normalize.py), before dedupe.

Size floor, aspect ratio, animation and format are checked by `normalize_image` itself; this adds
what needs pixels, all measured once on a ~64 px copy (pipeline/pixels.py):

  near_uniform   the gray levels barely vary (blank, single-colour or fully transparent images:
                 their pHashes are all alike, so left in they would chain unrelated clusters)
  graphic        the photo score is under `min_photo_score` (off by default)

A kept image leaves this stage carrying its photo score and colour signature, which dedupe
(colour variants are not duplicates) and the pairs rows use.

Transparency is already handled before hashing: `normalize_image` composites transparent pixels on
white, so a transparent icon hashes by its visible shape, and one with nothing visible becomes a
white image that `near_uniform` rejects.
"""

from __future__ import annotations

from dataclasses import replace

from magiclens.pipeline.accounting import CheckStage, Problem
from magiclens.pipeline.pixels import PixelSignals, measured, pixel_signals
from magiclens.pipeline.records import NormalizedImage
from magiclens.pipeline.stage_config import DecodedImageConfig


def pixel_std(image: NormalizedImage) -> float:
    """Standard deviation of the gray levels of the stored JPEG, measured at about 64 px."""
    return pixel_signals(image.jpeg).gray_std


def signals_problem(signals: PixelSignals, config: DecodedImageConfig) -> Problem:
    """(reason, detail) when measured pixels say the image is not worth keeping, else None."""
    if signals.gray_std < config.min_pixel_std:
        return "near_uniform", f"gray-level std {signals.gray_std:.1f} under {config.min_pixel_std:g}"
    if signals.photo_score < config.min_photo_score:
        return "graphic", f"photo score {signals.photo_score:.2f} under {config.min_photo_score:g}"
    return None


def decoded_image_problem(image: NormalizedImage, config: DecodedImageConfig) -> Problem:
    """(reason, detail) when the decoded image is not worth keeping, else None."""
    return signals_problem(pixel_signals(image.jpeg), config)


class CheckDecodedImages(CheckStage):
    """(page URL, PageImage) -> the same with its pixel signals, or a reject (stage `decoded`)."""

    stage = "decoded"

    def __init__(self, config: DecodedImageConfig):
        self.config = config
        self._measured: tuple[object, PixelSignals] | None = None

    def problem(self, element) -> Problem:
        # CheckStage calls `output` right after `problem` on the same element: the signals
        # measured here are handed over, so the pixels are decoded once.
        signals = pixel_signals(element[1].image.jpeg)
        self._measured = (element, signals)
        return signals_problem(signals, self.config)

    def output(self, element):
        page_url, item = element
        handed_over = self._measured[1] if self._measured and self._measured[0] is element else None
        self._measured = None
        return page_url, replace(item, image=measured(item.image, handed_over))

    def element_id(self, element) -> str:
        page_url, item = element
        return f"{page_url} {item.ref.url}"
