"""The image cache of the fetch stage (`--image-cache DIR`, local or any Beam filesystem such as gs://).

Every image that was fetched and normalised is stored under a hash of its URL and the normalisation
settings, so that a rerun sends no request for it. Rejects are not cached: a rerun retries failures
(most are transient or may have changed, and opt-outs are read afresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, fields

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from magiclens.pipeline.records import NormalizedImage

LOG = logging.getLogger("magiclens.fetch")

CACHE_FORMAT = "magiclens-image-cache/1"


def encode_cache_entry(url: str, image: NormalizedImage) -> bytes:
    """One JSON header line (the URL and the image's metadata), then the JPEG bytes."""
    header = {"format": CACHE_FORMAT, "url": url, "jpeg_bytes": len(image.jpeg)}
    header.update({name: value for name, value in asdict(image).items() if name != "jpeg"})
    return json.dumps(header, sort_keys=True).encode() + b"\n" + image.jpeg


def decode_cache_entry(data: bytes, url: str) -> NormalizedImage | None:
    """The image of a cache entry for `url`; None if the entry is cut short or not for this URL."""
    header_line, newline, jpeg = data.partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        return None
    if not newline or not isinstance(header, dict):
        return None
    if header.get("format") != CACHE_FORMAT or header.get("url") != url:
        return None
    if header.get("jpeg_bytes") != len(jpeg):
        return None
    try:
        metadata = {field.name: header[field.name] for field in fields(NormalizedImage) if field.name != "jpeg"}
    except KeyError:
        return None
    return NormalizedImage(jpeg=jpeg, **metadata)


class ImageCache:
    """Normalised images under `root` (any Beam filesystem), one file per URL and settings."""

    def __init__(self, root: str, normalization_key: str) -> None:
        self.root = root
        self.normalization_key = normalization_key

    def path(self, url: str) -> str:
        digest = hashlib.sha256(f"{self.normalization_key}\n{url}".encode()).hexdigest()
        return FileSystems.join(self.root, digest[:2], f"{digest}.img")

    def get(self, url: str) -> NormalizedImage | None:
        path = self.path(url)
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            image = decode_cache_entry(handle.read(), url)
        if image is None:
            LOG.warning("image cache: ignoring %s (cut short or not for %s); fetching again", path, url)
        return image

    def put(self, url: str, image: NormalizedImage) -> None:
        path = self.path(url)
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(encode_cache_entry(url, image))

