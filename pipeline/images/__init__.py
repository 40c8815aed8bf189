"""Images: normalisation of bytes into a stored JPEG with its hashes (`normalize`), and the Beam stage
that matches a page's image references to archived image records or sends them to the fetch stage
(`stage`)."""

from magiclens.pipeline.images.normalize import (
    ACCEPTED_FORMATS,
    DEFAULT_IMAGE,
    DEFAULT_MAX_PIXELS,
    REJECT_REASONS,
    ImageConfig,
    ImageRejected,
    normalize_image,
    normalize_with,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_IMAGE",
    "DEFAULT_MAX_PIXELS",
    "REJECT_REASONS",
    "ImageConfig",
    "ImageRejected",
    "normalize_image",
    "normalize_with",
]
