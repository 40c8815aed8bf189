"""Reading, decoding and embedding images: one place for `index`, `search`, `evaluate` and the
benchmarks.

An image is found by its `ImageLocation` (a file, or a cell of a Parquet file), read by an
`ImageReader`, decoded in DataLoader workers by `decoded_batches`, and embedded by `embed_decoded`.

Precision. Embeddings are computed in float32 by default. `--precision bf16` runs the model under
bfloat16 autocast (faster on recent GPUs); on a tiny random model its embeddings differ from
float32 by about 1e-2 and its rankings move a little (see docs/use.md for the measured effect on the
metrics), so published figures should state which was used.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from magiclens.model.arguments import PRECISIONS
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import ImageDecodeError, PreprocessConfig, decode_image, to_model_input
from magiclens.model.progress import progress



def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context the model runs in for `precision` (fp32: none)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class ImageLocation:
    """Where one image's encoded bytes are: a file, or a cell (row, column) of a Parquet file.
    (Not the pipeline's `ImageRef`, which is an image element found on a web page.)"""

    source: str  # absolute path
    row: int | None = None
    column: str | None = None

    @property
    def id(self) -> str:
        return self.source if self.row is None else f"{self.source}#{self.column}:{self.row}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "row": self.row, "column": self.column}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageLocation:
        return cls(data["source"], data["row"], data["column"])


class ImageReadError(ValueError):
    """The bytes of an image could not be read."""


# --- reading and decoding -----------------------------------------------------------------------


class ImageReader:
    """Reads the encoded bytes of images; keeps the last Parquet row group it read."""

    def __init__(self) -> None:
        self._row_starts: dict[str, list[int]] = {}
        self._cached: tuple[str, str, int, pa.ChunkedArray] | None = None

    def read(self, ref: ImageLocation) -> bytes:
        if ref.row is None:
            try:
                return Path(ref.source).read_bytes()
            except OSError as error:
                raise ImageReadError(f"cannot read the file: {error.strerror or error}") from error
        return self._read_cell(ref.source, ref.row, ref.column or "")

    def _read_cell(self, source: str, row: int, column: str) -> bytes:
        try:
            parquet = pq.ParquetFile(source)
            if source not in self._row_starts:
                sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
                self._row_starts[source] = [int(n) for n in np.cumsum([0] + sizes)]
            starts = self._row_starts[source]
            group = int(np.searchsorted(starts, row, side="right")) - 1
            if self._cached is None or self._cached[:3] != (source, column, group):
                values = parquet.read_row_group(group, columns=[column]).column(0)
                self._cached = (source, column, group, values)
            value = self._cached[3][row - starts[group]].as_py()
        except (pa.ArrowException, OSError, KeyError, IndexError) as error:
            raise ImageReadError(f"cannot read row {row}, column {column!r} of {source}: {error}") from error
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, bytes) or not value:
            raise ImageReadError(f"row {row} of {source} holds no image bytes in column {column!r}")
        return value


@dataclass
class DecodedBatch:
    """The images of one batch that decoded, and those that did not."""

    indices: list[int]  # positions in the list of locations given to `decoded_batches`
    pixels: torch.Tensor  # (n, 3, S, S) float32, each image divided by its maximum
    max_values: torch.Tensor  # (n,)
    sha256: list[str]
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (position, reason, detail)


class _DecodingDataset(Dataset):
    """Batch i = locations[i*B : (i+1)*B], read and decoded (in a DataLoader worker)."""

    def __init__(self, locations: list[ImageLocation], batch_size: int, image_size: int, exif_transpose: bool) -> None:
        self.locations = locations
        self.batch_size = batch_size
        self.image_size = image_size
        self.exif_transpose = exif_transpose
        self._reader: ImageReader | None = None

    def __len__(self) -> int:
        return (len(self.locations) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, batch: int) -> DecodedBatch:
        if self._reader is None:
            self._reader = ImageReader()
        indices, pixels, max_values, hashes, rejected = [], [], [], [], []
        start = batch * self.batch_size
        for index in range(start, min(start + self.batch_size, len(self.locations))):
            try:
                data = self._reader.read(self.locations[index])
                # the released model's order: divide by the maximum, then resize in float (docs/fidelity.md)
                image, max_value = decode_image(data, self.image_size, exif_transpose=self.exif_transpose, float_resize=True)
            except ImageReadError as error:
                rejected.append((index, "unreadable", str(error)))
                continue
            except ImageDecodeError as error:
                rejected.append((index, "undecodable", str(error)))
                continue
            indices.append(index)
            pixels.append(image)
            max_values.append(max_value)
            hashes.append(hashlib.sha256(data).hexdigest())
        size = self.image_size
        return DecodedBatch(
            indices=indices,
            pixels=torch.stack(pixels) if pixels else torch.empty(0, 3, size, size, dtype=torch.float32),
            max_values=torch.tensor(max_values, dtype=torch.float32),
            sha256=hashes,
            rejected=rejected,
        )


def decoded_batches(
    locations: list[ImageLocation], image_size: int, batch_size: int, num_workers: int, *, exif_transpose: bool
) -> Iterator[DecodedBatch]:
    """The images read and decoded in batches, in order, by `num_workers` DataLoader workers.

    `exif_transpose`: turn images upright by their EXIF orientation (index and search: a user's phone
    photos) or not (benchmarks: as the released model's evaluation does; docs/fidelity.md)."""
    dataset = _DecodingDataset(locations, batch_size, image_size, exif_transpose)
    yield from DataLoader(dataset, batch_size=None, num_workers=num_workers)


@torch.inference_mode()
def embed_decoded(
    model: MagicLens,
    preprocess: PreprocessConfig,
    pixels: torch.Tensor,
    max_values: torch.Tensor,
    instructions: list[str],
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Embeddings (n, D) float32 on the CPU of decoded images, each with its instruction."""
    if pixels.shape[0] == 0:
        return torch.empty(0, model.config.head.embed_dim)
    inputs = to_model_input(pixels.to(device), max_values.to(device), preprocess)
    with autocast(device, precision):
        return model.embed(inputs, instructions).float().cpu()


def embed_files(
    model: MagicLens,
    preprocess: PreprocessConfig,
    paths: list[Path],
    instructions: list[str],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "fp32",
    what: str = "images",
    exif_transpose: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """(n, D) float32 embeddings of image files, each with its instruction, in order; and the
    files that could not be read or decoded ("path (detail)"), which have no row."""
    locations = [ImageLocation(str(path)) for path in paths]
    parts, failures = [torch.empty(0, model.config.head.embed_dim)], []
    with progress(len(locations), what) as shown:
        for batch in decoded_batches(locations, preprocess.image_size, batch_size, num_workers,
                                     exif_transpose=exif_transpose):
            failures += [f"{locations[i].source} ({detail})" for i, _, detail in batch.rejected]
            texts = [instructions[i] for i in batch.indices]
            parts.append(embed_decoded(model, preprocess, batch.pixels, batch.max_values, texts, device, precision))
            shown.update(len(batch.indices) + len(batch.rejected))
    return torch.cat(parts), failures
