"""`magiclens index`: embed a corpus of images once, so that `magiclens search` can query it.

What can be indexed (`--images`, repeatable): an image file, a folder (every image file under it),
a glob, or a Parquet file whose image column holds encoded images (`struct<bytes, path>` as this
project writes them, or plain binary).

An index is a folder:

    index.json           what made it: the checkpoint, a fingerprint of its weights, the width D
    shards/NNNNNN.npy    float16 embeddings (n, D), L2-normalised in float32 before the cast
    shards/NNNNNN.json   per shard: the images embedded (id, source, row, column, sha256), the
                         images rejected with the reason, and the exact duplicates skipped

A shard's .json is written after its .npy, so a shard without .json is an interrupted write and
is ignored. Running `magiclens index` again on the same output skips every image that a complete
shard already accounts for: an interrupted run continues where it stopped, and new images can be
added to an index later. An image whose bytes are identical to one already indexed is counted as
a duplicate and not embedded twice.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from magiclens.model.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint, resolve_checkpoint
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import ImageDecodeError, PreprocessConfig, decode_image, to_model_input

INDEX_FILE = "index.json"
SHARDS_DIR = "shards"
FAISS_FILE = "faiss.index"
FAISS_RECORD = "faiss.json"
FAISS_TRAINING_SAMPLE = 1 << 18  # vectors a trained faiss index (IVF, PQ) learns from
INDEX_FORMAT = 1
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class SearchIndexError(ValueError):
    """Bad input to `index` or `search`: a source that does not exist, an index that does not fit."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image is: a file, or a cell (row, column) of a Parquet file."""

    source: str  # absolute path
    row: int | None = None
    column: str | None = None

    @property
    def id(self) -> str:
        return self.source if self.row is None else f"{self.source}#{self.column}:{self.row}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "row": self.row, "column": self.column}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRef:
        return cls(data["source"], data["row"], data["column"])


class ImageReadError(ValueError):
    """The bytes of an image could not be read."""


# --- finding the images -------------------------------------------------------------------------


def _images_in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _parquet_rows(path: Path, image_column: str) -> list[ImageRef]:
    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as error:
        raise SearchIndexError(f"{path} is not a readable Parquet file: {error}") from error
    names = metadata.schema.to_arrow_schema().names
    if image_column not in names:
        raise SearchIndexError(
            f"{path} has no column {image_column!r} (its columns: {', '.join(names)}); "
            "name the image column with --image-column"
        )
    source = str(path.resolve())
    return [ImageRef(source, row, image_column) for row in range(metadata.num_rows)]


def expand_sources(patterns: list[str], image_column: str = "image") -> list[ImageRef]:
    """Every image that the patterns name, in order, each once."""
    refs: dict[str, ImageRef] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            if not paths:
                raise SearchIndexError(f"nothing matches {pattern!r}")
        else:
            paths = [Path(pattern)]
            if not paths[0].exists():
                raise SearchIndexError(f"{pattern} does not exist")
        for path in paths:
            if path.is_dir():
                found = [ImageRef(str(p.resolve())) for p in _images_in_folder(path)]
                if not found and not glob.has_magic(pattern):
                    raise SearchIndexError(f"the folder {path} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            elif path.suffix.lower() == ".parquet":
                found = _parquet_rows(path, image_column)
            else:
                found = [ImageRef(str(path.resolve()))]
            refs.update((ref.id, ref) for ref in found)
    return list(refs.values())


# --- reading and decoding -----------------------------------------------------------------------


class ImageReader:
    """Reads the encoded bytes of images; keeps the last Parquet row group it read."""

    def __init__(self) -> None:
        self._row_starts: dict[str, list[int]] = {}
        self._cached: tuple[str, str, int, pa.ChunkedArray] | None = None

    def read(self, ref: ImageRef) -> bytes:
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

    indices: list[int]  # positions in the list of refs given to `decoded_batches`
    pixels: torch.Tensor  # (n, 3, S, S) uint8
    max_values: torch.Tensor  # (n,)
    sha256: list[str]
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (position, reason, detail)


class _DecodingDataset(Dataset):
    """Batch i = refs[i*B : (i+1)*B], read and decoded (in a DataLoader worker)."""

    def __init__(self, refs: list[ImageRef], batch_size: int, image_size: int) -> None:
        self.refs = refs
        self.batch_size = batch_size
        self.image_size = image_size
        self._reader: ImageReader | None = None

    def __len__(self) -> int:
        return (len(self.refs) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, batch: int) -> DecodedBatch:
        if self._reader is None:
            self._reader = ImageReader()
        indices, pixels, max_values, hashes, rejected = [], [], [], [], []
        start = batch * self.batch_size
        for index in range(start, min(start + self.batch_size, len(self.refs))):
            try:
                data = self._reader.read(self.refs[index])
                image, max_value = decode_image(data, self.image_size)
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
            pixels=torch.stack(pixels) if pixels else torch.empty(0, 3, size, size, dtype=torch.uint8),
            max_values=torch.tensor(max_values, dtype=torch.float32),
            sha256=hashes,
            rejected=rejected,
        )


