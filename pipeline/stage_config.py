"""Settings of the mine stages whose modules hold Beam code (warc, postdecode, dedupe).

They live apart from that code so that `magiclens mine --help` and the checks of its flags
(pipeline/mine/config.py) import no Beam; each stage module re-exports its own settings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadLimits:
    """Caps on a payload, as stored and once its HTTP encodings are undone (pipeline/warc.py)."""

    max_html_bytes: int = 5 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class DecodedImageConfig:
    """The checks after decoding (pipeline/postdecode.py)."""

    # Gray-level standard deviation (0-255) under which an image is near-uniform. The shared real
    # photos measure 9.9 (microaneurysms) to 72; a blank or one-colour image measures under 2.
    min_pixel_std: float = 6.0
    # Photo score (0 graphic .. 1 photo) under which an image is rejected as `graphic`; 0 = off.
    # Shared colour photos score 0.23 and up, logos, charts, text and line art 0.05 and under, but
    # gray photos score low too (docs/filters.md).
    min_photo_score: float = 0.0


@dataclass(frozen=True)
class DedupeConfig:
    """Near duplicates across the run (pipeline/dedupe.py)."""

    # At most this many differing pHash bits make two images one cluster. The shared near-duplicate
    # sets measure 0-4 for real edits and 18 or more for distinct photos (docs/filters.md).
    max_distance: int = 6
    max_pages_per_image: int = 10
    max_pairs_per_image: int = 10
    rounds: int = 4