def decoded_batches(refs: list[ImageRef], image_size: int, batch_size: int, num_workers: int) -> Iterator[DecodedBatch]:
    """The refs read and decoded in batches, in order, by `num_workers` DataLoader workers."""
    dataset = _DecodingDataset(refs, batch_size, image_size)
    yield from DataLoader(dataset, batch_size=None, num_workers=num_workers)


@torch.inference_mode()
def embed_decoded(
    model: MagicLens,
    preprocess: PreprocessConfig,
    pixels: torch.Tensor,
    max_values: torch.Tensor,
    instructions: list[str],
    device: torch.device,
) -> torch.Tensor:
    """Embeddings (n, D) float32 on the CPU of decoded images, each with its instruction."""
    if pixels.shape[0] == 0:
        return torch.empty(0, model.config.head.embed_dim)
    inputs = to_model_input(pixels.to(device), max_values.to(device), preprocess)
    return model.embed(inputs, instructions).float().cpu()


# --- the index on disk --------------------------------------------------------------------------


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights file: an index only grows with the weights that made it."""
    digest = hashlib.sha256()
    with open(resolve_checkpoint(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_files(index_dir: Path) -> list[tuple[Path, Path]]:
    """The complete shards, in order: (.npy, .json) pairs."""
    shards = index_dir / SHARDS_DIR
    if not shards.is_dir():
        return []
    return [(j.with_suffix(".npy"), j) for j in sorted(shards.glob("*.json")) if j.with_suffix(".npy").is_file()]


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


@dataclass
class IndexSummary:
    embedded: int = 0  # in this run
    already_indexed: int = 0  # skipped: a complete shard accounts for them
    duplicates: int = 0  # in this run: bytes identical to an image already indexed
    rejected: Counter[str] = field(default_factory=Counter)  # in this run, by reason: unreadable, undecodable
    total: int = 0  # embeddings in the whole index

    def to_dict(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "already_indexed": self.already_indexed,
            "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "total": self.total,
        }


class _ShardWriter:
    def __init__(self, index_dir: Path, first_number: int, embed_dim: int) -> None:
        self.directory = index_dir / SHARDS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.number = first_number
        self.embed_dim = embed_dim
        self._clear()

    def _clear(self) -> None:
        self.vectors: list[np.ndarray] = []
        self.items: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.duplicates: list[dict[str, Any]] = []

    @property
    def pending(self) -> int:
        return len(self.items) + len(self.rejected) + len(self.duplicates)

    def flush(self) -> None:
        if not self.pending:
            return
        vectors = np.concatenate(self.vectors) if self.vectors else np.empty((0, self.embed_dim), np.float16)
        stem = self.directory / f"{self.number:06d}"
        _replace_atomically(stem.with_suffix(".npy"), lambda f: np.save(f, vectors))
        record = {"items": self.items, "rejected": self.rejected, "duplicates": self.duplicates}
        _replace_atomically(stem.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
        self.number += 1
        self._clear()


def build_index(
    model: MagicLens,
    preprocess: PreprocessConfig,
    refs: list[ImageRef],
    output: Path,
    description: dict[str, Any],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    device: torch.device = torch.device("cpu"),
) -> IndexSummary:
    """Embed every ref that the index at `output` does not hold yet (see the module docstring).

    `description` identifies the model (checkpoint, fingerprint, embed_dim); an existing index made
    with another fingerprint is an error, never silently mixed.
    """
    output.mkdir(parents=True, exist_ok=True)
    meta_file = output / INDEX_FILE
    if meta_file.is_file():
        existing = json.loads(meta_file.read_text())
        if existing.get("fingerprint") != description["fingerprint"]:
            raise SearchIndexError(
                f"{output} was built with other weights ({existing.get('checkpoint')}); "
                "give a new --output, or --overwrite to start it again"
            )
    else:
        meta = {"format": INDEX_FORMAT, **description}
        _replace_atomically(meta_file, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))

    summary = IndexSummary()
    done: set[str] = set()
    hashes: dict[str, str] = {}  # sha256 -> id of the image indexed with those bytes
    shards = _shard_files(output)
    for _, record_file in shards:
        record = json.loads(record_file.read_text())
        for item in record["items"]:
            done.add(item["id"])
            hashes[item["sha256"]] = item["id"]
            summary.total += 1
        done.update(r["id"] for r in record["rejected"] + record["duplicates"])
    pending = [ref for ref in refs if ref.id not in done]
    summary.already_indexed = len(refs) - len(pending)

    last = int(shards[-1][1].stem) if shards else -1
    writer = _ShardWriter(output, last + 1, description["embed_dim"])
    with tqdm(total=len(pending), desc="indexing", unit="img", disable=None, file=sys.stderr) as progress:
        for batch in decoded_batches(pending, preprocess.image_size, batch_size, num_workers):
            for position, reason, detail in batch.rejected:
                writer.rejected.append({**pending[position].to_dict(), "reason": reason, "detail": detail})
                summary.rejected[reason] += 1
            keep = []
            for slot, (position, digest) in enumerate(zip(batch.indices, batch.sha256)):
                if digest in hashes:
                    writer.duplicates.append({**pending[position].to_dict(), "of": hashes[digest]})
                    summary.duplicates += 1
                else:
                    hashes[digest] = pending[position].id
                    keep.append(slot)
            vectors = embed_decoded(
                model, preprocess, batch.pixels[keep], batch.max_values[keep], [""] * len(keep), device
            )
            writer.vectors.append(vectors.numpy().astype(np.float16))
            for slot in keep:
                position = batch.indices[slot]
                writer.items.append({**pending[position].to_dict(), "sha256": batch.sha256[slot]})
            summary.embedded += len(keep)
            progress.update(len(batch.indices) + len(batch.rejected))
            if writer.pending >= shard_size:
                writer.flush()
        writer.flush()
    summary.total += summary.embedded
    return summary


@dataclass
class LoadedIndex:
    """An index read for searching: embeddings memory-mapped shard by shard, and their items."""

    path: Path
    meta: dict[str, Any]
    shards: list[str]  # shard names, in order
    vectors: list[np.ndarray]  # per shard, (n, D) float16
    items: list[list[dict[str, Any]]]  # per shard, n items

    @property
    def size(self) -> int:
        return sum(len(items) for items in self.items)


def load_index(path: str | Path) -> LoadedIndex:
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise SearchIndexError(f"{path} is not an index: it has no {INDEX_FILE} (build one with `magiclens index`)")
    meta = json.loads((path / INDEX_FILE).read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: index format {meta.get('format')} is not {INDEX_FORMAT}; build it again")
    shards, vectors, items = [], [], []
    for vector_file, record_file in _shard_files(path):
        record = json.loads(record_file.read_text())
        array = np.load(vector_file, mmap_mode="r")
        if array.shape != (len(record["items"]), meta["embed_dim"]):
            raise SearchIndexError(f"{vector_file} holds {array.shape}, but its {record_file.name} lists {len(record['items'])} images")
        shards.append(vector_file.stem)
        vectors.append(array)
        items.append(record["items"])
    return LoadedIndex(path, meta, shards, vectors, items)


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise SearchIndexError("--faiss needs the faiss package: pip install faiss-cpu (or faiss-gpu)") from error
    return faiss


def build_faiss_index(index_dir: Path, factory: str, chunk_rows: int = 65536) -> None:
    """Write faiss.index: every embedding of the index in a faiss index made by `factory` (a faiss
    index_factory string: "Flat" is exact, "HNSW32" or "IVF4096,Flat" approximate and faster on
    large corpora), inner-product metric; and faiss.json, which records what it holds."""
    faiss = import_faiss()
    loaded = load_index(index_dir)
    try:
        searchable = faiss.index_factory(loaded.meta["embed_dim"], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise SearchIndexError(f"faiss cannot make an index from {factory!r}: {error}") from error
    if not searchable.is_trained:  # learn from every step-th embedding, without loading them all
        step = max(1, loaded.size // FAISS_TRAINING_SAMPLE)
        starts = np.cumsum([0] + [len(v) for v in loaded.vectors])
        sample = [np.asarray(v[-start % step :: step], dtype=np.float32) for v, start in zip(loaded.vectors, starts)]
        try:
            searchable.train(np.concatenate(sample) if sample else np.empty((0, loaded.meta["embed_dim"]), np.float32))
        except RuntimeError as error:
            raise SearchIndexError(f"faiss cannot train {factory!r} on {loaded.size} embeddings: {error}") from error
    for vectors in loaded.vectors:
        for start in range(0, len(vectors), chunk_rows):
            searchable.add(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32))
    partial = index_dir / (FAISS_FILE + ".partial")
    faiss.write_index(searchable, str(partial))
    os.replace(partial, index_dir / FAISS_FILE)
    record = {"factory": factory, "count": loaded.size, "shards": loaded.shards}
    _replace_atomically(index_dir / FAISS_RECORD, lambda f: f.write(json.dumps(record).encode()))


# --- the command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    parser.add_argument(
        "--images",
        required=True,
        action="append",
        help="what to index: an image file, a folder (every image file under it), a glob (quote it), "
        "or a Parquet file with an image column; repeat the option for several",
    )
    parser.add_argument("--output", required=True, help="the index folder; if it exists, images it already holds are skipped")
    parser.add_argument(
        "--image-column",
        default="image",
        help="the column of Parquet inputs that holds the images (struct<bytes, path> or binary; default: image)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that read and decode images (default: 2)")
    parser.add_argument(
        "--shard-size", type=int, default=4096, help="images per shard file; an interrupted run loses at most one shard of work (default: 4096)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an existing index at --output and build it again")
    parser.add_argument(
        "--faiss",
        metavar="FACTORY",
        help='also (re)build a faiss index of all the embeddings for `search --faiss`: a faiss index_factory string, '
        'e.g. "Flat" (exact) or "HNSW32" (approximate, for large corpora); needs faiss installed',
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output = Path(args.output)
    try:
        if args.batch_size < 1 or args.shard_size < 1 or args.num_workers < 0:
            raise SearchIndexError("--batch-size and --shard-size must be at least 1, --num-workers at least 0")
        if args.faiss:
            import_faiss()  # fail before the long part
        refs = expand_sources(args.images, args.image_column)
        if args.overwrite and output.exists():
            if not (output / INDEX_FILE).is_file():
                raise SearchIndexError(f"{output} exists but is not an index; --overwrite only replaces an index")
            for vector_file, record_file in _shard_files(output):
                vector_file.unlink()
                record_file.unlink()
            for name in (INDEX_FILE, FAISS_FILE, FAISS_RECORD):
                (output / name).unlink(missing_ok=True)
        model, _, preprocess = load_checkpoint(args.checkpoint, device)
        description = {
            "checkpoint": str(resolve_checkpoint(args.checkpoint).resolve()),
            "fingerprint": checkpoint_fingerprint(args.checkpoint),
            "model": model.config.name,
            "embed_dim": model.config.head.embed_dim,
        }
        summary = build_index(
            model,
            preprocess,
            refs,
            output,
            description,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shard_size=args.shard_size,
            device=device,
        )
        if args.faiss:
            build_faiss_index(output, args.faiss)
    except (SearchIndexError, CheckpointError) as error:
        print(f"magiclens index: {error}", file=sys.stderr)
        return 2
    report = summary.to_dict()
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name:<20} {value}")
    return 0
